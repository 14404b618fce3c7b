"""EG-MLA decode grouped by token id in one fused Triton kernel (reference: grouped_decode_ref.py; math:
docs/grouped-decode.md). Gate placement `up`, gate op `mul`, LayerNorm or RMSNorm.

One program per (group of 4 heads, block of BLOCK_U distinct ids, sequence), after the per-step plan of
grouped_decode.make_plan (positions in grouped order, shared by all layers, no host sync under bounds):

  1. a_{h,u} = W^K_h^T (gamma^K_h ⊙ q^C_h ⊙ g^K_{h,u}) for the block's ids: one [BLOCK_U, d_n] x [d_n, d_c]
     tensor-core dot per head, kept on chip as A [4 * BLOCK_U, d_c] (row h * BLOCK_U + u);
  2. the block's positions (contiguous in grouped order) in tiles of BLOCK_T: scores for every (head, id)
     of the block in one dot c_tile x A^T, each position keeping its own id's column; online softmax;
     S [4 * BLOCK_U, d_c] += (w one-hot by id)^T x c_tile, so s_{h,u} = sum over u's positions of w_t c_t;
  3. o_h = sum_u g^V_{h,u} ⊙ (W^V_h s_{h,u}) - sum_t w_t mu_t: one dot per head; the unnormalised partial
     with its (m, l) goes to a per-block slot, and a small combine merges the blocks of a sequence and
     applies gamma^V, beta^V.

Nothing per (sequence, id) goes through HBM: W^K, W^V and the gate rows are read once per block of ids,
the cache tiles (c_t, k^R_t, mu_t, rho_t) once per group of heads (the groups of a block are neighbours in
the grid, so that their reads can share L2).

Measured 2-3x slower than the three launches of grouped_decode.py on an H200 (docs/grouped-decode.md): a
program holding A and S needs 168-255 registers per thread, so few run per SM, and each walks its tiles in
series. It is kept as a benchmark launch setting (`egmla bench grouped`), not the model's path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from egmla.kernels import block
from egmla.kernels.grouped_decode import GroupedPlan, _check_inputs, position_tile, store_value_output
from egmla.kernels.mla_decode import LOG2E, _output

HEADS_PER_PROGRAM = 4  # the kernel is written for groups of 4 heads (two levels of tl.join)


@triton.jit
def _absorb_head(q_ptr, weight_ptr, bias_ptr, gate_ptr, wkv_b_ptr, ids, u_mask, head, stride_qh, stride_g,
                 stride_w, N_HEADS: tl.constexpr, D_N: tl.constexpr, D_V: tl.constexpr, D_C: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """(a [BLOCK_U, BLOCK_C] in the weights' dtype, gamma^K . q^C, beta^K . q^C) of one head; zeros past N_HEADS."""
    offs_n, offs_c = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_C)
    n_mask = offs_n < tl.where(head < N_HEADS, D_N, 0)  # (a scalar & a vector mask breaks the interpreter)
    width: tl.constexpr = D_N + D_V
    q = tl.load(q_ptr + head * stride_qh + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    gq = q
    if HAS_WEIGHT:
        gq = q * tl.load(weight_ptr + head * width + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    q_bias = 0.0
    if HAS_BIAS:
        q_bias = tl.sum(q * tl.load(bias_ptr + head * width + offs_n, mask=n_mask, other=0.0).to(tl.float32), axis=0)
    gate = tl.load(gate_ptr + ids[:, None] * stride_g + head * width + offs_n[None, :],
                   mask=u_mask[:, None] & n_mask[None, :], other=0.0)
    w_k = tl.load(wkv_b_ptr + (head * width + offs_n)[:, None] * stride_w + offs_c[None, :],
                  mask=n_mask[:, None] & (offs_c < D_C)[None, :], other=0.0)
    x = (gate.to(tl.float32) * gq[None, :]).to(w_k.dtype)
    a = tl.dot(x, w_k, input_precision=DOT_PRECISION).to(w_k.dtype)
    return a, tl.sum(gq, axis=0), q_bias


@triton.jit
def _upproj_head(s_h, gate_ptr, wkv_b_ptr, ids, u_mask, head, mean_term, part_ptr, stride_g, stride_w,
                 N_HEADS: tl.constexpr, D_N: tl.constexpr, D_V: tl.constexpr, D_C: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Store sum_u g^V_{h,u} ⊙ (W^V_h s_{h,u}) - mean_term for one head (nothing past N_HEADS)."""
    offs_c, offs_v = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_V)
    v_mask = offs_v < tl.where(head < N_HEADS, D_V, 0)
    width: tl.constexpr = D_N + D_V
    w_v = tl.load(wkv_b_ptr + (head * width + D_N + offs_v)[None, :] * stride_w + offs_c[:, None],
                  mask=(offs_c < D_C)[:, None] & v_mask[None, :], other=0.0)  # W^V_h^T [BLOCK_C, BLOCK_V]
    up = tl.dot(s_h.to(w_v.dtype), w_v, input_precision=DOT_PRECISION)  # [BLOCK_U, BLOCK_V]
    gate = tl.load(gate_ptr + ids[:, None] * stride_g + head * width + D_N + offs_v[None, :],
                   mask=u_mask[:, None] & v_mask[None, :], other=0.0)
    o = tl.sum(up * gate.to(tl.float32), axis=0) - mean_term
    tl.store(part_ptr + head * D_V + offs_v, o, mask=v_mask)


@triton.jit
def _pick(values, index, i: tl.constexpr):
    """values[i] of a small vector, as a scalar."""
    return tl.sum(tl.where(index == i, values, 0.0), axis=0)


@triton.jit
def _grouped_fused_kernel(q_ptr, q_pe_ptr, weight_ptr, bias_ptr, gate_ptr, wkv_b_ptr,
                          latent_ptr, k_rope_ptr, stats_ptr, order_ptr, slots_ptr, offsets_ptr, ids_ptr,
                          n_distinct_ptr, lengths_ptr, part_acc_ptr, part_ml_ptr,
                          stride_qb, stride_qh, stride_pb, stride_ph, stride_g, stride_w,
                          stride_lb, stride_lt, stride_kb, stride_kt, stride_tb, stride_tt,
                          stride_ob, stride_sb, stride_fb, stride_ib, n_blocks, qk_scale,
                          N_HEADS: tl.constexpr, D_N: tl.constexpr, D_V: tl.constexpr, D_C: tl.constexpr,
                          D_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_V: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_T: tl.constexpr,
                          HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    group = tl.program_id(0)  # fastest: the head groups of one block share the cache tiles through L2
    blk = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)  # offsets past 2^31 elements at large batch
    HG: tl.constexpr = 4
    head0 = group * HG
    offs_g = tl.arange(0, HG)
    g_mask = head0 + offs_g < N_HEADS
    part = (batch * n_blocks + blk) * N_HEADS + head0  # [batch, block, head] partial rows
    ml = part_ml_ptr + (part + offs_g) * 2
    n_ids = tl.load(n_distinct_ptr + batch)
    first = blk * BLOCK_U
    if first >= n_ids:  # past this sequence's ids (bounds sized for graph capture): an empty partial
        tl.store(ml, tl.full([HG], float("-inf"), tl.float32), mask=g_mask)
        tl.store(ml + 1, tl.zeros([HG], tl.float32), mask=g_mask)
        offs_v = tl.arange(0, BLOCK_V)
        tl.store(part_acc_ptr + (part + offs_g)[:, None] * D_V + offs_v[None, :], tl.zeros([HG, BLOCK_V], tl.float32),
                 mask=g_mask[:, None] & (offs_v < D_V)[None, :])
        return
    length = tl.load(lengths_ptr + batch)
    offs_u = tl.arange(0, BLOCK_U)
    u_mask = first + offs_u < n_ids
    ids = tl.load(ids_ptr + batch * stride_ib + first + offs_u, mask=u_mask, other=0).to(tl.int64)
    start = tl.load(offsets_ptr + batch * stride_fb + first)
    has_next = first + BLOCK_U < n_ids
    end = tl.where(has_next, tl.load(offsets_ptr + batch * stride_fb + tl.minimum(first + BLOCK_U, n_ids - 1)),
                   length)

    # 1. a_{h,u} for the 4 heads, stacked as A [4 * BLOCK_U, BLOCK_C] (row h * BLOCK_U + u)
    q_row = q_ptr + batch * stride_qb
    a0, qs0, qb0 = _absorb_head(q_row, weight_ptr, bias_ptr, gate_ptr, wkv_b_ptr, ids, u_mask, head0, stride_qh,
                                stride_g, stride_w, N_HEADS, D_N, D_V, D_C, BLOCK_N, BLOCK_C, HAS_WEIGHT, HAS_BIAS,
                                DOT_PRECISION)
    a1, qs1, qb1 = _absorb_head(q_row, weight_ptr, bias_ptr, gate_ptr, wkv_b_ptr, ids, u_mask, head0 + 1, stride_qh,
                                stride_g, stride_w, N_HEADS, D_N, D_V, D_C, BLOCK_N, BLOCK_C, HAS_WEIGHT, HAS_BIAS,
                                DOT_PRECISION)
    a2, qs2, qb2 = _absorb_head(q_row, weight_ptr, bias_ptr, gate_ptr, wkv_b_ptr, ids, u_mask, head0 + 2, stride_qh,
                                stride_g, stride_w, N_HEADS, D_N, D_V, D_C, BLOCK_N, BLOCK_C, HAS_WEIGHT, HAS_BIAS,
                                DOT_PRECISION)
    a3, qs3, qb3 = _absorb_head(q_row, weight_ptr, bias_ptr, gate_ptr, wkv_b_ptr, ids, u_mask, head0 + 3, stride_qh,
                                stride_g, stride_w, N_HEADS, D_N, D_V, D_C, BLOCK_N, BLOCK_C, HAS_WEIGHT, HAS_BIAS,
                                DOT_PRECISION)
    stacked = tl.join(tl.join(a0, a1), tl.join(a2, a3))  # [U, C, head % 2, head // 2]
    absorbed = tl.reshape(tl.permute(stacked, (3, 2, 0, 1)), (HG * BLOCK_U, BLOCK_C))
    # Head lanes: the dots need every dimension >= 16, so per-head vectors have HL = 16 lanes (4 used)
    HL: tl.constexpr = 16
    offs_l = tl.arange(0, HL)
    q_sum = tl.where(offs_l == 0, qs0, tl.where(offs_l == 1, qs1, tl.where(offs_l == 2, qs2, qs3)))
    q_sum = tl.where(offs_l < HG, q_sum, 0.0)
    q_bias = tl.where(offs_l == 0, qb0, tl.where(offs_l == 1, qb1, tl.where(offs_l == 2, qb2, qb3)))
    q_bias = tl.where(offs_l < HG, q_bias, 0.0)
    offs_r = tl.arange(0, BLOCK_R)
    l_mask = (offs_l < HG) & (head0 + offs_l < N_HEADS)
    q_pe = tl.load(q_pe_ptr + batch * stride_pb + (head0 + offs_l)[:, None] * stride_ph + offs_r[None, :],
                   mask=l_mask[:, None] & (offs_r < D_R)[None, :], other=0.0)  # [HL, BLOCK_R]
    # Row j = h * BLOCK_U + u of A and S: `same_id[t, j]` keeps position t's own id, `lane_of[j, h]` maps
    # rows to head lanes, so that every step below is a plain 2-D dot or elementwise op.
    offs_j = tl.arange(0, HG * BLOCK_U)
    lane_of = ((offs_j // BLOCK_U)[:, None] == offs_l[None, :]).to(latent_ptr.dtype.element_ty)  # [HG*U, HL]

    # 2. the block's positions, grouped by id, in tiles: scores, online softmax, per-id value sums
    offs_c = tl.arange(0, BLOCK_C)
    c_mask, r_mask = offs_c < D_C, offs_r < D_R
    m = tl.full([HL], float("-inf"), tl.float32)
    l = tl.zeros([HL], tl.float32)
    mean_sum = tl.zeros([HL], tl.float32)  # sum_t w_t mu_t
    sums = tl.zeros([HG * BLOCK_U, BLOCK_C], tl.float32)  # S: row h * BLOCK_U + u
    for tile in range(start, end, BLOCK_T):
        offs_t = tile + tl.arange(0, BLOCK_T)
        t_mask = offs_t < end
        pos = tl.load(order_ptr + batch * stride_ob + offs_t, mask=t_mask, other=0).to(tl.int64)
        u_t = tl.load(slots_ptr + batch * stride_sb + pos, mask=t_mask, other=-1) - first
        c_tile, r_tile, mu, rho = position_tile(latent_ptr + batch * stride_lb, k_rope_ptr + batch * stride_kb,
                                                stats_ptr + batch * stride_tb, pos, t_mask, stride_lt, stride_kt,
                                                stride_tt, offs_c, offs_r, c_mask, r_mask)
        same_id = (offs_j % BLOCK_U)[None, :] == u_t[:, None]  # [T, HG*U]
        every = tl.dot(c_tile, tl.trans(absorbed), input_precision=DOT_PRECISION)  # a_{h,u} . c_t, all (h, u)
        own = tl.where(same_id, every, 0.0)  # (fp32: a bf16 round here would move the scores)
        content = tl.zeros([BLOCK_T, HL], tl.float32)  # [T, HL]: a_{h,i_t} . c_t
        for h in tl.static_range(HG):
            per_head = tl.sum(tl.where((offs_j // BLOCK_U == h)[None, :], own, 0.0), axis=1)
            content = tl.where(offs_l[None, :] == h, per_head[:, None], content)
        rope = tl.dot(r_tile, tl.trans(q_pe), input_precision=DOT_PRECISION)  # [T, HL]
        s = (rho[:, None] * (content - mu[:, None] * q_sum[None, :]) + q_bias[None, :] + rope) * qk_scale
        s = tl.where(t_mask[:, None], s, float("-inf"))  # log2 domain: exp2 below
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[None, :])
        w = p * rho[:, None]  # w_t = p_t rho_t
        l = l * alpha + tl.sum(p, axis=0)
        mean_sum = mean_sum * alpha + tl.sum(w * mu[:, None], axis=0)
        w_rows = tl.dot(w.to(c_tile.dtype), tl.trans(lane_of), input_precision=DOT_PRECISION)  # [T, HG*U]: w of row's head
        w_own = tl.where(same_id, w_rows, 0.0).to(c_tile.dtype)
        alpha_rows = tl.sum(tl.where(lane_of > 0, alpha[None, :], 0.0), axis=1)  # [HG*U]
        sums = sums * alpha_rows[:, None] + tl.dot(tl.trans(w_own), c_tile, input_precision=DOT_PRECISION)
        m = m_new
    lanes = part_ml_ptr + (part + offs_l) * 2
    tl.store(lanes, m, mask=l_mask)
    tl.store(lanes + 1, l, mask=l_mask)

    # 3. up-project and gate each head's per-id sums
    split = tl.permute(tl.reshape(sums, (2, 2, BLOCK_U, BLOCK_C)), (2, 3, 1, 0))  # [U, C, head % 2, head // 2]
    low, high = tl.split(split)
    s0, s1 = tl.split(low)
    s2, s3 = tl.split(high)
    acc = part_acc_ptr + part * D_V
    _upproj_head(s0, gate_ptr, wkv_b_ptr, ids, u_mask, head0, _pick(mean_sum, offs_l, 0), acc - head0 * D_V,
                 stride_g, stride_w, N_HEADS, D_N, D_V, D_C, BLOCK_C, BLOCK_V, DOT_PRECISION)
    _upproj_head(s1, gate_ptr, wkv_b_ptr, ids, u_mask, head0 + 1, _pick(mean_sum, offs_l, 1), acc - head0 * D_V,
                 stride_g, stride_w, N_HEADS, D_N, D_V, D_C, BLOCK_C, BLOCK_V, DOT_PRECISION)
    _upproj_head(s2, gate_ptr, wkv_b_ptr, ids, u_mask, head0 + 2, _pick(mean_sum, offs_l, 2), acc - head0 * D_V,
                 stride_g, stride_w, N_HEADS, D_N, D_V, D_C, BLOCK_C, BLOCK_V, DOT_PRECISION)
    _upproj_head(s3, gate_ptr, wkv_b_ptr, ids, u_mask, head0 + 3, _pick(mean_sum, offs_l, 3), acc - head0 * D_V,
                 stride_g, stride_w, N_HEADS, D_N, D_V, D_C, BLOCK_C, BLOCK_V, DOT_PRECISION)


@triton.jit
def _combine_blocks_kernel(part_acc_ptr, part_ml_ptr, n_distinct_ptr, out_ptr, weight_ptr, bias_ptr,
                           n_blocks, stride_ob, stride_oh,
                           N_HEADS: tl.constexpr, D_N: tl.constexpr, D_V: tl.constexpr, BLOCK_V: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_U: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                           HAS_BIAS: tl.constexpr):
    """out[b, h] = gamma^V ⊙ sum_k 2^(m_k - M) acc_k / sum_k 2^(m_k - M) l_k + beta^V over the sequence's
    blocks k (an empty sequence gets 0, not beta)."""
    head = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    used = tl.cdiv(tl.load(n_distinct_ptr + batch), BLOCK_U)
    offs_v = tl.arange(0, BLOCK_V)
    v_mask = offs_v < D_V
    rows = (batch * n_blocks) * N_HEADS + head
    m_all = tl.full([], float("-inf"), tl.float32)
    for start in range(0, used, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        m_all = tl.maximum(m_all, tl.max(tl.load(part_ml_ptr + (rows + offs_s * N_HEADS) * 2, mask=offs_s < used,
                                                 other=float("-inf")), axis=0))
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.zeros([BLOCK_V], tl.float32)
    denom = tl.zeros([], tl.float32)
    for start in range(0, used, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        s_mask = offs_s < used
        row = rows + offs_s * N_HEADS
        scale = tl.exp2(tl.load(part_ml_ptr + row * 2, mask=s_mask, other=float("-inf")) - m_all)
        denom += tl.sum(tl.load(part_ml_ptr + row * 2 + 1, mask=s_mask, other=0.0) * scale, axis=0)
        acc = tl.load(part_acc_ptr + row[:, None] * D_V + offs_v[None, :], mask=s_mask[:, None] & v_mask[None, :],
                      other=0.0)
        total += tl.sum(acc * scale[:, None], axis=0)
    y = tl.where(denom > 0, total / tl.where(denom > 0, denom, 1.0), 0.0)
    store_value_output(y, denom, weight_ptr, bias_ptr, out_ptr, head, batch, stride_ob, stride_oh, offs_v, v_mask, D_N,
                       D_V, HAS_WEIGHT, HAS_BIAS)


def grouped_decode_fused(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                         ln_stats: torch.Tensor, plan: GroupedPlan, gate_table: torch.Tensor, wkv_b: torch.Tensor,
                         norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, scale: float,
                         block_ids: int = 32, block_t: int = 32, num_warps: int = 4, num_stages: int = 2,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """o [batch, heads, d_v] (dtype of latent): same function as `grouped_decode_ref`, same inputs as
    grouped_decode.grouped_decode. `block_ids` distinct ids per program (BLOCK_U), `block_t` positions per tile."""
    d_v = _check_inputs(q_nope, q_pe, latent, k_rope, ln_stats, plan, gate_table, wkv_b)
    batch, heads, d_n = q_nope.shape
    d_c, d_r = latent.shape[-1], k_rope.shape[-1]
    out = _output(out, (batch, heads, d_v), latent)
    if plan.max_len == 0 or batch == 0:
        return out.zero_()
    device, dtype = latent.device, latent.dtype
    n_blocks = triton.cdiv(max(plan.max_distinct, 1), block_ids)
    part_acc = torch.empty(batch, n_blocks, heads, d_v, dtype=torch.float32, device=device)
    part_ml = torch.empty(batch, n_blocks, heads, 2, dtype=torch.float32, device=device)
    weight, bias = (norm_weight if norm_weight is not None else wkv_b), (norm_bias if norm_bias is not None else wkv_b)
    flags = dict(HAS_WEIGHT=norm_weight is not None, HAS_BIAS=norm_bias is not None)
    _grouped_fused_kernel[(triton.cdiv(heads, HEADS_PER_PROGRAM), n_blocks, batch)](
        q_nope, q_pe, weight, bias, gate_table, wkv_b, latent, k_rope, ln_stats, plan.order, plan.slots, plan.offsets,
        plan.distinct_ids, plan.n_distinct, plan.lengths, part_acc, part_ml,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), gate_table.stride(0), wkv_b.stride(0),
        latent.stride(0), latent.stride(1), k_rope.stride(0), k_rope.stride(1), ln_stats.stride(0), ln_stats.stride(1),
        plan.order.stride(0), plan.slots.stride(0), plan.offsets.stride(0), plan.distinct_ids.stride(0),
        n_blocks, scale * LOG2E,
        N_HEADS=heads, D_N=d_n, D_V=d_v, D_C=d_c, D_R=d_r, BLOCK_N=block(d_n), BLOCK_C=block(d_c),
        BLOCK_R=block(d_r), BLOCK_V=block(d_v), BLOCK_U=block_ids, BLOCK_T=block_t,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages,
        **flags)
    _combine_blocks_kernel[(heads, batch)](
        part_acc, part_ml, plan.n_distinct, out, weight, bias, n_blocks, out.stride(0), out.stride(1),
        N_HEADS=heads, D_N=d_n, D_V=d_v, BLOCK_V=triton.next_power_of_2(d_v), BLOCK_S=16, BLOCK_U=block_ids,
        num_warps=2, **flags)
    return out
