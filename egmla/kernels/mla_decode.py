"""MLA absorbed decode in Triton: flash-decoding over the latent cache (reference: mla_decode_ref.py).

All heads of a sequence share the cached latent, so one program holds every head of one sequence
([heads, d_c] query tile) and streams a contiguous piece of that sequence's cache once:

    s = (Q_latent C^T + Q_pe K_rope^T) * scale       [heads, BLOCK_T]   (two tensor-core dots)
    online softmax over t,  acc += P C               [heads, d_c]

The bytes that must move are the cache, (d_c + d_r) elements per position; the dots are tiny, so
the kernel is bandwidth-bound and the split count only has to put enough loads in flight.
Lengths are ragged: sequence b reads positions [0, lengths[b]) of a [batch, T, ...] buffer.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from egmla.kernels import block, rows
from egmla.kernels.fp8 import widen_once_default, widened
from egmla.kernels.pdl import launch_flags, wait as pdl_wait
from egmla.kernels.split_combine import (choose_num_splits, combine_splits, launch_first_fitting, partial_buffers,
                                         split_range)

LOG2E = math.log2(math.e)


@triton.jit
def _mla_decode_kernel(
    q_latent_ptr, q_pe_ptr, latent_ptr, k_rope_ptr, lengths_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_lb, stride_lt, stride_kb, stride_kt,
    stride_ob, stride_oh, max_len, num_splits, qk_scale,
    N_HEADS: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ONE_SPLIT: tl.constexpr, PDL: tl.constexpr, FP16_DOTS: tl.constexpr = False,
    WIDEN_ONCE: tl.constexpr = False, ROPE_FP16: tl.constexpr = False,
):
    pdl_wait(PDL)  # the query and the cache row come from the kernels right before
    split = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements at large batch
    length = tl.minimum(tl.load(lengths_ptr + batch).to(tl.int32), max_len)
    start, end = split_range(length, split, num_splits, BLOCK_T)

    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    h_mask, c_mask, r_mask = offs_h < N_HEADS, offs_c < D_C, offs_r < D_R
    q = tl.load(q_latent_ptr + batch * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                mask=h_mask[:, None] & c_mask[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + batch * stride_pb + offs_h[:, None] * stride_ph + offs_r[None, :],
                   mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    if FP16_DOTS:  # an fp8 cache under a 16-bit query: fp8 widens to fp16 in one instruction, to bf16 in two
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    if ROPE_FP16:  # the RoPE keys in fp8 too (fp8-keep-rope keeps them in the query's dtype: that dot stays in it)
        q_pe = tl.minimum(tl.maximum(q_pe.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    latent_base = latent_ptr + batch * stride_lb
    k_rope_base = k_rope_ptr + batch * stride_kb

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < end
        # an fp8 cache is widened to the query's dtype as it is read (a no-op for a cache of that dtype); the latent
        # tile feeds both dots, the value product's transposed (fp8.widened says why it is widened ONCE)
        c_tile = widened(tl.load(latent_base + offs_t[:, None] * stride_lt + offs_c[None, :],
                                 mask=t_mask[:, None] & c_mask[None, :], other=0.0), q, WIDEN_ONCE)
        r_tile = tl.load(k_rope_base + offs_t[:, None] * stride_kt + offs_r[None, :],
                         mask=t_mask[:, None] & r_mask[None, :], other=0.0).to(q_pe.dtype)
        s = tl.dot(q, tl.trans(c_tile), input_precision=DOT_PRECISION)
        s += tl.dot(q_pe, tl.trans(r_tile), input_precision=DOT_PRECISION)
        s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))  # log2 domain: exp2 below
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c_tile.dtype), c_tile, input_precision=DOT_PRECISION)
        m_i = m_new

    out_ptrs = out_ptr + batch * stride_ob + offs_h[:, None] * stride_oh + offs_c[None, :]
    hc_mask = h_mask[:, None] & c_mask[None, :]
    if ONE_SPLIT:
        y = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=hc_mask)
    else:
        rows = (batch * num_splits + split) * N_HEADS + offs_h
        tl.store(part_acc_ptr + rows[:, None] * D_C + offs_c[None, :], acc, mask=hc_mask)
        tl.store(part_ml_ptr + rows * 2, m_i, mask=h_mask)
        tl.store(part_ml_ptr + rows * 2 + 1, l_i, mask=h_mask)


def _check_decode_inputs(queries: dict[str, torch.Tensor], cache: dict[str, torch.Tensor],
                         lengths: torch.Tensor) -> tuple[int, int, int]:
    """Shapes: queries [batch, heads, dim], cache [batch, T, dim], lengths [batch]. Returns (batch, heads, T)."""
    batch, heads = next(iter(queries.values())).shape[:2]
    max_len = next(iter(cache.values())).shape[1]
    for name, x in queries.items():
        if x.dim() != 3 or x.shape[:2] != (batch, heads):
            raise ValueError(f"{name}.shape={tuple(x.shape)}: expected [batch={batch}, heads={heads}, dim]")
    for name, x in cache.items():
        if x.shape[:2] != (batch, max_len) or x.stride(-1) != 1:
            raise ValueError(f"{name}.shape={tuple(x.shape)}: expected [batch={batch}, T={max_len}, ...] "
                             f"with a contiguous last dim (call .contiguous())")
    if lengths.shape != (batch,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths: shape {tuple(lengths.shape)}, dtype {lengths.dtype}: expected int32/int64 [{batch}]")
    return batch, heads, max_len


def _output(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape or out.stride(-1) != 1 or out.device != like.device:
        raise ValueError(f"out.shape={tuple(out.shape)} on {out.device}: expected {shape} on {like.device}, "
                         f"contiguous last dim")
    return out


# block_t of the launch: the first is the fastest on the H100 (paper-base, B=32, T=4096, docs/kernels.md);
# the smaller ones are used where a wide latent or fp32 needs more shared memory than there is. Three pipeline
# stages (num_stages) beat two by 5-18% on the H200 at B = 8-128, T = 4,096-16,384 (docs/kernels.md, 2026-12-03).
BLOCK_TS = [64, 32, 16]
# fp8-keep-rope (the latent in fp8, k_rope in the query's dtype) is fastest in tiles of 128 at B = 32, T = 4,096 and
# B = 128, T = 16,384 (1.01x and 1.21x the tiles of 64 on the H100; docs/bench/fp8_keep_rope_h100)
KEEP_ROPE_BLOCK_TS = [128, *BLOCK_TS]


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
               lengths: torch.Tensor, scale: float, num_splits: int | None = None, block_t: int | None = None,
               num_warps: int = 4, num_stages: int = 3, out: torch.Tensor | None = None,
               widen_once: bool | None = None) -> torch.Tensor:
    """o_latent [batch, heads, d_c] (dtype of q_latent) for q_latent [batch, heads, d_c], q_pe [batch, heads, d_r],
    latent [batch, T, d_c], k_rope [batch, T, d_r], lengths [batch] (positions read: [0, min(len, T))). The cache may
    be float8_e4m3fn (an fp8 KV cache, egmla.attention.cache; or its latent alone, fp8-keep-rope, or its k_rope alone, a
    measurement): each tile is widened to the query's dtype as it is read
    (`widen_once`: None = once per tile in registers wherever that compiles, egmla.kernels.fp8.widened; False = where
    Triton places it, for A/Bs).

    Same function as `mla_decode_ref`; the cache tensors may be views of a longer buffer. `out`, if given,
    receives the result (tests poison it to check that every element is written)."""
    batch, heads, max_len = _check_decode_inputs({"q_latent": q_latent, "q_pe": q_pe},
                                                 {"latent": latent, "k_rope": k_rope}, lengths)
    q_latent, q_pe = rows(q_latent), rows(q_pe)
    d_c, d_r = latent.shape[-1], k_rope.shape[-1]
    out = _output(out, (batch, heads, d_c), q_latent)

    def launch(tile):
        splits = num_splits or choose_num_splits(batch, 1, max_len, tile, latent.device)
        part_acc, part_ml = partial_buffers(batch, splits, heads, d_c, latent.device) if splits > 1 else (out, out)
        _mla_decode_kernel[(splits, batch)](
            q_latent, q_pe, latent, k_rope, lengths, out, part_acc, part_ml,
            q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1),
            latent.stride(0), latent.stride(1), k_rope.stride(0), k_rope.stride(1),
            out.stride(0), out.stride(1), max_len, splits, scale * LOG2E,
            N_HEADS=heads, D_C=d_c, D_R=d_r, BLOCK_H=block(heads), BLOCK_C=block(d_c), BLOCK_R=block(d_r),
            BLOCK_T=tile, DOT_PRECISION="ieee" if q_latent.dtype == torch.float32 else "tf32",
            ONE_SPLIT=splits == 1, FP16_DOTS=fp16_dots, WIDEN_ONCE=once, ROPE_FP16=fp16_dots and k_rope_fp8,
            num_warps=num_warps, num_stages=num_stages, **launch_flags(latent.device))
        if splits > 1:
            combine_splits(part_acc, part_ml, out)
        return out

    # an fp8 cache with a bf16 / fp16 query: the dots in fp16 (q clamped to fp16's range; fp16's mantissa is wider
    # than bf16's). Per layer on an H100 this took 287 against 370 us (B = 1,024, T = 4,096) and 202 against 238 us
    # (B = 128, T = 16,384) for dots in bf16, whose every fp8 element widens in two conversions (docs/inference.md)
    fp16_dots = latent.dtype == torch.float8_e4m3fn and q_latent.element_size() == 2
    k_rope_fp8 = k_rope.dtype == torch.float8_e4m3fn
    once = widen_once_default(fp16_dots, widen_once)
    keep_rope = fp16_dots and not k_rope_fp8
    tiles = [block_t] if block_t else KEEP_ROPE_BLOCK_TS if keep_rope else BLOCK_TS
    return launch_first_fitting(("mla", latent.dtype, k_rope.dtype, once, heads, d_c, d_r, tuple(tiles)), tiles, launch)
