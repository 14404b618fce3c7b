"""EG-MLA decode grouped by token id, in Triton (reference: grouped_decode_ref.py; math: docs/grouped-decode.md).
Gate placement `up`, gate op `mul`, LayerNorm or RMSNorm.

Three launches per layer and decode step, plus a per-step plan shared by all layers:

  plan     (PyTorch, once per step) each sequence's positions sorted by slot (= distinct-id index);
           the sorted list is cut into chunks of BLOCK_T positions. A chunk holds whole or partial runs
           of consecutive slots; the pair (slot, chunk) is one "row" with index slot + chunk (unique,
           since slots never decrease along the sorted list), so rows <= distinct ids + chunks.
  absorb   one program per (sequence, BLOCK_U distinct ids): a_{h,v} = W^K_h^T (gamma^K_h ⊙ q^C_h ⊙ g^K_{h,v})
           as a [BLOCK_U, d_n] x [d_n, d_c] tensor-core dot per head; W_UK is read once per BLOCK_U ids.
  attend   one program per (sequence, chunk): every head at once (heads are the N of the dots, as in
           MLA's absorbed decode), per run j of the chunk one [BLOCK_T, d_c] x [d_c, heads] dot against
           a_{., v_j}; scores, chunk-local softmax (m, l), w = p rho; per run s = w^T C, stored as its row.
  upproj   one program per (sequence, BLOCK_ROWS rows): rescale each row to the global softmax
           (m, l from every chunk), W^V_h s per head as a tensor-core dot, times g^V of the row's id,
           summed over rows; gamma^V, the mean term and beta^V; atomically added into o [batch, heads, d_v].

Per position the work is MLA's (one d_c dot per head, one d_c accumulate per head): the gate rows are
read and the W_UKV products done once per distinct id (plus once per chunk boundary). A chunk with
many short runs costs one dot per run, so contexts where most ids are rare cost more per position.
The grouping is by token id; only the two gate-row gathers (absorb, upproj) can go through an id -> row map
(`id_to_row`: a gate-table offload's slots over the rows resident on the device).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from egmla.kernels import GROUPED_CHUNK, block, computes_like
from egmla.kernels.egmla_decode import check_id_to_row, gate_rows
from egmla.kernels.fp8 import FP8, stored, widen_once_default, widened
from egmla.kernels.mla_decode import LOG2E, _output


@dataclass
class GroupedPlan:
    """Per-step layout shared by every layer: positions sorted by slot, and which chunk owns each row."""

    order: torch.Tensor  # [batch, T] int32: registered positions sorted by slot, then the rest
    order_slots: torch.Tensor  # [batch, T] int32: the slot of each entry of `order` (its id's index)
    row_chunk: torch.Tensor  # [batch, n_rows] int32: chunk of row (slot + chunk), -1 where no such row
    row_ids: torch.Tensor  # [batch, n_rows] int32: token id of row (undefined where row_chunk is -1)
    offsets: torch.Tensor  # [batch, >= max_distinct] int32: where slot s's positions start in `order`
    slots: torch.Tensor  # [batch, >= T] int32
    distinct_ids: torch.Tensor  # [batch, >= max_distinct] int32
    n_distinct: torch.Tensor  # [batch] int32
    lengths: torch.Tensor  # [batch] int32: registered positions
    max_len: int
    max_distinct: int
    block_t: int

    @property
    def n_chunks(self) -> int:
        return triton.cdiv(self.max_len, self.block_t)

    @property
    def n_rows(self) -> int:
        return self.max_distinct + self.n_chunks

    def sequences(self, rows: slice) -> "GroupedPlan":
        """The plan of sequences `rows` only (sizes kept)."""
        sliced = {name: getattr(self, name)[rows] for name in
                  ("order", "order_slots", "row_chunk", "row_ids", "offsets", "slots", "distinct_ids", "n_distinct",
                   "lengths")}
        return dataclasses.replace(self, **sliced)


CHUNK = GROUPED_CHUNK  # positions per attend program (the plan's block_t): 16 beat 32 by 20-25% on the H200


def make_plan(groups, block_t: int = CHUNK, vocab_size: int | None = None,
              bounds: tuple[int, int] | None = None) -> GroupedPlan:
    """The plan for `groups` (slots, ranks [batch, max_len], counts, distinct_ids, n_distinct, lengths: the
    cache's TokenGroups). No sort: position t goes to offset(slot_t) + rank_t, offsets the running sum of the
    slot counts. Two small launches per step, shared by all layers.

    bounds=None: the sizes are read back (one host sync) and the ids checked against vocab_size.
    bounds=(positions, distinct ids): upper bounds the caller guarantees; nothing is read back, so the plan
    (and the kernels sized by it) can be captured in a CUDA graph."""
    if block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t={block_t}: must be a power of two >= 16 (tl.dot tiles)")
    slots = groups.slots
    batch, device = slots.shape[0], slots.device
    offsets = torch.empty(batch, slots.shape[1], dtype=torch.int32, device=device)
    summary = torch.empty(batch, 3, dtype=torch.int64, device=device)  # length, distinct ids, largest id
    _slot_offsets_kernel[(batch,)](groups.counts, groups.distinct_ids, groups.n_distinct, groups.lengths, offsets,
                                   summary, groups.counts.stride(0), groups.distinct_ids.stride(0), offsets.stride(0),
                                   BLOCK=1024)
    if bounds is not None:
        max_len, max_distinct = min(bounds[0], slots.shape[1]), max(1, min(bounds[1], slots.shape[1]))
    else:
        max_len, max_distinct, max_id = summary.max(0).values.tolist()  # the step's one host sync
        if max_len > slots.shape[1] or max_distinct > max(max_len, 1):
            raise ValueError(f"lengths max {max_len} / n_distinct max {max_distinct} exceed the groups' "
                             f"{tuple(slots.shape)}: pass the TokenGroups of the cache")
        if vocab_size is not None and max_id >= vocab_size:
            raise ValueError(f"token id {max_id} in the cache is >= vocab_size={vocab_size} (gate table rows): "
                             f"check the tokenizer matches the model")
    n_rows = max_distinct + triton.cdiv(max_len, block_t)
    order = torch.empty(batch, max_len, dtype=torch.int32, device=device)
    order_slots = torch.empty(batch, max_len, dtype=torch.int32, device=device)
    row_chunk = torch.full((batch, n_rows), -1, dtype=torch.int32, device=device)
    row_ids = torch.empty((batch, n_rows), dtype=torch.int32, device=device)
    if max_len > 0:
        _place_kernel[(triton.cdiv(max_len, 1024), batch)](
            slots, groups.ranks, groups.lengths, offsets, groups.distinct_ids, order, order_slots, row_chunk, row_ids,
            slots.stride(0), groups.ranks.stride(0), offsets.stride(0), groups.distinct_ids.stride(0), order.stride(0),
            row_chunk.stride(0), BLOCK=1024, BLOCK_T=block_t)
    return GroupedPlan(order, order_slots, row_chunk, row_ids, offsets, slots, groups.distinct_ids,
                       groups.n_distinct.to(torch.int32), groups.lengths.to(torch.int32), max_len, max_distinct, block_t)


@triton.jit
def _slot_offsets_kernel(counts_ptr, ids_ptr, n_distinct_ptr, lengths_ptr, offsets_ptr, summary_ptr,
                         stride_cb, stride_ib, stride_ob, BLOCK: tl.constexpr):
    """offsets[b, s] = sum of counts[b, :s] (where slot s's positions start in the grouped order), and
    summary[b] = (length, distinct ids, largest distinct id)."""
    batch = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements at large batch
    n_slots = tl.load(n_distinct_ptr + batch)
    carry = tl.full([], 0, tl.int32)
    largest = tl.full([], -1, tl.int32)
    for start in range(0, n_slots, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        counts = tl.load(counts_ptr + batch * stride_cb + offs, mask=offs < n_slots, other=0)
        tl.store(offsets_ptr + batch * stride_ob + offs, carry + tl.cumsum(counts, axis=0) - counts, mask=offs < n_slots)
        carry += tl.sum(counts, axis=0)
        ids = tl.load(ids_ptr + batch * stride_ib + offs, mask=offs < n_slots, other=-1)
        largest = tl.maximum(largest, tl.max(ids, axis=0))
    tl.store(summary_ptr + batch * 3, tl.load(lengths_ptr + batch).to(tl.int64))
    tl.store(summary_ptr + batch * 3 + 1, n_slots.to(tl.int64))
    tl.store(summary_ptr + batch * 3 + 2, largest.to(tl.int64))


@triton.jit
def _place_kernel(slots_ptr, ranks_ptr, lengths_ptr, offsets_ptr, ids_ptr, order_ptr, order_slots_ptr, row_chunk_ptr,
                  row_ids_ptr,
                  stride_sb, stride_kb, stride_fb, stride_ib, stride_ob, stride_rb, BLOCK: tl.constexpr,
                  BLOCK_T: tl.constexpr):
    """Position t goes to index offsets[slot_t] + rank_t of the grouped order, its slot beside it; row (slot, chunk)
    -> its chunk and its token id. (So that the attend launch's id-row loads and the up-projection's gate-row
    gather each wait on one load, not two.)"""
    batch = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements at large batch
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    registered = offs_t < tl.load(lengths_ptr + batch)
    slot = tl.load(slots_ptr + batch * stride_sb + offs_t, mask=registered, other=0)
    index = (tl.load(offsets_ptr + batch * stride_fb + slot, mask=registered, other=0)
             + tl.load(ranks_ptr + batch * stride_kb + offs_t, mask=registered, other=0))
    tl.store(order_ptr + batch * stride_ob + index, offs_t, mask=registered)
    tl.store(order_slots_ptr + batch * stride_ob + index, slot, mask=registered)
    chunk = index // BLOCK_T
    tl.store(row_chunk_ptr + batch * stride_rb + slot + chunk, chunk, mask=registered)
    token = tl.load(ids_ptr + batch * stride_ib + slot, mask=registered, other=0)
    tl.store(row_ids_ptr + batch * stride_rb + slot + chunk, token, mask=registered)


@triton.jit
def row_scaled(x):
    """x [rows, cols] fp32 divided by its per-row scale max|row| / 448 (1 for a zero row), and the scales: what an fp8
    intermediate stores, so that every row uses e4m3's whole range and none saturates."""
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0, amax / 448.0, 1.0)
    return x / scale[:, None], scale


@triton.jit
def _absorb_kernel(q_ptr, weight_ptr, bias_ptr, ids_ptr, n_distinct_ptr, gate_ptr, id_to_row_ptr, wkv_b_ptr, a_ptr,
                   a_scale_ptr, q_sum_ptr, q_bias_ptr, acc_ptr,
                   stride_qb, stride_qh, stride_ib, stride_g, stride_w, stride_ab, stride_au, stride_asb, stride_asu,
                   N_HEADS: tl.constexpr, D_N: tl.constexpr, D_V: tl.constexpr, D_C: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
                   HEADS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO_ACC: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, ROW_MAP: tl.constexpr, SCALED: tl.constexpr):
    """A[b, u, h, :] = W^K_h^T (gamma^K_h ⊙ q^C[b, h] ⊙ G[id_u, head h key slice]) for BLOCK_U distinct ids u
    and HEADS heads. The programs of the first id block also write gamma^K . q^C, beta^K . q^C (and zero acc).
    SCALED (fp8 A): each (id, head) row stored as A / scale with scale = max|row| / 448, beside it in a_scale."""
    batch = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements at large batch
    lead = tl.program_id(0) == 0
    offs_u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    n_ids = tl.load(n_distinct_ptr + batch)
    if ZERO_ACC and lead:  # also for a sequence with no ids, whose output must be 0
        offs_v = tl.arange(0, BLOCK_V)
        for i in tl.static_range(HEADS):
            head = tl.program_id(2) * HEADS + i
            if head < N_HEADS:
                tl.store(acc_ptr + (batch * N_HEADS + head) * D_V + offs_v, tl.zeros([BLOCK_V], tl.float32),
                         mask=offs_v < D_V)
    if tl.program_id(0) * BLOCK_U >= n_ids:
        return
    u_mask = offs_u < n_ids
    ids = tl.load(ids_ptr + batch * stride_ib + offs_u, mask=u_mask, other=0).to(tl.int64)
    ids = gate_rows(ids, id_to_row_ptr, u_mask, ROW_MAP)
    offs_n, offs_c = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_C)
    n_mask, c_mask = offs_n < D_N, offs_c < D_C
    width: tl.constexpr = D_N + D_V
    for i in tl.static_range(HEADS):
        head = tl.program_id(2) * HEADS + i
        if head < N_HEADS:
            q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            gq = q
            if HAS_WEIGHT:
                gq = q * tl.load(weight_ptr + head * width + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + ids[:, None] * stride_g + head * width + offs_n[None, :],
                           mask=u_mask[:, None] & n_mask[None, :], other=0.0)
            w_k = tl.load(wkv_b_ptr + (head * width + offs_n)[:, None] * stride_w + offs_c[None, :],
                          mask=n_mask[:, None] & c_mask[None, :], other=0.0)
            x = (gate.to(tl.float32) * gq[None, :]).to(w_k.dtype)
            a = tl.dot(x, w_k, input_precision=DOT_PRECISION)  # [BLOCK_U, BLOCK_C]; padded columns are 0
            if SCALED:
                a, a_scale = row_scaled(a)
                tl.store(a_scale_ptr + batch * stride_asb + offs_u * stride_asu + head, a_scale, mask=u_mask)
            tl.store(a_ptr + batch * stride_ab + offs_u[:, None] * stride_au + head * BLOCK_C + offs_c[None, :],
                     stored(a, a_ptr), mask=u_mask[:, None])
            if lead:
                tl.store(q_sum_ptr + batch * N_HEADS + head, tl.sum(gq, axis=0))
                q_bias = 0.0
                if HAS_BIAS:
                    q_bias = tl.sum(q * tl.load(bias_ptr + head * width + offs_n, mask=n_mask, other=0.0).to(tl.float32),
                                    axis=0)
                tl.store(q_bias_ptr + batch * N_HEADS + head, q_bias)


@triton.jit
def position_tile(latent_row, k_rope_row, stats_row, pos, t_mask, stride_lt, stride_kt, stride_tt,
                  offs_c, offs_r, c_mask, r_mask):
    """What a position tile reads of one sequence's cache (rows at `pos`): c_t, k^R_t, mu_t, rho_t."""
    c_tile = tl.load(latent_row + pos[:, None] * stride_lt + offs_c[None, :], mask=t_mask[:, None] & c_mask[None, :],
                     other=0.0)
    r_tile = tl.load(k_rope_row + pos[:, None] * stride_kt + offs_r[None, :], mask=t_mask[:, None] & r_mask[None, :],
                     other=0.0)
    mu = tl.load(stats_row + pos * stride_tt, mask=t_mask, other=0.0)
    rho = tl.load(stats_row + pos * stride_tt + 1, mask=t_mask, other=0.0)
    return c_tile, r_tile, mu, rho


@triton.jit
def _attend_kernel(order_ptr, order_slots_ptr, lengths_ptr, latent_ptr, k_rope_ptr, stats_ptr, a_ptr, q_pe_ptr,
                   q_sum_ptr, q_bias_ptr, s_ptr, chunk_ptr, a_scale_ptr, s_scale_ptr,
                   stride_ob, stride_lb, stride_lt, stride_kb, stride_kt, stride_tb, stride_tt,
                   stride_ab, stride_au, stride_pb, stride_ph, stride_rb, stride_ru, stride_asb, stride_asu,
                   stride_ssb, stride_ssr, n_chunks, qk_scale,
                   N_HEADS: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                   KEY_GATHER: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDEN_ONCE: tl.constexpr,
                   SCALED: tl.constexpr):
    """Scores, chunk-local softmax and per-run value sums for one chunk of BLOCK_T slot-sorted positions.
    Heads are the N of the dots (as in MLA's absorbed decode); a run (one id) costs one dot each way."""
    chunk = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements at large batch
    length = tl.load(lengths_ptr + batch)
    if chunk * BLOCK_T >= length:
        return
    attend_chunk(chunk, batch, length, order_ptr, order_slots_ptr, latent_ptr, k_rope_ptr, stats_ptr, a_ptr, q_pe_ptr,
                 q_sum_ptr, q_bias_ptr, s_ptr, chunk_ptr, stride_ob, stride_lb, stride_lt, stride_kb, stride_kt,
                 stride_tb, stride_tt, stride_ab, stride_au, stride_pb, stride_ph, stride_rb, stride_ru, n_chunks,
                 qk_scale, N_HEADS, D_C, D_R, BLOCK_H, BLOCK_C, BLOCK_R, BLOCK_T, KEY_GATHER, DOT_PRECISION, WIDEN_ONCE,
                 SCALED, a_scale_ptr, s_scale_ptr, stride_asb, stride_asu, stride_ssb, stride_ssr)


@triton.jit
def attend_chunk(chunk, batch, length, order_ptr, order_slots_ptr, latent_ptr, k_rope_ptr, stats_ptr, a_ptr, q_pe_ptr,
                 q_sum_ptr, q_bias_ptr, s_ptr, chunk_ptr, stride_ob, stride_lb, stride_lt, stride_kb, stride_kt,
                 stride_tb, stride_tt, stride_ab, stride_au, stride_pb, stride_ph, stride_rb, stride_ru, n_chunks,
                 qk_scale, N_HEADS: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, KEY_GATHER: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, WIDEN_ONCE: tl.constexpr, SCALED: tl.constexpr, a_scale_ptr, s_scale_ptr,
                 stride_asb, stride_asu, stride_ssb, stride_ssr):
    """The attend launch's work on one chunk (a program of it, or a phase of grouped_scratch's programs):
    writes the chunk's softmax stats and its S rows (slot + chunk). An fp8 cache is widened to the query's dtype
    as it is read; its latent tile feeds the value product transposed, hence WIDEN_ONCE (egmla.kernels.fp8.widened).
    SCALED: A and S are fp8 with a scale per (row, head) (`row_scaled`); A is widened to the query's dtype as read."""
    offs_t = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < length
    pos = tl.load(order_ptr + batch * stride_ob + offs_t, mask=t_mask, other=0).to(tl.int64)
    slot = tl.load(order_slots_ptr + batch * stride_ob + offs_t, mask=t_mask, other=0)
    offs_h, offs_c, offs_r = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    h_mask, c_mask, r_mask = offs_h < N_HEADS, offs_c < D_C, offs_r < D_R
    c_tile, r_tile, mu, rho = position_tile(latent_ptr + batch * stride_lb, k_rope_ptr + batch * stride_kb,
                                            stats_ptr + batch * stride_tb, pos, t_mask, stride_lt, stride_kt,
                                            stride_tt, offs_c, offs_r, c_mask, r_mask)
    q_pe = tl.load(q_pe_ptr + batch * stride_pb + offs_h[:, None] * stride_ph + offs_r[None, :],
                   mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    c_tile, r_tile = widened(c_tile, q_pe, WIDEN_ONCE), r_tile.to(q_pe.dtype)  # no-ops but over an fp8 cache
    rope = tl.dot(r_tile, tl.trans(q_pe), input_precision=DOT_PRECISION)  # [BLOCK_T, BLOCK_H]

    first = tl.min(tl.where(t_mask, slot, 2147483647), axis=0)
    n_runs = tl.max(tl.where(t_mask, slot, -1), axis=0) - first + 1  # every slot in between is here too
    run = slot - first
    a_base = a_ptr + batch * stride_ab + offs_h[:, None] * BLOCK_C + offs_c[None, :]
    content = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    if KEY_GATHER:  # each position gathers its id's row of A per head: no loop over runs
        rows = a_ptr + batch * stride_ab + slot.to(tl.int64)[:, None] * stride_au + offs_c[None, :]
        for head in tl.static_range(N_HEADS):
            a_t = tl.load(rows + head * BLOCK_C, mask=t_mask[:, None], other=0.0)
            dot_t = tl.sum(a_t.to(tl.float32) * c_tile.to(tl.float32), axis=1)
            content = tl.where(offs_h[None, :] == head, dot_t[:, None], content)
    else:
        for j in range(0, n_runs):  # a_{h, v_j} . c_t for the positions of run j, all heads in one dot
            a_j = tl.load(a_base + (first + j).to(tl.int64) * stride_au, mask=h_mask[:, None], other=0.0)
            dots = tl.dot(c_tile, tl.trans(a_j.to(c_tile.dtype)), input_precision=DOT_PRECISION)
            if SCALED:
                dots *= tl.load(a_scale_ptr + batch * stride_asb + (first + j).to(tl.int64) * stride_asu + offs_h,
                                mask=h_mask, other=0.0)[None, :]
            content = tl.where((run == j)[:, None], dots, content)
    q_sum = tl.load(q_sum_ptr + batch * N_HEADS + offs_h, mask=h_mask, other=0.0)
    q_bias = tl.load(q_bias_ptr + batch * N_HEADS + offs_h, mask=h_mask, other=0.0)
    s = (rho[:, None] * (content - mu[:, None] * q_sum[None, :]) + q_bias[None, :] + rope) * qk_scale
    s = tl.where(t_mask[:, None], s, float("-inf"))  # log2 domain: exp2 below
    m = tl.max(s, axis=0)
    p = tl.exp2(s - m[None, :])
    w = p * rho[:, None]  # w_t = p_t rho_t
    stats = chunk_ptr + ((batch * n_chunks + chunk) * 3) * BLOCK_H + offs_h
    tl.store(stats, m)
    tl.store(stats + BLOCK_H, tl.sum(p, axis=0))
    tl.store(stats + 2 * BLOCK_H, tl.sum(w * mu[:, None], axis=0))

    s_base = s_ptr + batch * stride_rb + offs_h[:, None] * BLOCK_C + offs_c[None, :]
    for j in range(0, n_runs):  # s_{h, v_j} = sum over run j of w_t c_t: [heads, d_c] in one dot
        w_j = tl.where((run == j)[:, None], w, 0.0).to(c_tile.dtype)
        part = tl.dot(tl.trans(w_j), c_tile, input_precision=DOT_PRECISION)
        row = (first + j + chunk).to(tl.int64)
        if SCALED:
            part, s_scale = row_scaled(part)
            tl.store(s_scale_ptr + batch * stride_ssb + row * stride_ssr + offs_h, s_scale, mask=h_mask)
        tl.store(s_base + row * stride_ru, stored(part, s_ptr), mask=h_mask[:, None])


@triton.jit
def store_value_output(y, denom, weight_ptr, bias_ptr, out_ptr, head, batch, stride_ob, stride_oh, offs_v, v_mask,
                       D_N: tl.constexpr, D_V: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out[b, h] = gamma^V_h ⊙ y + beta^V_h (beta only where the softmax had positions, denom > 0): the value
    slice's norm affine, where a one-launch kernel's combine finishes (grouped_fused.py, grouped_scratch.py)."""
    width: tl.constexpr = D_N + D_V
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + head * width + D_N + offs_v, mask=v_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + head * width + D_N + offs_v, mask=v_mask, other=0.0).to(tl.float32)
        y = y + tl.where(denom > 0, bias, 0.0)
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + offs_v, y.to(out_ptr.dtype.element_ty), mask=v_mask)


@triton.jit
def _upproj_kernel(s_ptr, row_chunk_ptr, lengths_ptr, n_distinct_ptr, row_ids_ptr, chunk_ptr, gate_ptr, id_to_row_ptr,
                   wkv_b_ptr, weight_ptr, bias_ptr, out_ptr, s_scale_ptr,
                   stride_rb, stride_ru, stride_cb, stride_ib, stride_g, stride_w, stride_ob, stride_oh, stride_ssb,
                   stride_ssr,
                   n_chunks, num_splits,
                   N_HEADS: tl.constexpr, D_N: tl.constexpr, D_V: tl.constexpr, D_C: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                   GATE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_MAP: tl.constexpr,
                   SCALED: tl.constexpr, WARP_SPECIALIZE: tl.constexpr = False):
    """o[b, h] = gamma^V ⊙ (sum over rows of g^V[id] ⊙ (W^V_h s_row) - sum_t w_t mu_t) + beta^V, rows rescaled
    to the global softmax (each program merges the chunks' softmax statistics itself: a launch doing it once per
    sequence measured slower, its few programs in series). One program per (head, sequence, split of the row
    blocks); W^V_h read once."""
    head = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements at large batch
    split = tl.program_id(2)
    length = tl.load(lengths_ptr + batch)
    n_seq_chunks = tl.cdiv(length, BLOCK_T)
    n_seq_rows = tl.load(n_distinct_ptr + batch) + n_seq_chunks  # rows are slot + chunk
    offs_c, offs_v = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_V)
    c_mask, v_mask = offs_c < D_C, offs_v < D_V
    width: tl.constexpr = D_N + D_V
    chunk_stats = chunk_ptr + batch * n_chunks * 3 * BLOCK_H + head
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < n_seq_chunks
    m_c = tl.load(chunk_stats + offs_k * 3 * BLOCK_H, mask=k_mask, other=float("-inf"))
    m_all = tl.max(m_c, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # an empty sequence: every weight 0, output 0
    alpha_c = tl.exp2(m_c - m_all)
    denom = tl.sum(tl.load(chunk_stats + offs_k * 3 * BLOCK_H + BLOCK_H, mask=k_mask, other=0.0) * alpha_c, axis=0)
    inv_l = tl.where(denom > 0, 1.0 / tl.where(denom > 0, denom, 1.0), 0.0)
    mean_term = tl.sum(tl.load(chunk_stats + offs_k * 3 * BLOCK_H + 2 * BLOCK_H, mask=k_mask, other=0.0) * alpha_c,
                       axis=0) * inv_l
    # GATE_DOT: sum over rows of g^V_r ⊙ (W^V_h s_r) = rowsum(W^V_h ⊙ M) with M = sum_r (scale_r g^V_r) s_r^T
    # [d_v, d_c], the rows the K of one dot per row block: the accumulator stays [d_v, d_c] however many rows a step
    # takes (127 registers per thread at 128 rows on 4 warps against 214, Triton 3.6 for sm_90: `egmla bench
    # kernel-resources`); else W^V_h s_r per row, [BLOCK_ROWS, d_v], weighted by g^V_r and summed
    w_v = tl.load(wkv_b_ptr + (head * width + D_N + offs_v)[None, :] * stride_w + offs_c[:, None],
                  mask=c_mask[:, None] & v_mask[None, :], other=0.0)  # W^V_h^T [BLOCK_C, BLOCK_V]
    if GATE_DOT:
        acc = tl.zeros([BLOCK_V, BLOCK_C], tl.float32)
    o = tl.zeros([BLOCK_V], tl.float32)
    # WARP_SPECIALIZE: Triton's automatic warp specialization of this loop (loads in a producer warp group, the dots
    # in consumers); for sm_90 Triton 3.6 compiles it only at 8 warps (4 hit compiler assertions)
    for start in tl.range(split * BLOCK_ROWS, n_seq_rows, num_splits * BLOCK_ROWS, warp_specialize=WARP_SPECIALIZE):
        offs_row = start + tl.arange(0, BLOCK_ROWS)
        in_seq = offs_row < n_seq_rows
        row_chunk = tl.load(row_chunk_ptr + batch * stride_cb + offs_row, mask=in_seq, other=-1)
        valid = row_chunk >= 0
        ids = tl.where(valid, tl.load(row_ids_ptr + batch * stride_ib + offs_row, mask=in_seq, other=0), 0).to(tl.int64)
        ids = gate_rows(ids, id_to_row_ptr, valid, ROW_MAP)
        m_row = tl.load(chunk_stats + row_chunk * 3 * BLOCK_H, mask=valid, other=float("-inf"))
        row_scale = tl.exp2(m_row - m_all) * inv_l  # this row's weights, normalised globally
        s_rows = tl.load(s_ptr + batch * stride_rb + offs_row[:, None] * stride_ru + head * BLOCK_C + offs_c[None, :],
                         mask=valid[:, None], other=0.0)
        if SCALED:  # fp8 rows: scaled back and widened to the weights' dtype (folding the scales into the gate's
            # side instead would take it below fp16's normal range)
            s_scale = tl.load(s_scale_ptr + batch * stride_ssb + offs_row * stride_ssr + head, mask=valid, other=0.0)
            s_rows = (s_rows.to(tl.float32) * s_scale[:, None]).to(w_v.dtype)
        if GATE_DOT:
            gate = tl.load(gate_ptr + ids[:, None] * stride_g + head * width + D_N + offs_v[None, :],
                           mask=valid[:, None] & v_mask[None, :], other=0.0)
            scaled_gate = (gate.to(tl.float32) * row_scale[:, None]).to(s_rows.dtype)  # [BLOCK_ROWS, BLOCK_V]
            acc += tl.dot(tl.trans(scaled_gate), s_rows, input_precision=DOT_PRECISION)
        else:
            s_rows = (s_rows.to(tl.float32) * row_scale[:, None]).to(w_v.dtype)
            up = tl.dot(s_rows, w_v, input_precision=DOT_PRECISION)  # W^V_h s per row [BLOCK_ROWS, BLOCK_V]
            gate = tl.load(gate_ptr + ids[:, None] * stride_g + head * width + D_N + offs_v[None, :],
                           mask=valid[:, None] & v_mask[None, :], other=0.0)
            o += tl.sum(up * gate.to(tl.float32), axis=0)
    if GATE_DOT:
        o = tl.sum(acc * tl.trans(w_v).to(tl.float32), axis=1)
    lead = split == 0
    o = o - tl.where(lead, mean_term, 0.0)
    if HAS_WEIGHT:
        o = o * tl.load(weight_ptr + head * width + D_N + offs_v, mask=v_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + head * width + D_N + offs_v, mask=v_mask, other=0.0).to(tl.float32)
        o = o + tl.where(lead & (denom > 0), bias, 0.0)
    if ATOMIC:
        tl.atomic_add(out_ptr + batch * stride_ob + head * stride_oh + offs_v, o, mask=v_mask)
    else:
        tl.store(out_ptr + batch * stride_ob + head * stride_oh + offs_v, o.to(out_ptr.dtype.element_ty), mask=v_mask)


def _check_inputs(q_nope, q_pe, latent, k_rope, ln_stats, plan: GroupedPlan, gate_table, wkv_b) -> int:
    """Shape checks with fixes; returns d_v."""
    batch, heads, d_n = q_nope.shape
    width = wkv_b.shape[0]
    if q_pe.shape[:2] != (batch, heads):
        raise ValueError(f"q_pe.shape={tuple(q_pe.shape)}: expected [batch={batch}, heads={heads}, d_r]")
    for name, x in (("latent", latent), ("k_rope", k_rope), ("ln_stats", ln_stats)):
        if x.shape[0] != batch or x.shape[1] < plan.max_len or x.stride(-1) != 1:
            raise ValueError(f"{name}.shape={tuple(x.shape)}: expected [batch={batch}, >= {plan.max_len}, ...] "
                             f"with a contiguous last dim")
    if ln_stats.dtype != torch.float32 or ln_stats.shape[-1] != 2:
        raise ValueError(f"ln_stats: dtype {ln_stats.dtype}, shape {tuple(ln_stats.shape)}: expected fp32 [..., 2] "
                         f"(mean, rstd) written at append time")
    if width % heads or width // heads <= d_n or wkv_b.shape[1] != latent.shape[-1]:
        raise ValueError(f"wkv_b.shape={tuple(wkv_b.shape)}: expected [heads*(d_n+d_v), d_c] with heads={heads}, "
                         f"d_n={d_n}, d_c={latent.shape[-1]}")
    if wkv_b.stride(-1) != 1:  # the kernels step over rows only
        raise ValueError(f"wkv_b.stride()={wkv_b.stride()}: each row must be contiguous (pass wkv_b.contiguous())")
    if gate_table.shape[-1] != width or gate_table.stride(-1) != 1:
        raise ValueError(f"gate_table.shape={tuple(gate_table.shape)}: expected [vocab, {width}] contiguous rows")
    return width // heads - d_n


def grouped_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                   ln_stats: torch.Tensor, plan: GroupedPlan, gate_table: torch.Tensor, wkv_b: torch.Tensor,
                   norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, scale: float,
                   block_ids: int = 64, heads_per_program: int = 1, block_rows: int = 128,
                   num_splits: int | None = None, num_warps: int | tuple[int, int, int] = (4, 1, 4), stages: int = 3,
                   batch_slice: int | None = None, key_gather: bool = False, gate_dot: bool = True,
                   num_stages: int | tuple[int | None, int | None, int | None] | None = None,
                   warp_specialize: bool = False, out: torch.Tensor | None = None,
                   id_to_row: torch.Tensor | None = None, widen_once: bool | None = None,
                   intermediates: str | None = None) -> torch.Tensor:
    """o [batch, heads, d_v] (dtype of latent; of q_nope over an fp8 cache): same function as `grouped_decode_ref`.

    q_nope [batch, heads, d_n], q_pe [batch, heads, d_r]; cache latent [batch, T, d_c], k_rope [batch, T, d_r],
    ln_stats [batch, T, 2] fp32 (mu, rho); `plan` from `make_plan` (positions [0, lengths[b]) are read);
    gate_table [vocab, heads*(d_n+d_v)] and wkv_b [heads*(d_n+d_v), d_c] in the per-head [k; v] layout;
    the norm's affine norm_weight / norm_bias [heads*(d_n+d_v)] (RMSNorm: no bias). `num_splits` splits
    each (head, sequence)'s rows over programs (default: enough programs to fill the GPU); `stages` < 3
    runs only the first launches (profiling); `batch_slice` runs the launches per slice of that many
    sequences, so that the intermediates of a slice can stay in L2 between launches; `key_gather` scores
    keys by gathering each position's row of A (CUDA cores) instead of one dot per run. `num_warps`: one count
    for the three launches or (absorb, attend, upproj). `gate_dot` sums the up-projection's rows in the K of one
    dot (fewer registers; the default since it measured 40% faster on an H200); False sums W^V_h s per row.
    `num_stages`: Triton's software-pipelining stages, one count or (absorb, attend, upproj); None = Triton's
    default. `warp_specialize`: Triton's automatic warp specialization of the up-projection's row loop (GPU; sm_90
    needs 8 up-projection warps; no faster on an H100: docs/grouped-decode.md). The defaults are the fastest per
    launch on an H200 at paper-base, B = 32, T = 4,096 on code and English ids (docs/grouped-decode.md, "Launch
    settings" and "The up-projection as one dot"). `id_to_row` [vocab] int, if given: id v's gate row is
    gate_table[id_to_row[v]] (a gate-table offload's slot map over the rows resident on the device,
    egmla.infer.offload) instead of gate_table[v]; the grouping stays by id. latent and k_rope may be float8_e4m3fn (an
    fp8 cache): the attend launch widens each tile to the query's dtype as it reads it, `widen_once` as in
    `mla_decode`. `intermediates="fp8"`: the absorbed queries A and the value sums S, which the launches pass through
    memory, stored in float8_e4m3fn with an fp32 scale per (row, head) (max |row| / 448), half their bytes, each
    value rounded once (reference: `grouped_decode_fp8_intermediates_ref`); None keeps them in the compute dtype. fp8
    measured 1.25-1.37x slower on an H100 (more registers, a reduction per row: docs/grouped-decode.md), so the model
    keeps None; it is a launch setting of `egmla bench grouped`."""
    d_v = _check_inputs(q_nope, q_pe, latent, k_rope, ln_stats, plan, gate_table, wkv_b)
    check_id_to_row(id_to_row, gate_table)
    batch, heads, d_n = q_nope.shape
    d_c, d_r = latent.shape[-1], k_rope.shape[-1]
    compute = computes_like(latent, q_nope)
    out = _output(out, (batch, heads, d_v), compute)
    if plan.max_len == 0:
        return out.zero_()
    if batch_slice and batch_slice < batch:
        settings = dict(block_ids=block_ids, heads_per_program=heads_per_program, block_rows=block_rows,
                        num_splits=num_splits, num_warps=num_warps, stages=stages, key_gather=key_gather,
                        gate_dot=gate_dot, num_stages=num_stages, warp_specialize=warp_specialize, id_to_row=id_to_row,
                        widen_once=widen_once, intermediates=intermediates)
        for start in range(0, batch, batch_slice):
            rows = slice(start, start + batch_slice)
            grouped_decode(q_nope[rows], q_pe[rows], latent[rows], k_rope[rows], ln_stats[rows], plan.sequences(rows),
                           gate_table, wkv_b, norm_weight, norm_bias, scale, out=out[rows], **settings)
        return out
    if intermediates not in (None, "fp8"):
        raise ValueError(f"intermediates={intermediates!r}: None (the compute dtype) or 'fp8'")
    scaled = intermediates == "fp8"
    if scaled and key_gather:
        raise ValueError("intermediates='fp8' with key_gather=True: the key gathers read A unscaled; use one or the other")
    device, dtype = latent.device, compute.dtype  # A and S in the model's dtype over an fp8 cache too
    once = widen_once_default(latent.dtype == FP8 and dtype.itemsize == 2, widen_once)
    precision = "ieee" if dtype == torch.float32 else "tf32"
    block_h, block_c = block(heads), block(d_c)
    absorb_warps, attend_warps, upproj_warps = (num_warps,) * 3 if isinstance(num_warps, int) else num_warps
    absorb_stages, attend_stages, upproj_stages = (
        ({"num_stages": n} if n else {}) for n in (num_stages if isinstance(num_stages, tuple) else (num_stages,) * 3))
    if num_splits is None:
        num_splits = choose_row_splits(batch * heads, triton.cdiv(plan.n_rows, block_rows), device)
    atomic = num_splits > 1  # else each program writes its (head, sequence) output directly
    acc = torch.empty(batch, heads, d_v, dtype=torch.float32, device=device) if atomic else out
    weight, bias = (norm_weight if norm_weight is not None else wkv_b), (norm_bias if norm_bias is not None else wkv_b)
    flags = dict(HAS_WEIGHT=norm_weight is not None, HAS_BIAS=norm_bias is not None, DOT_PRECISION=precision,
                 ROW_MAP=id_to_row is not None)
    id_rows = id_to_row if id_to_row is not None else plan.distinct_ids  # (unread without a map)

    # per (sequence, id) and per (sequence, row): the real heads only (the kernels mask the padded ones), a quarter
    # less memory than the padded tile at 12 heads (docs/grouped-decode.md, "Working memory")
    absorbed = torch.empty(batch, max(plan.max_distinct, 1), heads, block_c, dtype=FP8 if scaled else dtype,
                           device=device)
    # fp8 A and S: a scale per (row, head); else unread (the absorbed buffer stands in)
    a_scales = (torch.empty(batch, absorbed.shape[1], heads, dtype=torch.float32, device=device) if scaled
                else absorbed)
    q_sum = torch.empty(batch, heads, dtype=torch.float32, device=device)  # gamma^K . q^C
    q_bias = torch.empty_like(q_sum)  # beta^K . q^C
    _absorb_kernel[(triton.cdiv(plan.max_distinct, block_ids), batch, triton.cdiv(heads, heads_per_program))](
        q_nope, weight, bias, plan.distinct_ids, plan.n_distinct, gate_table, id_rows, wkv_b, absorbed, a_scales, q_sum,
        q_bias, acc,
        q_nope.stride(0), q_nope.stride(1), plan.distinct_ids.stride(0), gate_table.stride(0), wkv_b.stride(0),
        absorbed.stride(0), absorbed.stride(1), a_scales.stride(0), a_scales.stride(1),
        N_HEADS=heads, D_N=d_n, D_V=d_v, D_C=d_c, BLOCK_N=block(d_n), BLOCK_C=block_c, BLOCK_U=block_ids,
        BLOCK_V=block(d_v), HEADS=heads_per_program, ZERO_ACC=atomic, SCALED=scaled, num_warps=absorb_warps,
        **absorb_stages, **flags)
    if stages < 2:
        return out

    sums = torch.empty(batch, plan.n_rows, heads, block_c, dtype=FP8 if scaled else dtype, device=device)
    s_scales = torch.empty(batch, plan.n_rows, heads, dtype=torch.float32, device=device) if scaled else sums
    chunk_stats = torch.empty(batch, plan.n_chunks, 3, block_h, dtype=torch.float32, device=device)
    _attend_kernel[(plan.n_chunks, batch)](
        plan.order, plan.order_slots, plan.lengths, latent, k_rope, ln_stats, absorbed, q_pe, q_sum, q_bias,
        sums, chunk_stats, a_scales, s_scales,
        plan.order.stride(0), latent.stride(0), latent.stride(1), k_rope.stride(0),
        k_rope.stride(1), ln_stats.stride(0), ln_stats.stride(1), absorbed.stride(0), absorbed.stride(1),
        q_pe.stride(0), q_pe.stride(1), sums.stride(0), sums.stride(1), a_scales.stride(0), a_scales.stride(1),
        s_scales.stride(0), s_scales.stride(1), plan.n_chunks, scale * LOG2E,
        N_HEADS=heads, D_C=d_c, D_R=d_r, BLOCK_H=block_h, BLOCK_C=block_c, BLOCK_R=block(d_r),
        BLOCK_T=plan.block_t, KEY_GATHER=key_gather, DOT_PRECISION=precision, WIDEN_ONCE=once, SCALED=scaled,
        num_warps=attend_warps, **attend_stages)
    if stages < 3:
        return out

    _upproj_kernel[(heads, batch, num_splits)](
        sums, plan.row_chunk, plan.lengths, plan.n_distinct, plan.row_ids, chunk_stats, gate_table, id_rows, wkv_b,
        weight, bias, acc, s_scales,
        sums.stride(0), sums.stride(1), plan.row_chunk.stride(0), plan.row_ids.stride(0),
        gate_table.stride(0), wkv_b.stride(0), acc.stride(0), acc.stride(1), s_scales.stride(0), s_scales.stride(1),
        plan.n_chunks, num_splits,
        N_HEADS=heads, D_N=d_n, D_V=d_v, D_C=d_c, BLOCK_H=block_h, BLOCK_V=block(d_v), BLOCK_C=block_c,
        BLOCK_ROWS=block_rows, BLOCK_K=max(16, triton.next_power_of_2(plan.n_chunks)), BLOCK_T=plan.block_t,
        ATOMIC=atomic, GATE_DOT=gate_dot, SCALED=scaled, WARP_SPECIALIZE=warp_specialize, num_warps=upproj_warps,
        **upproj_stages,
        **flags)
    return out.copy_(acc) if acc is not out else out


def choose_row_splits(programs: int, row_blocks: int, device: torch.device, waves: int = 1) -> int:
    """Splits of each (head, sequence)'s rows so that the up-projection has `waves` programs per SM (one: on the
    H200 at B = 32 one split per (head, sequence) beat two by 15-20%, the atomics and repeated softmax merge
    costing more than the extra programs give)."""
    if device.type != "cuda":
        return min(2, row_blocks)  # interpreter: exercise the atomic combine cheaply
    from egmla.kernels.split_combine import _multiprocessors

    target = waves * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(target, programs), row_blocks))
