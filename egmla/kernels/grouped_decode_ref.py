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
