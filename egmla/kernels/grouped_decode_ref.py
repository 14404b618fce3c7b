"""Plain PyTorch reference of the grouped EG-MLA decode kernel (egmla/kernels/grouped_decode.py), with the
kernel's inputs: the naive rebuild it must equal. Gate placement `up`, gate op `mul`, LayerNorm or RMSNorm.

The grouped kernel never rebuilds K/V (docs/grouped-decode.md); this reference does, position by position,
normalising with the statistics the cache stores:

    x_t = (W_UKV c_t) ⊙ G[i_t],   f_t = gamma ⊙ (x_t - mu_t) rho_t + beta,   split per head into [k^C ; v]
    o[b, h] = softmax_t(scale (q^C . k^C_t + q^R . k^R_t)) @ v_t,   t < lengths[b]

with i_t = distinct_ids[b, slots[b, t]]. Everything in fp32.
"""
from __future__ import annotations

import torch

from egmla.kernels.egmla_decode_ref import attend_rebuilt, gated_kv


def grouped_decode_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                       ln_stats: torch.Tensor, slots: torch.Tensor, distinct_ids: torch.Tensor,
                       lengths: torch.Tensor, gate_table: torch.Tensor, wkv_b: torch.Tensor,
                       norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """o [batch, heads, d_v] fp32 for q_nope [batch, heads, d_n], q_pe [batch, heads, d_r], latent [batch, T, d_c],
    k_rope [batch, T, d_r], ln_stats [batch, T, 2] (mu, rho), slots [batch, T] (index into distinct_ids [batch, U]),
    lengths [batch] (positions [0, lengths[b]) are read), gate_table [vocab, heads*(d_n+d_v)],
    wkv_b [heads*(d_n+d_v), d_c] (rows per head [k; v]), norm_weight / norm_bias [heads*(d_n+d_v)] or None."""
    max_len = latent.shape[1]
    slots = slots[:, :max_len].long().clamp(0, distinct_ids.shape[1] - 1)  # positions past a length: any id
    token_ids = distinct_ids.long().gather(1, slots)
    x = gated_kv(latent, gate_table[token_ids], wkv_b, "mul")
    kv = (x - ln_stats[..., :1].float()) * ln_stats[..., 1:].float()
    if norm_weight is not None:
        kv = kv * norm_weight.float()
    if norm_bias is not None:
        kv = kv + norm_bias.float()
    return attend_rebuilt(q_nope, q_pe, kv, k_rope, lengths, scale)


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float8_e4m3fn (saturated at +-448, nearest even), back in fp32: the fp8 cache's rule
    (egmla.attention.cache.quantize), which the kernels' layer may not import."""
    return x.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()


def grouped_decode_fp8_intermediates_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                                         k_rope: torch.Tensor, ln_stats: torch.Tensor, slots: torch.Tensor,
                                         distinct_ids: torch.Tensor, lengths: torch.Tensor, gate_table: torch.Tensor,
                                         wkv_b: torch.Tensor, norm_weight: torch.Tensor | None,
                                         norm_bias: torch.Tensor | None, scale: float, block_t: int) -> torch.Tensor:
    """o [batch, heads, d_v] fp32 as `grouped_decode(..., intermediates="fp8")` computes it: the grouped equations
    (docs/grouped-decode.md) with the two intermediates the three launches pass through memory rounded to
    float8_e4m3fn, each (row, head) scaled by max |row| / 448 first:
      A[u, h] = W^K_h^T (gamma^K_h ⊙ q^C_h ⊙ g^K_{h, id_u})                       one row per distinct id u
      S[(k, u), h] = sum of w_t c_t over the positions of id u in chunk k          w_t = exp(s_t - m_k) rho_t
    where chunk k is positions [k block_t, (k+1) block_t) of the sequence's positions sorted by slot (then position),
    m_k the chunk's largest score: the rows, and so the rounding, of the kernel's plan; the operands of the products
    that make A and S are cast to q_nope's dtype first, as the kernel's dots take them. Arguments as
    `grouped_decode_ref`'s. Loops over sequences in Python: for tests."""
    def rounded(x):  # per row of the last dim
        amax = x.abs().amax(-1, keepdim=True)
        row_scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
        return e4m3(x / row_scale) * row_scale

    batch, heads, d_n = q_nope.shape
    width, d_c = wkv_b.shape[0] // heads, latent.shape[-1]
    d_v, dtype = width - d_n, q_nope.dtype  # the compute dtype, over an fp8 cache too
    w = wkv_b.float().cpu().view(heads, width, d_c)
    w_k, w_v = w[:, :d_n], w[:, d_n:]
    weight = norm_weight.float().cpu().view(heads, width) if norm_weight is not None else torch.ones(heads, width)
    bias = norm_bias.float().cpu().view(heads, width) if norm_bias is not None else torch.zeros(heads, width)
    out = torch.zeros(batch, heads, d_v)
    for b in range(batch):
        length = int(lengths[b])
        if length == 0:
            continue
        slot = slots[b, :length].long().cpu()
        ids = distinct_ids[b, : int(slot.max()) + 1].long()
        gates = gate_table[ids].float().cpu().view(len(ids), heads, width)
        ids = ids.cpu()
        q = q_nope[b].float().cpu()
        gq = weight[:, :d_n] * q  # gamma^K ⊙ q^C  [h, d_n]
        # the products' operands in the compute dtype, as the kernel's dots take them: a 16-bit operand that rounded
        # otherwise would move a value across an fp8 rounding boundary now and then
        x = (gq * gates[..., :d_n]).to(dtype).float()
        a = rounded(torch.einsum("uhd,hdc->uhc", x, w_k))  # [u, h, d_c]
        c, mu, rho = latent[b, :length].float().cpu(), *ln_stats[b, :length].float().cpu().unbind(-1)
        content = torch.einsum("thc,tc->th", a[slot], c)
        scores = (rho[:, None] * (content - mu[:, None] * gq.sum(-1)) + (bias[:, :d_n] * q).sum(-1)
                  + k_rope[b, :length].float().cpu() @ q_pe[b].float().cpu().T) * scale  # [t, h]
        order = torch.sort(slot, stable=True).indices
        maxima, denominators, means, values = [], [], [], []
        for start in range(0, length, block_t):
            chunk = order[start:start + block_t]
            m_k = scores[chunk].amax(0)
            p = torch.exp(scores[chunk] - m_k)
            weights = p * rho[chunk, None]  # [t, h]
            rows = torch.zeros(len(ids), heads, d_c).index_add_(0, slot[chunk], weights.to(dtype).float()[:, :, None]
                                                               * c[chunk, None, :])
            present = torch.unique(slot[chunk])
            sums = rounded(rows[present])  # the chunk's S rows [rows, h, d_c]
            up = torch.einsum("rhc,hvc->rhv", sums, w_v) * gates[present, :, d_n:]
            maxima.append(m_k), denominators.append(p.sum(0)), means.append((weights * mu[chunk, None]).sum(0))
            values.append(up.sum(0))
        m_all = torch.stack(maxima).amax(0)
        alpha = torch.exp(torch.stack(maxima) - m_all)  # [chunks, h]
        total = (alpha * torch.stack(denominators)).sum(0)
        o = ((alpha[..., None] * torch.stack(values)).sum(0) - (alpha * torch.stack(means)).sum(0)[:, None])
        out[b] = weight[:, d_n:] * o / total[:, None] + bias[:, d_n:]
    return out.to(latent.device)
