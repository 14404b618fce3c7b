"""The decode step's residual add + RMSNorm and SwiGLU's activation, one launch each (reference:
decode_elementwise_ref.py). In PyTorch they are two launches each per layer (add, then the norm; silu, then the
product), and a CUDA-graph decode step at small batch is bound by its launches, so a step without autograd on a GPU
takes these instead (egmla/model.py: `residual_rms_norm`, `SwiGLU`). Each program handles BLOCK_R rows of the
last dim; every intermediate is rounded to the tensors' dtype where the PyTorch ops round it, so the results
match theirs up to the order of the fp32 sum of squares.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from egmla.kernels import block


@triton.jit
def _add_rms_norm_kernel(x_ptr, y_ptr, w_ptr, sum_ptr, out_ptr, n_rows, eps, stride_x, stride_y, stride_s, stride_o,
                         DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (offs < DIM)[None, :]
    dtype = sum_ptr.dtype.element_ty
    x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=mask, other=0.0)
    y = tl.load(y_ptr + rows[:, None] * stride_y + offs[None, :], mask=mask, other=0.0)
    total = (x.to(tl.float32) + y.to(tl.float32)).to(dtype)  # the residual stream, rounded as x + y is
    tl.store(sum_ptr + rows[:, None] * stride_s + offs[None, :], total, mask=mask)
    t = total.to(tl.float32)
    normed = t * tl.rsqrt(tl.sum(t * t, axis=1) / DIM + eps)[:, None]
    if HAS_WEIGHT:
        normed = normed * tl.load(w_ptr + offs, mask=offs < DIM, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_o + offs[None, :], normed.to(dtype), mask=mask)


@triton.jit
def _silu_mul_kernel(a_ptr, b_ptr, out_ptr, n_rows, stride_a, stride_b, stride_o, DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < DIM
    dtype = out_ptr.dtype.element_ty
    a = tl.load(a_ptr + row * stride_a + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * stride_b + offs, mask=mask, other=0.0).to(tl.float32)
    activated = (a * tl.sigmoid(a)).to(dtype).to(tl.float32)  # F.silu's result, rounded, then the product
    tl.store(out_ptr + row * stride_o + offs, (activated * b).to(dtype), mask=mask)


def _as_rows(name: str, t: torch.Tensor, dim: int) -> torch.Tensor:
    if t.shape[-1] != dim or t.stride(-1) != 1:
        raise ValueError(f"{name}.shape={tuple(t.shape)}: expected last dim {dim}, contiguous")
    return t.reshape(-1, dim)  # a view for the model's [batch, seq, dim] activations


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm_ref`: (x + y, RMSNorm(x + y)) for x, y [..., dim] of one dtype, weight [dim] or None."""
    dim = x.shape[-1]
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: y {tuple(y.shape)} {y.dtype} must match x {tuple(x.shape)} {x.dtype}")
    x2, y2 = _as_rows("x", x, dim), _as_rows("y", y, dim)
    total, out = torch.empty_like(x2), torch.empty_like(x2)
    block_r = 4
    _add_rms_norm_kernel[(triton.cdiv(x2.shape[0], block_r),)](
        x2, y2, weight if weight is not None else x2, total, out, x2.shape[0], eps, x2.stride(0), y2.stride(0),
        total.stride(0), out.stride(0), DIM=dim, BLOCK_D=block(dim), BLOCK_R=block_r, HAS_WEIGHT=weight is not None,
        num_warps=4)
    return total.view(x.shape), out.view(x.shape)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`silu_mul_ref`: silu(a) * b for a, b [..., dim] of one shape and dtype."""
    dim = a.shape[-1]
    if b.shape != a.shape or b.dtype != a.dtype:
        raise ValueError(f"silu_mul: b {tuple(b.shape)} {b.dtype} must match a {tuple(a.shape)} {a.dtype}")
    a2, b2 = _as_rows("a", a, dim), _as_rows("b", b, dim)
    out = torch.empty_like(a2)
    block_d = min(1024, block(dim))
    _silu_mul_kernel[(a2.shape[0], triton.cdiv(dim, block_d))](a2, b2, out, a2.shape[0], a2.stride(0), b2.stride(0),
                                                                out.stride(0), DIM=dim, BLOCK_D=block_d, num_warps=4)
    return out.view(a.shape)
