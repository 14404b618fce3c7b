"""EG-MLA decode grouped by token id in one launch whose intermediates stay in L2 (issue 17; reference:
grouped_decode_ref.py; math: docs/grouped-decode.md).

The three launches of grouped_decode.py pass the absorbed queries A (a row per (sequence, distinct id)) and the
value sums S (a row per (chunk, id)) through HBM from one launch to the next: about two thirds of their traffic.
Here one program takes RANGE consecutive positions of one sequence in the plan's grouped order and runs the three
phases on them in turn. It writes A and S rows to the same buffers as the three launches, but reads them back itself
a few microseconds later, from L2; a barrier orders the phases:

  1 absorb   a_{h,v} for the slots (distinct ids) its positions hold, every head, W^K_h read once per head
  2 attend   its chunks of BLOCK_T positions, exactly the attend launch's work (`attend_chunk`): chunk softmax
             statistics and one S row per (chunk, id)
  3 upproj   its rows rescaled to its own running max, up-projected and gated in the gate-dot form
             (sum_r g^V_r ⊙ W^V_h s_r = rowsum(W^V_h ⊙ sum_r (scale_r g^V_r) s_r^T)): an unnormalised partial output
             per (sequence, range, head) with the range's softmax max, denominator and mean term
  combine    (a second launch) the ranges merged as in flash-decoding, then gamma^V, the mean term and beta^V.

A slot whose positions straddle two ranges is absorbed by both (the same numbers written twice); every S row and
chunk belongs to one range (RANGE is a multiple of the plan's chunk). Not the model's path: measured 3.3–3.9×
slower than the three launches on an H200 at every shape and range size (docs/grouped-decode.md, "One launch with the
intermediates in L2": the phases in series per program leave their latency exposed).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from egmla.kernels import block
from egmla.kernels.grouped_decode import GroupedPlan, _check_inputs, attend_chunk, store_value_output
from egmla.kernels.mla_decode import LOG2E, _output


@triton.jit
def _scratch_kernel(order_ptr, order_slots_ptr, lengths_ptr, ids_ptr, row_chunk_ptr, row_ids_ptr,
                    latent_ptr, k_rope_ptr, stats_ptr, q_ptr, q_pe_ptr, weight_ptr, bias_ptr, gate_ptr, wkv_b_ptr,
                    a_ptr, q_sum_ptr, q_bias_ptr, s_ptr, chunk_ptr, part_o_ptr, part_stats_ptr,
                    stride_ob, stride_ib, stride_cb, stride_lb, stride_lt, stride_kb, stride_kt, stride_tb, stride_tt,
                    stride_qb, stride_qh, stride_pb, stride_ph, stride_g, stride_w, stride_ab, stride_au,
                    stride_rb, stride_ru, n_chunks, n_ranges, qk_scale,
                    N_HEADS: tl.constexpr, D_N: tl.constexpr, D_V: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, RANGE: tl.constexpr, BLOCK_U: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    rng = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements at large batch
    length = tl.load(lengths_ptr + batch)
    offs_h, offs_v = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_V)
    h_mask, v_mask = offs_h < N_HEADS, offs_v < D_V
    part = (batch * n_ranges + rng) * N_HEADS
    p_lo = rng * RANGE
    if p_lo >= length:  # nothing here: weight 0 in the combine
        tl.store(part_stats_ptr + (part + offs_h) * 3, tl.full([BLOCK_H], float("-inf"), tl.float32), mask=h_mask)
        tl.store(part_stats_ptr + (part + offs_h) * 3 + 1, tl.zeros([BLOCK_H], tl.float32), mask=h_mask)
        tl.store(part_stats_ptr + (part + offs_h) * 3 + 2, tl.zeros([BLOCK_H], tl.float32), mask=h_mask)
        tl.store(part_o_ptr + (part + offs_h[:, None]) * BLOCK_V + offs_v[None, :],
                 tl.zeros([BLOCK_H, BLOCK_V], tl.float32), mask=h_mask[:, None])
        return
    p_hi = tl.minimum(p_lo + RANGE, length)
    slot_lo = tl.load(order_slots_ptr + batch * stride_ob + p_lo)
    slot_hi = tl.load(order_slots_ptr + batch * stride_ob + p_hi - 1)
    width: tl.constexpr = D_N + D_V
    offs_n, offs_c = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_C)
    n_mask, c_mask = offs_n < D_N, offs_c < D_C

    # phase 1: a_{h,v} = W^K_h^T (gamma^K_h ⊙ q^C_h ⊙ g^K_{h,v}) for slots [slot_lo, slot_hi], and the per-head
    # query terms the attend phase reads (every program of the sequence writes the same values)
    for head in tl.static_range(N_HEADS):
        q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        gq = q
        if HAS_WEIGHT:
            gq = q * tl.load(weight_ptr + head * width + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        q_bias = 0.0
        if HAS_BIAS:
            q_bias = tl.sum(q * tl.load(bias_ptr + head * width + offs_n, mask=n_mask, other=0.0).to(tl.float32),
                            axis=0)
        tl.store(q_sum_ptr + batch * N_HEADS + head, tl.sum(gq, axis=0))
        tl.store(q_bias_ptr + batch * N_HEADS + head, q_bias)
        w_k = tl.load(wkv_b_ptr + (head * width + offs_n)[:, None] * stride_w + offs_c[None, :],
                      mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        for u0 in range(slot_lo, slot_hi + 1, BLOCK_U):
            offs_u = u0 + tl.arange(0, BLOCK_U)
            u_mask = offs_u <= slot_hi
            ids = tl.load(ids_ptr + batch * stride_ib + offs_u, mask=u_mask, other=0).to(tl.int64)
            gate = tl.load(gate_ptr + ids[:, None] * stride_g + head * width + offs_n[None, :],
                           mask=u_mask[:, None] & n_mask[None, :], other=0.0)
            x = (gate.to(tl.float32) * gq[None, :]).to(w_k.dtype)
            a = tl.dot(x, w_k, input_precision=DOT_PRECISION)
            tl.store(a_ptr + batch * stride_ab + offs_u.to(tl.int64)[:, None] * stride_au + head * BLOCK_C
                     + offs_c[None, :], a.to(a_ptr.dtype.element_ty), mask=u_mask[:, None])
    tl.debug_barrier()  # A rows and query terms written by this program's threads, read by others of it below

    # phase 2: the attend launch's work on this range's chunks
    c_lo = p_lo // BLOCK_T
    c_hi = (p_hi - 1) // BLOCK_T
    for chunk in range(c_lo, c_hi + 1):
        attend_chunk(chunk, batch, length, order_ptr, order_slots_ptr, latent_ptr, k_rope_ptr, stats_ptr, a_ptr,
                     q_pe_ptr, q_sum_ptr, q_bias_ptr, s_ptr, chunk_ptr, stride_ob, stride_lb, stride_lt, stride_kb,
                     stride_kt, stride_tb, stride_tt, stride_ab, stride_au, stride_pb, stride_ph, stride_rb,
                     stride_ru, n_chunks, qk_scale, N_HEADS, D_C, D_R, BLOCK_H, BLOCK_C, BLOCK_R, BLOCK_T, False,
                     DOT_PRECISION, False, False, a_ptr, s_ptr, 0, 0, 0, 0)  # A and S unscaled
    tl.debug_barrier()

    # phase 3: this range's softmax statistics (over its chunks), then its rows up-projected per head
    N_CHUNKS: tl.constexpr = RANGE // BLOCK_T
    offs_k = c_lo + tl.arange(0, N_CHUNKS)
    k_mask = offs_k <= c_hi
    chunk_stats = chunk_ptr + (batch * n_chunks + offs_k[:, None]) * 3 * BLOCK_H + offs_h[None, :]
    m_c = tl.load(chunk_stats, mask=k_mask[:, None], other=float("-inf"))  # [N_CHUNKS, BLOCK_H]
    m_rng = tl.max(m_c, axis=0)
    alpha = tl.where(k_mask[:, None], tl.exp2(m_c - m_rng[None, :]), 0.0)
    l_rng = tl.sum(tl.load(chunk_stats + BLOCK_H, mask=k_mask[:, None], other=0.0) * alpha, axis=0)
    mean_rng = tl.sum(tl.load(chunk_stats + 2 * BLOCK_H, mask=k_mask[:, None], other=0.0) * alpha, axis=0)
    tl.store(part_stats_ptr + (part + offs_h) * 3, m_rng, mask=h_mask)
    tl.store(part_stats_ptr + (part + offs_h) * 3 + 1, l_rng, mask=h_mask)
    tl.store(part_stats_ptr + (part + offs_h) * 3 + 2, mean_rng, mask=h_mask)
    rows_lo = slot_lo + c_lo  # rows are slot + chunk, increasing along the grouped order: this range's are
    rows_hi = slot_hi + c_hi  # [rows_lo, rows_hi], those with no (slot, chunk) pair marked -1
    for head in tl.static_range(N_HEADS):
        m_head = tl.sum(tl.where(offs_h == head, m_rng, 0.0), axis=0)
        acc = tl.zeros([BLOCK_V, BLOCK_C], tl.float32)
        for r0 in range(rows_lo, rows_hi + 1, BLOCK_ROWS):
            offs_row = r0 + tl.arange(0, BLOCK_ROWS)
            in_range = offs_row <= rows_hi
            row_chunk = tl.load(row_chunk_ptr + batch * stride_cb + offs_row, mask=in_range, other=-1)
            valid = row_chunk >= 0
            ids = tl.where(valid, tl.load(row_ids_ptr + batch * stride_cb + offs_row, mask=in_range, other=0),
                           0).to(tl.int64)
            m_row = tl.load(chunk_ptr + (batch * n_chunks + row_chunk) * 3 * BLOCK_H + head, mask=valid,
                            other=float("-inf"))
            s_rows = tl.load(s_ptr + batch * stride_rb + offs_row.to(tl.int64)[:, None] * stride_ru + head * BLOCK_C
                             + offs_c[None, :], mask=valid[:, None], other=0.0)
            gate = tl.load(gate_ptr + ids[:, None] * stride_g + head * width + D_N + offs_v[None, :],
                           mask=valid[:, None] & v_mask[None, :], other=0.0)
            scaled = (gate.to(tl.float32) * tl.exp2(m_row - m_head)[:, None]).to(s_ptr.dtype.element_ty)
            acc += tl.dot(tl.trans(scaled), s_rows, input_precision=DOT_PRECISION)
        w_v = tl.load(wkv_b_ptr + (head * width + D_N + offs_v)[:, None] * stride_w + offs_c[None, :],
                      mask=v_mask[:, None] & c_mask[None, :], other=0.0)  # W^V_h [BLOCK_V, BLOCK_C]
        o = tl.sum(acc * w_v.to(tl.float32), axis=1)
        tl.store(part_o_ptr + (part + head) * BLOCK_V + offs_v, o)


@triton.jit
def _scratch_combine_kernel(part_o_ptr, part_stats_ptr, weight_ptr, bias_ptr, out_ptr, stride_ob, stride_oh, n_ranges,
                            N_HEADS: tl.constexpr, D_N: tl.constexpr, D_V: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_S: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """o = gamma^V ⊙ (sum_r w_r o_r - sum_r w_r mean_r) / sum_r w_r l_r + beta^V, w_r = 2^(m_r - max m): one
    (head, sequence) per program; a sequence with no positions gives 0."""
    head = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_s, offs_v = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_V)
    s_mask, v_mask = offs_s < n_ranges, offs_v < D_V
    rows = (batch * n_ranges + offs_s) * N_HEADS + head
    m = tl.load(part_stats_ptr + rows * 3, mask=s_mask, other=float("-inf"))
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    weight = tl.where(m > float("-inf"), tl.exp2(m - m_all), 0.0)
    denom = tl.sum(weight * tl.load(part_stats_ptr + rows * 3 + 1, mask=s_mask, other=0.0), axis=0)
    mean = tl.sum(weight * tl.load(part_stats_ptr + rows * 3 + 2, mask=s_mask, other=0.0), axis=0)
    o = tl.sum(weight[:, None] * tl.load(part_o_ptr + rows[:, None] * BLOCK_V + offs_v[None, :], mask=s_mask[:, None],
                                         other=0.0), axis=0)
    inv = tl.where(denom > 0, 1.0 / tl.where(denom > 0, denom, 1.0), 0.0)
    y = (o - mean) * inv
    store_value_output(y, denom, weight_ptr, bias_ptr, out_ptr, head, batch, stride_ob, stride_oh, offs_v, v_mask, D_N,
                       D_V, HAS_WEIGHT, HAS_BIAS)


def grouped_decode_scratch(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                           ln_stats: torch.Tensor, plan: GroupedPlan, gate_table: torch.Tensor, wkv_b: torch.Tensor,
                           norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, scale: float,
                           range_len: int = 256, block_ids: int = 16, block_rows: int = 32, num_warps: int = 4,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """`grouped_decode`'s function (and arguments) in one launch over ranges of `range_len` grouped positions plus
    a combine launch. range_len: a multiple of the plan's chunk, a power of two."""
    d_v = _check_inputs(q_nope, q_pe, latent, k_rope, ln_stats, plan, gate_table, wkv_b)
    if range_len % plan.block_t or range_len & (range_len - 1):
        raise ValueError(f"range_len={range_len}: must be a power of two and a multiple of the plan's chunk "
                         f"({plan.block_t})")
    batch, heads, d_n = q_nope.shape
    d_c, d_r = latent.shape[-1], k_rope.shape[-1]
    out = _output(out, (batch, heads, d_v), latent)
    if plan.max_len == 0:
        return out.zero_()
    device, dtype = latent.device, latent.dtype
    block_h, block_c, block_v = block(heads), block(d_c), block(d_v)
    n_ranges = triton.cdiv(plan.max_len, range_len)
    absorbed = torch.empty(batch, max(plan.max_distinct, 1), heads, block_c, dtype=dtype, device=device)
    sums = torch.empty(batch, plan.n_rows, heads, block_c, dtype=dtype, device=device)
    chunk_stats = torch.empty(batch, plan.n_chunks, 3, block_h, dtype=torch.float32, device=device)
    q_terms = torch.empty(2, batch, heads, dtype=torch.float32, device=device)  # gamma^K . q^C, beta^K . q^C
    part_o = torch.empty(batch, n_ranges, heads, block_v, dtype=torch.float32, device=device)
    part_stats = torch.empty(batch, n_ranges, heads, 3, dtype=torch.float32, device=device)
    weight, bias = (norm_weight if norm_weight is not None else wkv_b), (norm_bias if norm_bias is not None else wkv_b)
    flags = dict(HAS_WEIGHT=norm_weight is not None, HAS_BIAS=norm_bias is not None)
    _scratch_kernel[(n_ranges, batch)](
        plan.order, plan.order_slots, plan.lengths, plan.distinct_ids, plan.row_chunk, plan.row_ids,
        latent, k_rope, ln_stats, q_nope, q_pe, weight, bias, gate_table, wkv_b,
        absorbed, q_terms[0], q_terms[1], sums, chunk_stats, part_o, part_stats,
        plan.order.stride(0), plan.distinct_ids.stride(0), plan.row_chunk.stride(0), latent.stride(0),
        latent.stride(1), k_rope.stride(0), k_rope.stride(1), ln_stats.stride(0), ln_stats.stride(1),
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), gate_table.stride(0), wkv_b.stride(0),
        absorbed.stride(0), absorbed.stride(1), sums.stride(0), sums.stride(1), plan.n_chunks, n_ranges,
        scale * LOG2E,
        N_HEADS=heads, D_N=d_n, D_V=d_v, D_C=d_c, D_R=d_r, BLOCK_H=block_h, BLOCK_N=block(d_n), BLOCK_V=block_v,
        BLOCK_C=block_c, BLOCK_R=block(d_r), BLOCK_T=plan.block_t, RANGE=range_len, BLOCK_U=block_ids,
        BLOCK_ROWS=block_rows, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", num_warps=num_warps,
        **flags)
    _scratch_combine_kernel[(heads, batch)](
        part_o, part_stats, weight, bias, out, out.stride(0), out.stride(1), n_ranges,
        N_HEADS=heads, D_N=d_n, D_V=d_v, BLOCK_V=block_v, BLOCK_S=max(2, triton.next_power_of_2(n_ranges)),
        num_warps=2, **flags)
    return out
