"""MHA / GQA's cache append in one launch (reference: kv_append_ref.py).

A cached MHA call rotates the new query and key (RoPE) and writes the key and value into the cache: four launches
per layer in PyTorch or the RoPE kernel (two rotations, one index write per buffer), after three GEMMs for q, k and
v. A CUDA-graph decode step at small batch is bound by its launches, so a cached call without autograd on a GPU
takes one GEMM for [q ; k ; v] (egmla/attention/mha.py) and this one launch for the rest, as MLA's step does
(latent_append.py). One program per new position: its query heads rotated in place, its key heads rotated into the
cache's row at its position, its value heads copied there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from egmla.kernels import block
from egmla.kernels.fp8 import stored
from egmla.kernels.rope import rotate, rotate_heads


@triton.jit
def _kv_append_kernel(q_ptr, k_new_ptr, v_new_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, seq,
                      stride_qb, stride_qs, stride_qh, stride_nb, stride_ns, stride_nh, stride_mb, stride_ms,
                      stride_mh, stride_cb, stride_cs, stride_pb, stride_ps, stride_kb, stride_kt, stride_kh,
                      stride_vb, stride_vt, stride_vh,
                      N_HEADS: tl.constexpr, N_KV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    batch, s = row // seq, row % seq
    position = tl.load(pos_ptr + batch * stride_pb + s * stride_ps).to(tl.int64)
    cos_row, sin_row = cos_ptr + batch * stride_cb + s * stride_cs, sin_ptr + batch * stride_cb + s * stride_cs
    rotate_heads(q_ptr + batch * stride_qb + s * stride_qs, stride_qh, cos_row, sin_row, 0, BLOCK_Q, N_HEADS, HALF,
                 BLOCK_HALF)
    heads = tl.arange(0, BLOCK_KV).to(tl.int64)
    offs_half = tl.arange(0, BLOCK_HALF)
    mask = (heads < N_KV)[:, None] & (offs_half < HALF)[None, :]
    cos = tl.load(cos_row + offs_half, mask=offs_half < HALF, other=0.0)[None, :]
    sin = tl.load(sin_row + offs_half, mask=offs_half < HALF, other=0.0)[None, :]
    k_src = k_new_ptr + batch * stride_nb + s * stride_ns + heads[:, None] * stride_nh + offs_half[None, :]
    k_dst = k_ptr + batch * stride_kb + position * stride_kt + heads[:, None] * stride_kh + offs_half[None, :]
    rotate(k_src, k_dst, mask, cos, sin, HALF)
    offs_d = tl.arange(0, BLOCK_D)
    v_mask = (heads < N_KV)[:, None] & (offs_d < D)[None, :]
    v = tl.load(v_new_ptr + batch * stride_mb + s * stride_ms + heads[:, None] * stride_mh + offs_d[None, :],
                mask=v_mask, other=0.0)
    tl.store(v_ptr + batch * stride_vb + position * stride_vt + heads[:, None] * stride_vh + offs_d[None, :],
             stored(v.to(tl.float32), v_ptr), mask=v_mask)  # v_ptr may be an fp8 cache


def kv_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """`kv_append_ref`: q [batch, seq, heads, D], k and v [batch, seq, kv_heads, D] (any strides, contiguous last
    dim: e.g. views of one [q ; k ; v] product), cos / sin [batch, seq, D / 2] fp32 (one set of strides, contiguous
    last dim), positions [batch, seq] integer and inside the cache (the model clamps or checks them), k_cache and
    v_cache [batch, T, kv_heads, D] (contiguous last dim). q is rotated in place; the rotated k and v land at each
    sequence's positions."""
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    problems = [text for bad, text in (
        (dim % 2 or q.stride(-1) != 1, f"q {tuple(q.shape)}: expected an even head dim and a contiguous last dim"),
        *((t.dim() != 4 or tuple(t.shape[:2]) != (batch, seq) or t.shape[2] != kv_heads or t.shape[3] != dim
           or t.stride(-1) != 1, f"{name} {tuple(t.shape)}: expected [{batch}, {seq}, {kv_heads}, {dim}] with a "
                                  f"contiguous last dim") for name, t in (("v", v), ("k", k))),
        *((t.dim() != 4 or t.shape[0] != batch or tuple(t.shape[2:]) != (kv_heads, dim) or t.stride(-1) != 1,
           f"{name} {tuple(t.shape)}: expected [{batch}, T, {kv_heads}, {dim}] with a contiguous last dim")
          for name, t in (("k_cache", k_cache), ("v_cache", v_cache))),
        *((tuple(t.shape) != (batch, seq, dim // 2) or t.dtype != torch.float32 or t.stride(-1) != 1,
           f"{name} {tuple(t.shape)} {t.dtype}: expected fp32 [{batch}, {seq}, {dim // 2}] with a contiguous last "
           f"dim") for name, t in (("cos", cos), ("sin", sin))),
        (tuple(positions.shape) != (batch, seq) or positions.dtype.is_floating_point,
         f"positions {tuple(positions.shape)} {positions.dtype}: expected integer [{batch}, {seq}]"),
    ) if bad]
    if problems:
        raise ValueError("kv_append: " + "; ".join(problems))
    if cos.stride() != sin.stride():  # the kernel reads both at one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    if batch * seq:
        _kv_append_kernel[(batch * seq,)](
            q, k, v, cos, sin, positions, k_cache, v_cache, seq, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            cos.stride(0), cos.stride(1), positions.stride(0), positions.stride(1), *k_cache.stride()[:3],
            *v_cache.stride()[:3],
            N_HEADS=heads, N_KV=kv_heads, D=dim, HALF=dim // 2, BLOCK_Q=block(heads), BLOCK_KV=block(kv_heads),
            BLOCK_HALF=block(dim // 2), BLOCK_D=block(dim), num_warps=4)
