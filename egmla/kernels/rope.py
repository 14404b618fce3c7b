"""RoPE in one launch (reference: rope_ref.py; the model's PyTorch form: egmla/attention/rope.py).

The PyTorch rotation is four elementwise launches per tensor (a product, two addcmuls, a copy), and a decode step
rotates a query and a key in every layer: at batch 1 a CUDA-graph step is bound by its launches, so the decode
paths rotate through this kernel instead (inference only: no autograd). One program rotates BLOCK_R rows (one
(sequence, position, head) vector each) of any strides with a contiguous last dim, reading both halves before
writing either, so `out` may be `x` itself.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from egmla.kernels import block
from egmla.kernels.fp8 import stored


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, seq, heads, stride_xb, stride_xs, stride_xh,
                 stride_cb, stride_cs, stride_ob, stride_os, stride_oh,
                 HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    r_mask = rows < n_rows
    batch, position, head = rows // (seq * heads), (rows // heads) % seq, rows % heads
    offs_d = tl.arange(0, BLOCK_D)
    mask = r_mask[:, None] & (offs_d < HALF)[None, :]
    x = x_ptr + (batch * stride_xb + position * stride_xs + head * stride_xh)[:, None] + offs_d[None, :]
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    table = (batch * stride_cb + position * stride_cs)[:, None] + offs_d[None, :]
    cos = tl.load(cos_ptr + table, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + table, mask=mask, other=0.0)
    out = out_ptr + (batch * stride_ob + position * stride_os + head * stride_oh)[:, None] + offs_d[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(out, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(out + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


# the rotation as a function the append kernels call (latent_append.py, kv_append.py)
@triton.jit
def rotate(src, dst, mask, cos, sin, HALF: tl.constexpr):
    """RoPE's half-split rotation of the pairs at src (x1) and src + HALF (x2) into dst (may be src: both halves are
    read before either is written); cos / sin broadcast against the offsets."""
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, stored(x1 * cos - x2 * sin, dst), mask=mask)  # dst may be an fp8 cache
    tl.store(dst + HALF, stored(x2 * cos + x1 * sin, dst), mask=mask)


@triton.jit
def rotate_heads(x_row, stride_h, cos_row, sin_row, head0, HEADS: tl.constexpr, N_HEADS: tl.constexpr,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Heads head0 .. head0 + HEADS - 1 of one position's vectors (x_row + head * stride_h, pairs split in halves),
    rotated in place: the query's RoPE slice in the append kernels."""
    offs_h = tl.arange(0, BLOCK_H)
    heads = head0 + tl.arange(0, HEADS)
    mask = (heads < N_HEADS)[:, None] & (offs_h < HALF)[None, :]
    cos = tl.load(cos_row + offs_h, mask=offs_h < HALF, other=0.0)[None, :]
    sin = tl.load(sin_row + offs_h, mask=offs_h < HALF, other=0.0)[None, :]
    at = x_row + heads.to(tl.int64)[:, None] * stride_h + offs_h[None, :]
    rotate(at, at, mask, cos, sin, HALF)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`rope_ref(x, cos, sin)` for x [batch, seq, heads, D] or [batch, seq, D] (any strides, contiguous last dim)
    and cos, sin [batch, seq, D/2] fp32 (any strides, contiguous last dim); written into `out` (x's shape; x itself
    for an in-place rotation), else into a new tensor of x's dtype."""
    if x.shape[-1] % 2 or x.dim() not in (3, 4):
        raise ValueError(f"rope: x.shape={tuple(x.shape)}: expected [batch, seq, (heads,) D] with an even D")
    half = x.shape[-1] // 2
    batch, seq = x.shape[:2]
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != (batch, seq, half) or table.dtype != torch.float32 or table.stride(-1) != 1:
            raise ValueError(f"rope: {name} {tuple(table.shape)} {table.dtype}: expected fp32 [{batch}, {seq}, {half}] "
                             f"with a contiguous last dim")
    if cos.stride() != sin.stride():  # the kernel reads both at one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x) if out is None else out
    if tuple(out.shape) != tuple(x.shape) or x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError(f"rope: x {tuple(x.shape)} and out {tuple(out.shape)} need one shape and a contiguous last dim")
    heads = x.shape[2] if x.dim() == 4 else 1
    x_strides = (*x.stride()[:2], x.stride(2) if x.dim() == 4 else 0)
    o_strides = (*out.stride()[:2], out.stride(2) if out.dim() == 4 else 0)
    n_rows = batch * seq * heads
    if n_rows:
        block_r = 16
        _rope_kernel[(triton.cdiv(n_rows, block_r),)](x, cos, sin, out, n_rows, seq, heads, *x_strides,
                                                       cos.stride(0), cos.stride(1), *o_strides, HALF=half,
                                                       BLOCK_R=block_r, BLOCK_D=block(half), num_warps=4)
    return out
