"""An fp8 KV cache's one rule for the kernels that write it: saturate, then round to nearest even (reference:
`quantize` in egmla/attention/cache.py). float8_e4m3fn has no infinity, so a value past its largest finite value (448)
is clamped to it before the cast rather than left to the conversion. The rounding is done here, in fp32, so that the
cast itself is exact: Triton's CPU interpreter rounds fp32 -> fp8 wrongly (1.99 -> 1.0: it drops the carry into the
exponent; ties round up), and the tests run the kernels there."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from egmla.kernels import interpreting

FP8 = torch.float8_e4m3fn


@triton.jit
def round_e4m3(x):
    """x (fp32, |x| <= 448) rounded to nearest even at float8_e4m3fn's precision, still fp32: 3 mantissa bits from
    2^-6 up, steps of 2^-9 below it (e4m3's subnormals)."""
    bits = x.to(tl.int32, bitcast=True)
    # add half a step of the 4th mantissa bit (less one where the kept bit is even), then drop the low 20 bits
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    subnormal = (x + 24576.0) - 24576.0  # 1.5 * 2^14: its fp32 ulp is 2^-9, so the sum rounds x to a multiple of it
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@triton.jit
def stored(x, ptr):
    """x (fp32) as the tensor behind `ptr` holds it: clamped to +-448 and rounded first where that is float8_e4m3fn."""
    if ptr.dtype.element_ty == tl.float8e4nv:
        x = round_e4m3(tl.minimum(tl.maximum(x, -448.0), 448.0))
    return x.to(ptr.dtype.element_ty)


@triton.jit
def widened(tile, like, ONCE: tl.constexpr):
    """A tile read from an fp8 cache, widened to the dtype of `like` (the query) for the tensor-core dots.

    ONCE (a 16-bit dtype, compiled for a GPU): through an opaque move, so that Triton widens the tile once, in registers,
    and stages the 16-bit tile for the dot that reads it transposed. Without it Triton moves the conversion after the
    shared-memory read that builds each dot's operand, and Hopper's transposing read (`ldmatrix.trans`) takes only
    16-bit elements: the value product `P @ tile` then reads its fp8 operand one byte at a time (32 single-byte shared
    loads per 64 x 64 tile, and registers 64 -> 110 in `mla_decode`; egmla bench kernel-resources). Triton's CPU
    interpreter runs no inline assembly, hence the switch."""
    wide = tile.to(like.dtype)
    if ONCE:
        wide = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [wide], dtype=like.dtype, is_pure=False, pack=2)
    return wide


def widen_once_default(fp8_under_16_bit: bool, asked: bool | None) -> bool:
    """The launch's ONCE for `widened`: an fp8 cache under a 16-bit query, compiled for a GPU (not in Triton's CPU
    interpreter), unless an A/B asks for False."""
    if asked and not fp8_under_16_bit:
        raise ValueError("widen_once=True: only an fp8 cache read under a bf16 / fp16 query is widened")
    return fp8_under_16_bit and not interpreting() and asked is not False

