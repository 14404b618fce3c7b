"""The bias control's absorbed decode in Triton (reference: bias_decode_ref.py; math: egmla/attention/egmla.py).

`egmla-kv64-bias` adds the gate table after the norm, f_t = Norm(W_UKV c_t) + g_{i_t}, so its decode is MLA's
absorbed flash-decoding (one program per (split of the context, sequence), all heads as the M of the dots) with
three additions per position: the norm's rho_t, mu_t from the cache, and a score term e[h, slot_t] gathered
from a small per-(sequence, distinct id) table computed beforehand. The value side needs, besides
sum_t p_t rho_t c_t, the softmax mass of each distinct id; the kernel writes each position's score (log2
domain, 4 B per head) and, once the splits are combined, `_bias_mass_kernel` turns the scores of the
visible positions into probabilities and adds them to their id's mass (atomics; nothing else is initialised
or written per position). Bytes per position: the cache row (c_t, k^R_t), the statistics, the slot, and the
score written and read back.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from egmla.kernels.grouped_decode import position_tile
from egmla.kernels.mla_decode import LOG2E
from egmla.kernels.split_combine import block, choose_num_splits, launch_first_fitting, split_range


@triton.jit
def _bias_decode_kernel(
    q_ptr, q_pe_ptr, q_terms_ptr, latent_ptr, k_rope_ptr, stats_ptr, slots_ptr, per_id_ptr, lengths_ptr,
    part_acc_ptr, part_stats_ptr, scores_ptr,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_lb, stride_lt, stride_kb, stride_kt, stride_tb, stride_tt,
    stride_sb, stride_eb, stride_eh, stride_xb, stride_xh, max_len, num_splits, qk_scale,
    N_HEADS: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements at large batch
    length = tl.minimum(tl.load(lengths_ptr + batch).to(tl.int32), max_len)
    start, end = split_range(length, split, num_splits, BLOCK_T)

    offs_h, offs_c, offs_r = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    h_mask, c_mask, r_mask = offs_h < N_HEADS, offs_c < D_C, offs_r < D_R
    q = tl.load(q_ptr + batch * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                mask=h_mask[:, None] & c_mask[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + batch * stride_pb + offs_h[:, None] * stride_ph + offs_r[None, :],
                   mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    alpha_q = tl.load(q_terms_ptr + (batch * N_HEADS + offs_h) * 2, mask=h_mask, other=0.0)  # gamma^K . q^C
    bias_q = tl.load(q_terms_ptr + (batch * N_HEADS + offs_h) * 2 + 1, mask=h_mask, other=0.0)  # beta^K . q^C
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
        slot = tl.load(slots_ptr + batch * stride_sb + offs_t, mask=t_mask, other=0)
        e = tl.load(per_id_row + slot[None, :], mask=h_mask[:, None] & t_mask[None, :], other=0.0)
        content = tl.dot(q, tl.trans(c_tile), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_T]
        rope = tl.dot(q_pe, tl.trans(r_tile), input_precision=DOT_PRECISION)
        s = (rho[None, :] * (content - mu[None, :] * alpha_q[:, None]) + bias_q[:, None] + e + rope) * qk_scale
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
def _bias_mass_kernel(scores_ptr, slots_ptr, lengths_ptr, m_ptr, inv_ptr, mass_ptr, stride_xb, stride_xh, stride_sb,
                      max_len, n_ids, N_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr):
    """mass[b, h, slot_t] += exp2(s_{h,t} - m_h) * inv_h for the visible positions t < lengths[b] of one tile:
    the scores past a sequence's length are never read (the score buffer is not initialised)."""
    batch = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < N_HEADS
    length = tl.minimum(tl.load(lengths_ptr + batch).to(tl.int32), max_len)
    live = h_mask[:, None] & (offs_t < length)[None, :]
    s = tl.load(scores_ptr + batch * stride_xb + offs_h[:, None] * stride_xh + offs_t[None, :], mask=live, other=0.0)
    m = tl.load(m_ptr + batch * N_HEADS + offs_h, mask=h_mask, other=0.0)
    inv = tl.load(inv_ptr + batch * N_HEADS + offs_h, mask=h_mask, other=0.0)
    slot = tl.load(slots_ptr + batch * stride_sb + offs_t, mask=offs_t < length, other=0)
    slot = tl.minimum(tl.maximum(slot, 0), n_ids - 1)
    p = tl.exp2(s - m[:, None]) * inv[:, None]
    tl.atomic_add(mass_ptr + (batch * N_HEADS + offs_h[:, None]) * n_ids + slot[None, :], p, mask=live)


BLOCK_TS = [64, 32, 16]  # as mla_decode's: the first that fits the device's shared memory
MASS_BLOCK_T = 128


def bias_decode(q_absorbed: torch.Tensor, q_pe: torch.Tensor, q_terms: torch.Tensor, latent: torch.Tensor,
                k_rope: torch.Tensor, ln_stats: torch.Tensor, slots: torch.Tensor, per_id: torch.Tensor,
                lengths: torch.Tensor, scale: float, num_splits: int | None = None,
                block_t: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`bias_decode_ref`'s (out_latent [batch, heads, d_c], mean [batch, heads], mass [batch, heads, U]), fp32,
    from two kernel launches (the pass, then the mass) and a few tensor ops; no host sync, so a CUDA graph can
    capture it."""
    batch, heads, d_c = q_absorbed.shape
    max_len, d_r = latent.shape[1], k_rope.shape[-1]
    expected = {"q_pe": (q_pe, (batch, heads, d_r)), "q_terms": (q_terms, (batch, heads, 2)),
                "k_rope": (k_rope, (batch, max_len, d_r)), "ln_stats": (ln_stats, (batch, max_len, 2)),
                "slots": (slots, (batch, max_len)), "per_id": (per_id, (batch, heads, per_id.shape[-1])),
                "lengths": (lengths, (batch,))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape or tensor.stride(-1) != 1:
            raise ValueError(f"bias_decode: {name}.shape={tuple(tensor.shape)}, expected {shape} with a contiguous "
                             f"last dim")
    if latent.shape[0] != batch or latent.stride(-1) != 1:
        raise ValueError(f"bias_decode: latent.shape={tuple(latent.shape)}, expected [batch={batch}, T, {d_c}]")
    q_absorbed, q_pe = q_absorbed.to(latent.dtype).contiguous(), q_pe.to(latent.dtype).contiguous()
    q_terms, per_id = q_terms.float().contiguous(), per_id.float().contiguous()
    scores = torch.empty(batch, heads, max_len, dtype=torch.float32, device=latent.device)  # read below length only

    def launch(tile):
        splits = num_splits or choose_num_splits(batch, 1, max_len, tile, latent.device)
        part_acc = torch.empty(batch, splits, heads, d_c, dtype=torch.float32, device=latent.device)
        part_stats = torch.empty(batch, splits, heads, 3, dtype=torch.float32, device=latent.device)
        _bias_decode_kernel[(splits, batch)](
            q_absorbed, q_pe, q_terms, latent, k_rope, ln_stats, slots, per_id, lengths, part_acc, part_stats, scores,
            q_absorbed.stride(0), q_absorbed.stride(1), q_pe.stride(0), q_pe.stride(1), latent.stride(0),
            latent.stride(1), k_rope.stride(0), k_rope.stride(1), ln_stats.stride(0), ln_stats.stride(1),
            slots.stride(0), per_id.stride(0), per_id.stride(1), scores.stride(0), scores.stride(1), max_len, splits,
            scale * LOG2E, N_HEADS=heads, D_C=d_c, D_R=d_r, BLOCK_H=block(heads), BLOCK_C=block(d_c),
            BLOCK_R=block(d_r), BLOCK_T=tile, DOT_PRECISION="ieee" if latent.dtype == torch.float32 else "tf32",
            num_warps=4, num_stages=2)
        return part_acc, part_stats

    tiles = [block_t] if block_t else BLOCK_TS
    part_acc, part_stats = launch_first_fitting(("bias", latent.dtype, heads, d_c, d_r, tuple(tiles)), tiles, launch)
    # combine the splits: every split's sums rescaled to the largest running max (a split with no positions
    # has m = -inf and weighs 0), then each distinct id's mass from the stored scores
    m_split, l_split, mean_split = part_stats.unbind(-1)  # [batch, splits, heads]
    m_all = m_split.max(dim=1).values
    m_all = torch.where(torch.isfinite(m_all), m_all, torch.zeros_like(m_all))
    weight = torch.exp2(m_split - m_all[:, None])
    denom = (weight * l_split).sum(1)
    inv = torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    out_latent = (weight[..., None] * part_acc).sum(1) * inv[..., None]
    mean = (weight * mean_split).sum(1) * inv
    mass = torch.zeros_like(per_id)
    n_ids = per_id.shape[-1]
    if n_ids:
        _bias_mass_kernel[(triton.cdiv(max_len, MASS_BLOCK_T), batch)](
            scores, slots, lengths, m_all.contiguous(), inv.contiguous(), mass, scores.stride(0), scores.stride(1),
            slots.stride(0), max_len, n_ids, N_HEADS=heads, BLOCK_H=triton.next_power_of_2(heads),
            BLOCK_T=MASS_BLOCK_T, num_warps=4)
    return out_latent, mean, mass
