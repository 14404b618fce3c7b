"""An fp8 KV cache's one rule for the kernels that write it: saturate, then round to nearest even (reference:
`quantize` in egmla/attention/cache.py). float8_e4m3fn has no infinity, so a value past its largest finite value (448)
is clamped to it before the cast rather than left to the conversion. The rounding is done here, in fp32, so that the
cast itself is exact: Triton's CPU interpreter rounds fp32 -> fp8 wrongly (1.99 -> 1.0: it drops the carry into the
exponent; ties round up), and the tests run the kernels there."""
from __future__ import annotations

import triton
import triton.language as tl


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
