"""MLA's cache append in one launch (reference: latent_append_ref.py).

A cached MLA call normalises the new latents (RMSNorm), rotates their RoPE keys and writes both into the cache:
four launches per layer in PyTorch (the norm, the rotation, one index write per buffer). A CUDA-graph decode step
at small batch is bound by its launches (~2.5 µs each on an H200: docs/bench/ab_h200_launch_diet/), so a cached
call without autograd on a GPU does all four in this one (egmla/attention/mla.py). One program per new position:
it reads the position's row of the down-projection [c ; k^R] once and writes the cache rows at its position.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from egmla.kernels import block


@triton.jit
def _latent_append_kernel(proj_ptr, w_ptr, cos_ptr, sin_ptr, pos_ptr, latent_ptr, k_rope_ptr, out_ptr, seq, eps,
                          stride_pb, stride_ps, stride_cb, stride_cs, stride_qb, stride_qs,
                          stride_lb, stride_lt, stride_kb, stride_kt, stride_ob, stride_os,
                          D_C: tl.constexpr, HALF: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                          HAS_WEIGHT: tl.constexpr, HAS_OUT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    batch, s = row // seq, row % seq
    position = tl.load(pos_ptr + batch * stride_qb + s * stride_qs).to(tl.int64)
    proj = proj_ptr + batch * stride_pb + s * stride_ps
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < D_C
    c = tl.load(proj + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    normed = c * tl.rsqrt(tl.sum(c * c, axis=0) / D_C + eps)
    if HAS_WEIGHT:
        normed = normed * tl.load(w_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(latent_ptr + batch * stride_lb + position * stride_lt + offs_c,
             normed.to(latent_ptr.dtype.element_ty), mask=c_mask)
    if HAS_OUT:  # the new latents themselves, for a caller that derives more from them (EG-MLA's norm statistics)
        tl.store(out_ptr + batch * stride_ob + s * stride_os + offs_c, normed.to(out_ptr.dtype.element_ty), mask=c_mask)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < HALF
    x1 = tl.load(proj + D_C + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    x2 = tl.load(proj + D_C + HALF + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + batch * stride_cb + s * stride_cs + offs_h, mask=h_mask, other=0.0)
    sin = tl.load(sin_ptr + batch * stride_cb + s * stride_cs + offs_h, mask=h_mask, other=0.0)
    k_out = k_rope_ptr + batch * stride_kb + position * stride_kt
    dtype = k_rope_ptr.dtype.element_ty
    tl.store(k_out + offs_h, (x1 * cos - x2 * sin).to(dtype), mask=h_mask)
    tl.store(k_out + HALF + offs_h, (x2 * cos + x1 * sin).to(dtype), mask=h_mask)


def latent_append(projected: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                  sin: torch.Tensor, positions: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                  keep_latent: bool = False) -> torch.Tensor | None:
    """`latent_append_ref`: projected [batch, seq, d_c + d_r] (any strides, contiguous last dim), weight [d_c] or
    None, cos / sin [batch, seq, d_r / 2] fp32 (one set of strides, contiguous last dim), positions [batch, seq]
    integer and inside the buffers (the model clamps or checks them), latent [batch, T, d_c] and k_rope [batch, T,
    d_r] (the cache's buffers, contiguous last dim). keep_latent: also return the new latents [batch, seq, d_c] in
    the cache's dtype, written by the same launch."""
    batch, seq, width = projected.shape
    d_c, d_r = latent.shape[-1], k_rope.shape[-1]
    if width != d_c + d_r or d_r % 2 or projected.stride(-1) != 1:
        raise ValueError(f"latent_append: projected {tuple(projected.shape)} must be [batch, seq, d_c + d_r = "
                         f"{d_c} + {d_r}] with an even d_r and a contiguous last dim")
    for name, t in (("latent", latent), ("k_rope", k_rope)):
        if t.shape[0] != batch or t.stride(-1) != 1:
            raise ValueError(f"latent_append: {name} {tuple(t.shape)} must hold the batch's {batch} rows with a "
                             f"contiguous last dim")
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != (batch, seq, d_r // 2) or table.dtype != torch.float32 or table.stride(-1) != 1:
            raise ValueError(f"latent_append: {name} {tuple(table.shape)} {table.dtype}: expected fp32 [{batch}, "
                             f"{seq}, {d_r // 2}] with a contiguous last dim")
    if cos.stride() != sin.stride():  # the kernel reads both at one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    if tuple(positions.shape) != (batch, seq) or positions.dtype.is_floating_point:
        raise ValueError(f"latent_append: positions {tuple(positions.shape)} {positions.dtype}: expected integer "
                         f"[{batch}, {seq}]")
    out = latent.new_empty(batch, seq, d_c) if keep_latent else None
    written = out if keep_latent else latent  # (not written without keep_latent: any pointer will do)
    if batch * seq:
        _latent_append_kernel[(batch * seq,)](
            projected, weight if weight is not None else projected, cos, sin, positions, latent, k_rope, written,
            seq, eps, projected.stride(0), projected.stride(1), cos.stride(0), cos.stride(1), positions.stride(0),
            positions.stride(1), latent.stride(0), latent.stride(1), k_rope.stride(0), k_rope.stride(1),
            written.stride(0), written.stride(1),
            D_C=d_c, HALF=d_r // 2, BLOCK_C=block(d_c), BLOCK_H=block(d_r // 2), HAS_WEIGHT=weight is not None,
            HAS_OUT=keep_latent, num_warps=1 if d_c <= 256 else 4)
    return out
