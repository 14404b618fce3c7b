"""The bias control's absorbed decode in Triton (reference: bias_decode_ref.py; math:
egmla/attention/egmla_equations.py).

`egmla-kv64-bias` adds the gate table after the norm, f_t = Norm(W_UKV c_t) + g_{i_t}, so its decode is MLA's
absorbed flash-decoding (one program per (split of the context, sequence), all heads as the M of the dots) with
three additions per position: the norm's rho_t, mu_t from the cache, and a score term e[h, slot_t] gathered
from a small per-(sequence, distinct id) table computed beforehand (none for the table on V alone,
`egmla-kv64-bias-v`: per_id=None compiles the pass without the gather). The value side needs, besides
sum_t p_t rho_t c_t, the softmax mass of each distinct id; the kernel writes each position's score (log2
domain, 4 B per head) and, once the splits are combined, `_bias_mass_kernel` turns the scores of the
visible positions into probabilities and adds them to their id's mass (atomics; nothing else is initialised
or written per position); given the grouped decode's per-step plan (positions sorted by slot),
`_bias_mass_grouped_kernel` sums each slot's run of positions instead, with no atomics (`bias_mass = "grouped"`
on the layer or EGMLA_BIAS_MASS=grouped; exact, and 4–9% slower per generated token than the atomics on an H200:
docs/bench/ab_h200_bias_mass/table.md, so not the default). Bytes per
position: the cache row (c_t, k^R_t), the statistics, the slot, and the score written and read back.

Per distinct id, through the gate embedding (g = W_UE e): `_per_id_kernel` forms the score term q_e . e_u and
`_mass_embed_kernel` the value term's sum_u mass_u e_u, each reading the ids' rows of E from the table (no
gathered [batch, ids, d_e] tensor); `_bias_combine_kernel` merges the splits and zeroes the mass. A decode step
of a layer is four launches here (five with the table on K): the kernels read the queries where and in the dtype
the projection left them and write the output matmul's input in its dtype, so no copy or cast launches come
between them; the step was bound by launches, not by its cache (docs/benchmarks.md §2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from egmla.kernels import block, computes_like, rows
from egmla.kernels.fp8 import FP8, widen_once_default, widened
from egmla.kernels.grouped_decode import position_tile
from egmla.kernels.mla_decode import LOG2E
from egmla.kernels.split_combine import choose_num_splits, launch_first_fitting, split_range


@triton.jit
def _bias_decode_kernel(
    q_ptr, q_pe_ptr, q_terms_ptr, latent_ptr, k_rope_ptr, stats_ptr, slots_ptr, per_id_ptr, lengths_ptr,
    part_acc_ptr, part_stats_ptr, scores_ptr,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_ab, stride_ah, stride_lb, stride_lt, stride_kb, stride_kt,
    stride_tb, stride_tt, stride_sb, stride_eb, stride_eh, stride_xb, stride_xh, max_len, num_splits, qk_scale,
    N_HEADS: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_ID_SCORE: tl.constexpr, WIDEN_ONCE: tl.constexpr = False,
):
    split = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements at large batch
    length = tl.minimum(tl.load(lengths_ptr + batch).to(tl.int32), max_len)
    start, end = split_range(length, split, num_splits, BLOCK_T)

    offs_h, offs_c, offs_r = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    h_mask, c_mask, r_mask = offs_h < N_HEADS, offs_c < D_C, offs_r < D_R
    # the queries in the cache's dtype for the dots, whatever dtype the projection left them in (no cast launch); over
    # an fp8 cache the dots run in the queries' dtype and each tile is widened to it as it is read
    dtype = latent_ptr.dtype.element_ty
    if dtype == tl.float8e4nv:
        dtype = q_ptr.dtype.element_ty
    q = tl.load(q_ptr + batch * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                mask=h_mask[:, None] & c_mask[None, :], other=0.0).to(dtype)
    q_pe = tl.load(q_pe_ptr + batch * stride_pb + offs_h[:, None] * stride_ph + offs_r[None, :],
                   mask=h_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)
    terms = q_terms_ptr + batch * stride_ab + offs_h * stride_ah
    alpha_q = tl.load(terms, mask=h_mask, other=0.0).to(tl.float32)  # gamma^K . q^C
    bias_q = tl.load(terms + 1, mask=h_mask, other=0.0).to(tl.float32)  # beta^K . q^C
    per_id_row = per_id_ptr + batch * stride_eb + offs_h[:, None] * stride_eh

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    mean_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < end
        c_tile, r_tile, mu, rho = position_tile(latent_ptr + batch * stride_lb, k_rope_ptr + batch * stride_kb,
                                                stats_ptr + batch * stride_tb, offs_t, t_mask, stride_lt, stride_kt,
                                                stride_tt, offs_c, offs_r, c_mask, r_mask)
        c_tile, r_tile = widened(c_tile, q, WIDEN_ONCE), r_tile.to(dtype)  # no-ops but over an fp8 cache
        content = tl.dot(q, tl.trans(c_tile), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_T]
        rope = tl.dot(q_pe, tl.trans(r_tile), input_precision=DOT_PRECISION)
        s = rho[None, :] * (content - mu[None, :] * alpha_q[:, None]) + bias_q[:, None] + rope
        if HAS_ID_SCORE:  # the table on K: e[h, slot_t]; the table on V alone has no score term
            slot = tl.load(slots_ptr + batch * stride_sb + offs_t, mask=t_mask, other=0)
            s += tl.load(per_id_row + slot[None, :], mask=h_mask[:, None] & t_mask[None, :], other=0.0).to(tl.float32)
        s = s * qk_scale
        s = tl.where(t_mask[None, :], s, float("-inf"))  # log2 domain: exp2 below
        tl.store(scores_ptr + batch * stride_xb + offs_h[:, None] * stride_xh + offs_t[None, :], s,
                 mask=h_mask[:, None] & t_mask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        w = p * rho[None, :]  # w_t = p_t rho_t
        l_i = l_i * alpha + tl.sum(p, axis=1)
        mean_i = mean_i * alpha + tl.sum(w * mu[None, :], axis=1)
        acc = acc * alpha[:, None] + tl.dot(w.to(c_tile.dtype), c_tile, input_precision=DOT_PRECISION)
        m_i = m_new

    rows = (batch * num_splits + split) * N_HEADS + offs_h
    tl.store(part_acc_ptr + rows[:, None] * D_C + offs_c[None, :], acc, mask=h_mask[:, None] & c_mask[None, :])
    tl.store(part_stats_ptr + rows * 3, m_i, mask=h_mask)
    tl.store(part_stats_ptr + rows * 3 + 1, l_i, mask=h_mask)
    tl.store(part_stats_ptr + rows * 3 + 2, mean_i, mask=h_mask)


@triton.jit
def _bias_mass_kernel(scores_ptr, slots_ptr, lengths_ptr, m_inv_ptr, mass_ptr, stride_xb, stride_xh, stride_sb,
                      max_len, n_ids, N_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr):
    """mass[b, slot_t, h] += exp2(s_{h,t} - m_h) * inv_h for the visible positions t < lengths[b] of one tile:
    the scores past a sequence's length are never read (the score buffer is not initialised). The mass is laid
    out [batch, id, head] so that one position's heads add to one contiguous run of N_HEADS floats: a warp's
    atomics then touch a few sectors of L2 instead of one per head."""
    batch = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < N_HEADS
    length = tl.minimum(tl.load(lengths_ptr + batch).to(tl.int32), max_len)
    live = h_mask[:, None] & (offs_t < length)[None, :]
    s = tl.load(scores_ptr + batch * stride_xb + offs_h[:, None] * stride_xh + offs_t[None, :], mask=live, other=0.0)
    m = tl.load(m_inv_ptr + (batch * N_HEADS + offs_h) * 2, mask=h_mask, other=0.0)
    inv = tl.load(m_inv_ptr + (batch * N_HEADS + offs_h) * 2 + 1, mask=h_mask, other=0.0)
    slot = tl.load(slots_ptr + batch * stride_sb + offs_t, mask=offs_t < length, other=0)
    slot = tl.minimum(tl.maximum(slot, 0), n_ids - 1)
    p = tl.exp2(s - m[:, None]) * inv[:, None]
    tl.atomic_add(mass_ptr + (batch * n_ids + slot[None, :]) * N_HEADS + offs_h[:, None], p, mask=live,
                  sem="relaxed")  # only adds: no ordering is needed before the kernel ends


@triton.jit
def _bias_mass_grouped_kernel(scores_ptr, order_ptr, order_slots_ptr, offsets_ptr, n_distinct_ptr, registered_ptr,
                              lengths_ptr, m_inv_ptr, mass_ptr, stride_xb, stride_xh, stride_ob, stride_fb, max_len,
                              n_cols, N_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_U: tl.constexpr,
                              BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """mass[b, h, u] = sum of exp2(s_{h,t} - m_h) inv_h over the visible positions t of slot u, for BLOCK_U slots.
    Their positions are contiguous in the plan's grouped order (egmla/kernels/grouped_decode.make_plan), so each
    slot's mass is a segment sum, one one-hot dot per tile of positions: no atomics, and every column of the
    program's slots is written (0 from n_distinct on)."""
    batch = tl.program_id(1).to(tl.int64)
    u0 = tl.program_id(0) * BLOCK_U
    offs_u = u0 + tl.arange(0, BLOCK_U)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < N_HEADS
    n_slots = tl.minimum(tl.load(n_distinct_ptr + batch).to(tl.int32), n_cols)
    visible = tl.minimum(tl.load(lengths_ptr + batch).to(tl.int32), max_len)
    mass = tl.zeros([BLOCK_H, BLOCK_U], tl.float32)
    if u0 < n_slots:
        start = tl.load(offsets_ptr + batch * stride_fb + u0)
        last = u0 + BLOCK_U < n_slots
        end = tl.load(offsets_ptr + batch * stride_fb + tl.where(last, u0 + BLOCK_U, u0), mask=last, other=0)
        end = tl.where(last, end, tl.load(registered_ptr + batch).to(tl.int32))  # the last block ends the order
        m = tl.load(m_inv_ptr + (batch * N_HEADS + offs_h) * 2, mask=h_mask, other=0.0)
        inv = tl.load(m_inv_ptr + (batch * N_HEADS + offs_h) * 2 + 1, mask=h_mask, other=0.0)
        for p0 in range(start, end, BLOCK_T):
            offs_p = p0 + tl.arange(0, BLOCK_T)
            live = offs_p < end
            pos = tl.load(order_ptr + batch * stride_ob + offs_p, mask=live, other=0)
            slot = tl.load(order_slots_ptr + batch * stride_ob + offs_p, mask=live, other=-1)
            live = live & (pos < visible)  # registered but not visible to this query: no mass
            s = tl.load(scores_ptr + batch * stride_xb + offs_h[:, None] * stride_xh + pos[None, :],
                        mask=h_mask[:, None] & live[None, :], other=float("-inf"))
            p = tl.where(h_mask[:, None] & live[None, :], tl.exp2(s - m[:, None]) * inv[:, None], 0.0)
            one_hot = tl.where((slot - u0)[:, None] == tl.arange(0, BLOCK_U)[None, :], 1.0, 0.0)  # [BLOCK_T, BLOCK_U]
            mass += tl.dot(p, one_hot, input_precision=DOT_PRECISION)
    tl.store(mass_ptr + (batch * n_cols + offs_u[None, :]) * N_HEADS + offs_h[:, None], mass,
             mask=h_mask[:, None] & (offs_u < n_cols)[None, :])


@triton.jit
def _bias_combine_kernel(part_acc_ptr, part_stats_ptr, lengths_ptr, combined_ptr, m_inv_ptr, mass_ptr, stride_cb,
                         stride_ch, num_splits, n_ids, N_HEADS: tl.constexpr, D_C: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_U: tl.constexpr, ZERO_MASS: tl.constexpr):
    """One sequence's splits merged: every split's sums rescaled to the largest running max (a split with no
    positions has m = -inf and weighs 0). Writes combined[b, h] = [out_latent (d_c) | mean | 1 if the sequence has
    positions else 0] (in combined's dtype) and (m, 1 / denominator) per head for the mass pass; with ZERO_MASS
    also the zeros the atomic mass pass adds to (mass[b], [heads, n_ids]), which saves a fill launch per layer."""
    batch = tl.program_id(0).to(tl.int64)
    offs_h, offs_c = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_C)
    h_mask, c_mask = offs_h < N_HEADS, offs_c < D_C
    if ZERO_MASS:
        for u0 in range(0, n_ids, BLOCK_U):
            offs_u = u0 + tl.arange(0, BLOCK_U)
            tl.store(mass_ptr + (batch * n_ids + offs_u[None, :]) * N_HEADS + offs_h[:, None],
                     tl.zeros([BLOCK_H, BLOCK_U], tl.float32), mask=h_mask[:, None] & (offs_u < n_ids)[None, :])
    rows = batch * num_splits * N_HEADS + offs_h  # split 0's rows; split s adds s * N_HEADS
    m_all = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for split in range(num_splits):
        m_all = tl.maximum(m_all, tl.load(part_stats_ptr + (rows + split * N_HEADS) * 3, mask=h_mask,
                                          other=float("-inf")))
    m_all = tl.where(m_all > float("-inf"), m_all, 0.0)
    denom = tl.zeros([BLOCK_H], tl.float32)
    mean = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for split in range(num_splits):
        row = rows + split * N_HEADS
        weight = tl.exp2(tl.load(part_stats_ptr + row * 3, mask=h_mask, other=float("-inf")) - m_all)
        denom += weight * tl.load(part_stats_ptr + row * 3 + 1, mask=h_mask, other=0.0)
        mean += weight * tl.load(part_stats_ptr + row * 3 + 2, mask=h_mask, other=0.0)
        acc += weight[:, None] * tl.load(part_acc_ptr + row[:, None] * D_C + offs_c[None, :],
                                         mask=h_mask[:, None] & c_mask[None, :], other=0.0)
    inv = tl.where(denom > 0, 1.0 / tl.where(denom > 0, denom, 1.0), 0.0)
    out = combined_ptr + batch * stride_cb + offs_h * stride_ch
    dtype = combined_ptr.dtype.element_ty
    tl.store(out[:, None] + offs_c[None, :], (acc * inv[:, None]).to(dtype), mask=h_mask[:, None] & c_mask[None, :])
    tl.store(out + D_C, (mean * inv).to(dtype), mask=h_mask)
    valid = tl.where(tl.load(lengths_ptr + batch) > 0, 1.0, 0.0)
    tl.store(out + D_C + 1, (tl.zeros([BLOCK_H], tl.float32) + valid).to(dtype), mask=h_mask)
    tl.store(m_inv_ptr + (batch * N_HEADS + offs_h) * 2, m_all, mask=h_mask)
    tl.store(m_inv_ptr + (batch * N_HEADS + offs_h) * 2 + 1, inv, mask=h_mask)


@triton.jit
def _per_id_kernel(q_ptr, table_ptr, ids_ptr, n_ids_ptr, out_ptr, stride_qb, stride_qh, stride_table, stride_ib,
                   stride_ob, stride_oh, n_cols, N_HEADS: tl.constexpr, D_E: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_U: tl.constexpr, BLOCK_E: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[b, h, u] = q[b, h] . table[ids[b, u]] for u < n_ids[b], 0 up to n_cols: each distinct id's row is read
    from the table once per sequence, never gathered into a tensor."""
    batch = tl.program_id(1).to(tl.int64)
    offs_u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < N_HEADS
    u_mask = offs_u < tl.minimum(tl.load(n_ids_ptr + batch), n_cols)
    ids = tl.load(ids_ptr + batch * stride_ib + offs_u, mask=u_mask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_H, BLOCK_U], tl.float32)
    for e0 in range(0, D_E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_mask = offs_e < D_E
        rows = tl.load(table_ptr + ids[:, None] * stride_table + offs_e[None, :],
                       mask=u_mask[:, None] & e_mask[None, :], other=0.0)
        q = tl.load(q_ptr + batch * stride_qb + offs_h[:, None] * stride_qh + offs_e[None, :],
                    mask=h_mask[:, None] & e_mask[None, :], other=0.0)
        acc += tl.dot(q.to(rows.dtype), tl.trans(rows), input_precision=DOT_PRECISION)
    tl.store(out_ptr + batch * stride_ob + offs_h[:, None] * stride_oh + offs_u[None, :], acc,
             mask=h_mask[:, None] & (offs_u < n_cols)[None, :])


@triton.jit
def _mass_embed_kernel(mass_ptr, table_ptr, ids_ptr, n_ids_ptr, out_ptr, stride_mb, stride_mh, stride_mu, stride_table,
                       stride_ib, stride_ob, stride_oh, stride_os, n_cols, cols_per_split, N_HEADS: tl.constexpr,
                       D_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_E: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """out[split, b, h, e] = sum over the split's u < n_ids[b] of mass[b, h, u] table[ids[b, u], e], fp32: one
    program per block of embedding columns, sequence and split of the ids (a range of cols_per_split columns; one
    split: all), walking its ids."""
    batch = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask, e_mask = offs_h < N_HEADS, offs_e < D_E
    start = split * cols_per_split
    n = tl.minimum(tl.minimum(tl.load(n_ids_ptr + batch), n_cols), start + cols_per_split)
    acc = tl.zeros([BLOCK_H, BLOCK_E], tl.float32)
    for u0 in range(start, n, BLOCK_U):
        offs_u = u0 + tl.arange(0, BLOCK_U)
        u_mask = offs_u < n
        ids = tl.load(ids_ptr + batch * stride_ib + offs_u, mask=u_mask, other=0).to(tl.int64)
        rows = tl.load(table_ptr + ids[:, None] * stride_table + offs_e[None, :],
                       mask=u_mask[:, None] & e_mask[None, :], other=0.0)
        mass = tl.load(mass_ptr + batch * stride_mb + offs_h[:, None] * stride_mh + offs_u[None, :] * stride_mu,
                       mask=h_mask[:, None] & u_mask[None, :], other=0.0)
        acc += tl.dot(mass.to(rows.dtype), rows, input_precision=DOT_PRECISION)
    tl.store(out_ptr + split * stride_os + batch * stride_ob + offs_h[:, None] * stride_oh + offs_e[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & e_mask[None, :])


@triton.jit
def _split_sum_kernel(part_ptr, out_ptr, n_splits, stride_ps, stride_pb, stride_ph, stride_ob, stride_oh,
                      N_HEADS: tl.constexpr, D_E: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[b, h, :] = sum over splits of part[split, b, h, :] (fp32, in split order), in out's dtype."""
    batch, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < D_E
    acc = tl.zeros([BLOCK_E], tl.float32)
    for split in range(0, n_splits):
        acc += tl.load(part_ptr + split * stride_ps + batch * stride_pb + head * stride_ph + offs_e, mask=e_mask,
                       other=0.0)
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + offs_e, acc.to(out_ptr.dtype.element_ty), mask=e_mask)


# the pass's tiles (the first that fits the device's shared memory) and pipeline stages: tiles of 128 with 3 stages
# were the fastest pass on an H200 for both tables at both swept shapes, 1.2-1.3x the 64 / 2 before them
# (docs/bench/bias_sweep_h200.md)
BLOCK_TS = [128, 64, 32, 16]
BIAS_STAGES = 3
MASS_BLOCK_T = 128
# the grouped mass: slots per program and positions per step; 32 x 32 takes 72 registers per thread on 4 warps for
# sm_90 (Triton 3.6), against 222 at 64 positions per step
MASS_BLOCK_U = 32
MASS_GROUPED_BLOCK_T = 32
# the embedding sum's launch: columns of E per program, ids per step, warps, pipeline stages; 64 ids per step on 2
# warps took 1.28x / 1.39x less time than 32 on 4 at B = 32 / 128, T = 2,048 on an H200, within 9% of each shape's
# fastest (`egmla bench kernel-sweep --kernels mass`, docs/bench/mass_sweep_h200.md)
MASS_EMBED_LAUNCH = dict(block_e=64, block_u=64, num_warps=2, num_stages=3)
# At small batch the launch above is a handful of programs, each walking ~1,000 distinct ids in a serial chain of
# dependent gathers: ~20 us per layer at batch 1 to 8 on an H100, as long as at batch 32 (docs/bench/mass_small_h100/).
# Below MASS_SPLIT_PROGRAMS programs the ids are split over programs too (partial sums, then a second launch adds them).
MASS_SPLIT_PROGRAMS = 256


def _check_rows(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != shape or tensor.stride(-1) != 1:
        raise ValueError(f"{name}.shape={tuple(tensor.shape)}, expected {shape} with a contiguous last dim")


def bias_decode(q_absorbed: torch.Tensor, q_pe: torch.Tensor, q_terms: torch.Tensor, latent: torch.Tensor,
                k_rope: torch.Tensor, ln_stats: torch.Tensor, slots: torch.Tensor, per_id: torch.Tensor | None,
                lengths: torch.Tensor, scale: float, num_splits: int | None = None, block_t: int | None = None,
                combined: torch.Tensor | None = None, plan=None, n_ids: int | None = None,
                num_stages: int | None = None, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`bias_decode_ref`'s (out_latent [batch, heads, d_c], mean [batch, heads], mass [batch, heads, U]): the mass
    fp32 (a view of a [batch, U, heads] buffer, the layout its atomics want), out_latent and mean views of `combined` (fp32 unless the caller gives it in another dtype), from three
    launches (the pass, the split combine, which also zeroes the mass, and the mass); no host sync, so a CUDA graph
    can capture it. The queries, q_terms and per_id may be views in any float dtype (last dim
    contiguous): the kernels read them as they are. `combined`, if given ([batch, heads, >= d_c + 2], any float
    dtype, last dim contiguous), receives [out_latent | mean | 1 if the sequence has positions else 0] in its
    first d_c + 2 columns, and out_latent and mean are views of it: a caller can lay out its next matmul's input
    there, in that matmul's dtype. `plan` (a `grouped_decode.GroupedPlan` of the same slots, e.g.
    `TokenGroups.plan`): the mass as segment sums in grouped order (`_bias_mass_grouped_kernel`, three launches,
    no atomics) instead of atomics in time order; the same numbers up to summation order. per_id=None: no score
    term (the table on V alone: the pass gathers nothing per position), and n_ids gives the mass's width.
    num_splits, block_t, num_stages, num_warps: the pass's launch (`bias_pass`)."""
    batch, heads, d_c = q_absorbed.shape
    max_len, d_r = latent.shape[1], k_rope.shape[-1]
    if per_id is None and n_ids is None:
        raise ValueError("bias_decode: per_id=None (no score term) needs n_ids, the mass's width")
    n_ids = per_id.shape[-1] if per_id is not None else n_ids
    expected = {"q_pe": (q_pe, (batch, heads, d_r)), "q_terms": (q_terms, (batch, heads, 2)),
                "k_rope": (k_rope, (batch, max_len, d_r)), "ln_stats": (ln_stats, (batch, max_len, 2)),
                "slots": (slots, (batch, max_len)), "lengths": (lengths, (batch,))}
    if per_id is not None:
        expected["per_id"] = (per_id, (batch, heads, n_ids))
    if combined is not None:
        expected["combined"] = (combined[..., :d_c + 2], (batch, heads, d_c + 2))
    for name, (tensor, shape) in expected.items():
        _check_rows(f"bias_decode: {name}", tensor, shape)
    if latent.shape[0] != batch or latent.stride(-1) != 1:
        raise ValueError(f"bias_decode: latent.shape={tuple(latent.shape)}, expected [batch={batch}, T, {d_c}]")
    if combined is not None and not combined.dtype.is_floating_point:
        raise ValueError(f"bias_decode: combined.dtype={combined.dtype}, expected a floating-point dtype")
    device = latent.device
    part_acc, part_stats, scores = bias_pass(q_absorbed, q_pe, q_terms, latent, k_rope, ln_stats, slots, per_id,
                                             lengths, scale, num_splits, block_t, num_stages, num_warps)
    if combined is None:
        combined = torch.empty(batch, heads, d_c + 2, dtype=torch.float32, device=device)
    m_inv = torch.empty(batch, heads, 2, dtype=torch.float32, device=device)
    mass = torch.empty(batch, n_ids, heads, dtype=torch.float32, device=device)  # [batch, id, head]: see the kernel
    atomic = plan is None and n_ids > 0  # the atomic mass adds to zeros, which the combine writes
    _bias_combine_kernel[(batch,)](part_acc, part_stats, lengths, combined, m_inv, mass, combined.stride(0),
                                   combined.stride(1), part_acc.shape[1], n_ids, N_HEADS=heads, D_C=d_c,
                                   BLOCK_H=block(heads), BLOCK_C=block(d_c), BLOCK_U=64, ZERO_MASS=atomic,
                                   num_warps=4)
    if plan is not None:
        if n_ids:
            _bias_mass_grouped_kernel[(triton.cdiv(n_ids, MASS_BLOCK_U), batch)](
                scores, plan.order, plan.order_slots, plan.offsets, plan.n_distinct, plan.lengths, lengths, m_inv,
                mass, scores.stride(0), scores.stride(1), plan.order.stride(0), plan.offsets.stride(0),
                max_len, n_ids, N_HEADS=heads, BLOCK_H=block(heads), BLOCK_U=MASS_BLOCK_U,
                BLOCK_T=MASS_GROUPED_BLOCK_T,
                DOT_PRECISION="ieee" if computes_like(latent, q_absorbed).dtype == torch.float32 else "tf32",
                num_warps=4)
        return combined[..., :d_c], combined[..., d_c], mass.transpose(1, 2)
    if atomic:
        _bias_mass_kernel[(triton.cdiv(max_len, MASS_BLOCK_T), batch)](
            scores, slots, lengths, m_inv, mass, scores.stride(0), scores.stride(1), slots.stride(0), max_len, n_ids,
            N_HEADS=heads, BLOCK_H=triton.next_power_of_2(heads), BLOCK_T=MASS_BLOCK_T, num_warps=4)
    return combined[..., :d_c], combined[..., d_c], mass.transpose(1, 2)


def bias_pass(q_absorbed: torch.Tensor, q_pe: torch.Tensor, q_terms: torch.Tensor, latent: torch.Tensor,
              k_rope: torch.Tensor, ln_stats: torch.Tensor, slots: torch.Tensor, per_id: torch.Tensor | None,
              lengths: torch.Tensor, scale: float, num_splits: int | None = None, block_t: int | None = None,
              num_stages: int | None = None, num_warps: int = 4,
              widen_once: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pass over the cache alone (inputs as `bias_decode`'s, not checked again): per split its unnormalised
    sums part_acc [batch, splits, heads, d_c] and (max, denominator, mean term) part_stats [batch, splits, heads,
    3], and every visible position's score (log2 domain) [batch, heads, T]. Its own function so that a benchmark
    can time it apart from the combine and the mass (egmla bench kernel-sweep --kernels bias). latent and k_rope may be
    float8_e4m3fn (an fp8 cache): the dots then run in q_absorbed's dtype, `widen_once` as in `mla_decode`."""
    batch, heads, d_c = q_absorbed.shape
    max_len, d_r = latent.shape[1], k_rope.shape[-1]
    q_absorbed, q_pe = rows(q_absorbed), rows(q_pe)  # any float dtype: the kernel casts them (no launch)
    device = latent.device
    compute = computes_like(latent, q_absorbed).dtype
    once = widen_once_default(latent.dtype == FP8 and compute.itemsize == 2, widen_once)
    scores = torch.empty(batch, heads, max_len, dtype=torch.float32, device=device)  # read below length only
    stages = num_stages or BIAS_STAGES
    id_scores = per_id if per_id is not None else scores  # not read without a score term

    def launch(tile):
        splits = num_splits or choose_num_splits(batch, 1, max_len, tile, device)
        part_acc = torch.empty(batch, splits, heads, d_c, dtype=torch.float32, device=device)
        part_stats = torch.empty(batch, splits, heads, 3, dtype=torch.float32, device=device)
        _bias_decode_kernel[(splits, batch)](
            q_absorbed, q_pe, q_terms, latent, k_rope, ln_stats, slots, id_scores, lengths, part_acc, part_stats,
            scores,
            q_absorbed.stride(0), q_absorbed.stride(1), q_pe.stride(0), q_pe.stride(1), q_terms.stride(0),
            q_terms.stride(1), latent.stride(0), latent.stride(1), k_rope.stride(0), k_rope.stride(1),
            ln_stats.stride(0), ln_stats.stride(1), slots.stride(0), id_scores.stride(0), id_scores.stride(1),
            scores.stride(0), scores.stride(1), max_len, splits, scale * LOG2E, N_HEADS=heads, D_C=d_c, D_R=d_r,
            BLOCK_H=block(heads), BLOCK_C=block(d_c), BLOCK_R=block(d_r), BLOCK_T=tile,
            DOT_PRECISION="ieee" if compute == torch.float32 else "tf32", HAS_ID_SCORE=per_id is not None,
            WIDEN_ONCE=once, num_warps=num_warps, num_stages=stages)
        return part_acc, part_stats

    tiles = [block_t] if block_t else BLOCK_TS
    part_acc, part_stats = launch_first_fitting(("bias", latent.dtype, k_rope.dtype, compute, once, heads, d_c, d_r,
                                                 tuple(tiles), stages, num_warps), tiles, launch)
    return part_acc, part_stats, scores


def per_id_scores(q_embed: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, n_ids: torch.Tensor) -> torch.Tensor:
    """`per_id_scores_ref`: [batch, heads, U] fp32 from q_embed [batch, heads, d_e] (any float dtype, last dim
    contiguous), table [vocab, d_e], ids [batch, U] and n_ids [batch] (columns from n_ids[b] on are 0)."""
    batch, heads, d_e = q_embed.shape
    n_cols = ids.shape[1]
    _check_rows("per_id_scores: q_embed", q_embed, (batch, heads, table.shape[1]))
    _check_rows("per_id_scores: ids", ids, (batch, n_cols))
    out = torch.empty(batch, heads, n_cols, dtype=torch.float32, device=q_embed.device)
    if n_cols:
        _per_id_kernel[(triton.cdiv(n_cols, 32), batch)](
            q_embed, table, ids, n_ids, out, q_embed.stride(0), q_embed.stride(1), table.stride(0), ids.stride(0),
            out.stride(0), out.stride(1), n_cols, N_HEADS=heads, D_E=d_e, BLOCK_H=block(heads), BLOCK_U=32,
            BLOCK_E=min(128, block(d_e)), DOT_PRECISION="ieee" if table.dtype == torch.float32 else "tf32",
            num_warps=4)
    return out


def mass_embeddings(mass: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, n_ids: torch.Tensor,
                    out: torch.Tensor | None = None, **launch) -> torch.Tensor:
    """`mass_embeddings_ref`: [batch, heads, d_e] fp32 from mass [batch, heads, U] fp32 (any strides), table
    [vocab, d_e], ids [batch, U] and n_ids [batch]; written into `out` (any float dtype, e.g. the next matmul's;
    last dim contiguous) if given. launch: block_e, block_u, num_warps, num_stages (default MASS_EMBED_LAUNCH), and
    splits: how many ranges of the ids run in programs of their own, their partial sums added by a second launch
    (default: as many as bring the programs to MASS_SPLIT_PROGRAMS, at most one per block_u ids; 1 = one launch)."""
    batch, heads, n_cols = mass.shape
    d_e = table.shape[1]
    _check_rows("mass_embeddings: ids", ids, (batch, n_cols))
    if tuple(mass.shape) != (batch, heads, n_cols) or mass.dtype != torch.float32:
        raise ValueError(f"mass_embeddings: mass.shape={tuple(mass.shape)} ({mass.dtype}), expected ({batch}, {heads}, "
                         f"{n_cols}) fp32 (any strides: bias_decode returns a [batch, id, head] buffer's view)")
    if out is None:
        out = torch.empty(batch, heads, d_e, dtype=torch.float32, device=mass.device)
    _check_rows("mass_embeddings: out", out, (batch, heads, d_e))
    launch = {**MASS_EMBED_LAUNCH, **launch}
    block_e, block_u = min(launch["block_e"], block(d_e)), launch["block_u"]
    e_blocks = triton.cdiv(d_e, block_e)
    splits = launch.get("splits") or mass_splits(batch * e_blocks, n_cols, block_u)
    if splits < 1:
        raise ValueError(f"mass_embeddings: splits={splits}: must be >= 1")
    # each split a whole number of id blocks (so that a split never starts inside another's block)
    cols_per_split = triton.cdiv(triton.cdiv(max(n_cols, 1), splits), block_u) * block_u
    splits = triton.cdiv(max(n_cols, 1), cols_per_split)
    part = out if splits == 1 else torch.empty(splits, batch, heads, d_e, dtype=torch.float32, device=mass.device)
    stride_os = 0 if splits == 1 else part.stride(0)
    _mass_embed_kernel[(e_blocks, batch, splits)](
        mass, table, ids, n_ids, part, mass.stride(0), mass.stride(1), mass.stride(2), table.stride(0), ids.stride(0),
        part.stride(-3), part.stride(-2), stride_os, n_cols, cols_per_split, N_HEADS=heads, D_E=d_e,
        BLOCK_H=block(heads), BLOCK_U=block_u, BLOCK_E=block_e,
        DOT_PRECISION="ieee" if table.dtype == torch.float32 else "tf32", num_warps=launch["num_warps"],
        num_stages=launch["num_stages"])
    if splits > 1:
        _split_sum_kernel[(batch, heads)](part, out, splits, part.stride(0), part.stride(1), part.stride(2),
                                          out.stride(0), out.stride(1), N_HEADS=heads, D_E=d_e, BLOCK_E=block(d_e),
                                          num_warps=4)
    return out


def mass_splits(programs: int, n_cols: int, block_u: int) -> int:
    """Ranges of the ids to run in programs of their own: enough to bring `programs` (one per block of embedding
    columns and sequence) to MASS_SPLIT_PROGRAMS, at most one per block of ids; 1 where the batch fills it already."""
    if programs >= MASS_SPLIT_PROGRAMS:
        return 1
    return max(1, min(MASS_SPLIT_PROGRAMS // programs, triton.cdiv(n_cols, block_u)))
