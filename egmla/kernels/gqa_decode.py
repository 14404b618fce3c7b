"""MHA / GQA / MQA decode in Triton: flash-decoding over the K/V cache (reference: gqa_decode_ref.py).

One query token per sequence. The query heads that share a KV head read the same K/V, so one program
holds all of them ([group, head_dim] query tile) and streams a contiguous piece of that KV head's cache:

    s = Q K^T * scale            [group, BLOCK_T]     online softmax over t,   acc += P V   [group, head_dim]

The cache stays in its [batch, T, kv_heads, head_dim] layout (read with strides, never copied), lengths
are ragged (sequence b reads positions [0, lengths[b])), and the context is split across programs as in
the latent kernels, so a batch of one still fills the GPU. The bytes that must move are the cache, 2
head_dim elements per position and KV head: the kernel is bandwidth-bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from egmla.kernels import block, rows
from egmla.kernels.fp8 import widen_once_default, widened
from egmla.kernels.pdl import launch_flags, wait as pdl_wait
from egmla.kernels.mla_decode import LOG2E, _output
from egmla.kernels.split_combine import (choose_num_splits, combine_splits, launch_first_fitting, partial_buffers,
                                         split_range)


@triton.jit
def _gqa_decode_kernel(
    q_ptr, k_ptr, v_ptr, lengths_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_oh, max_len, num_splits, qk_scale,
    N_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ONE_SPLIT: tl.constexpr, PDL: tl.constexpr, FP16_DOTS: tl.constexpr = False,
    WIDEN_ONCE: tl.constexpr = False,
):
    pdl_wait(PDL)  # the query and the cache row come from the kernels right before
    split = tl.program_id(0)
    kv_head = tl.program_id(1) % N_KV_HEADS
    batch = (tl.program_id(1) // N_KV_HEADS).to(tl.int64)  # offsets past 2^31 elements at large batch
    length = tl.minimum(tl.load(lengths_ptr + batch).to(tl.int32), max_len)
    start, end = split_range(length, split, num_splits, BLOCK_T)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask, d_mask = offs_g < GROUP, offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g  # the query heads of this KV head
    q = tl.load(q_ptr + batch * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if FP16_DOTS:  # an fp8 cache under a 16-bit query: fp8 widens to fp16 in one instruction, to bf16 in two
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < end
        tile_mask = t_mask[:, None] & d_mask[None, :]
        # an fp8 cache is widened to the query's dtype as it is read (a no-op for a cache of that dtype); V feeds the
        # value product transposed (fp8.widened says why it is widened ONCE)
        k_tile = tl.load(k_base + offs_t[:, None] * stride_kt + offs_d[None, :], mask=tile_mask, other=0.0).to(q.dtype)
        v_tile = widened(tl.load(v_base + offs_t[:, None] * stride_vt + offs_d[None, :], mask=tile_mask, other=0.0),
                         q, WIDEN_ONCE)
        s = tl.dot(q, tl.trans(k_tile), input_precision=DOT_PRECISION)
        s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))  # log2 domain: exp2 below
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
        m_i = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    if ONE_SPLIT:
        y = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + batch * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        rows = (batch * num_splits + split) * N_HEADS + heads
        tl.store(part_acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
        tl.store(part_ml_ptr + rows * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + rows * 2 + 1, l_i, mask=g_mask)


# block_t of the launch: the first that fits (a wide head dim in fp32 needs more shared memory)
BLOCK_TS = [64, 32, 16]


def launch_defaults(k_dtype: torch.dtype, v_dtype: torch.dtype) -> dict:
    """The launch of a call that names none: block_ts (the first that fits), num_warps, num_stages. fp8-keep-rope (K
    in a 16-bit query's dtype, V in fp8) is fastest in tiles of 128, 8 warps, 3 stages at B = 32, T = 4,096 and B = 128,
    T = 16,384 (1.28x and 1.10x the others' setting on the H100; docs/bench/fp8_keep_rope_h100)."""
    fp8 = torch.float8_e4m3fn
    if k_dtype in (torch.bfloat16, torch.float16) and v_dtype == fp8:
        return {"block_ts": [128, *BLOCK_TS], "num_warps": 8, "num_stages": 3}
    return {"block_ts": BLOCK_TS, "num_warps": 4, "num_stages": 2}


def gqa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
               num_splits: int | None = None, block_t: int | None = None, num_warps: int | None = None,
               num_stages: int | None = None, out: torch.Tensor | None = None,
               widen_once: bool | None = None) -> torch.Tensor:
    """o [batch, heads, head_dim] (dtype of q) for q [batch, heads, head_dim] and the cache k, v
    [batch, T, kv_heads, head_dim] (contiguous last dim; may be views of a longer buffer; float8_e4m3fn for an fp8
    cache, widened as it is read: the dots in fp16 under a 16-bit q, V once per tile in registers unless `widen_once`
    is False, egmla.kernels.fp8.widened; V alone in fp8 for fp8-keep-rope, its dots in q's dtype), lengths [batch]:
    query head h reads KV head h // (heads // kv_heads), positions [0, min(lengths[b], T)). Launch settings not
    given take `launch_defaults` of the cache's dtypes.
    Same function as `gqa_decode_ref`; `out`, if given, receives the result."""
    batch, heads, head_dim = q.shape
    max_len, kv_heads = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != batch or k.shape[-1] != head_dim or heads % kv_heads:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)}: expected both [batch={batch}, T, kv_heads, "
                         f"head_dim={head_dim}] with kv_heads dividing heads={heads}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v need a contiguous last dim (head_dim)")
    if lengths.shape != (batch,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths: shape {tuple(lengths.shape)}, dtype {lengths.dtype}: expected int32/int64 [{batch}]")
    q = rows(q)
    group = heads // kv_heads
    out = _output(out, (batch, heads, head_dim), q)

    def launch(tile):
        splits = num_splits or choose_num_splits(batch * kv_heads, 1, max_len, tile, k.device)
        part_acc, part_ml = partial_buffers(batch, splits, heads, head_dim, k.device) if splits > 1 else (out, out)
        _gqa_decode_kernel[(splits, batch * kv_heads)](
            q, k, v, lengths, out, part_acc, part_ml,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), max_len, splits, scale * LOG2E,
            N_HEADS=heads, N_KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_G=block(group),
            BLOCK_D=block(head_dim), BLOCK_T=tile, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            ONE_SPLIT=splits == 1, FP16_DOTS=fp16_dots, WIDEN_ONCE=once, num_warps=num_warps, num_stages=num_stages,
            **launch_flags(k.device))
        if splits > 1:
            combine_splits(part_acc, part_ml, out)
        return out

    fp8 = torch.float8_e4m3fn
    fp16_dots = k.dtype == fp8 and v.dtype == fp8 and q.element_size() == 2  # as mla_decode's
    # fp8-keep-rope: K in the query's dtype, V in fp8 (its dots in the query's dtype, V still widened once)
    once = widen_once_default(v.dtype == fp8 and q.element_size() == 2, widen_once)
    defaults = launch_defaults(k.dtype, v.dtype)
    num_warps, num_stages = num_warps or defaults["num_warps"], num_stages or defaults["num_stages"]
    tiles = [block_t] if block_t else defaults["block_ts"]
    return launch_first_fitting(("gqa", k.dtype, v.dtype, once, heads, kv_heads, head_dim, tuple(tiles), num_warps,
                                 num_stages), tiles, launch)
