"""Plain PyTorch reference of the latent append kernel (egmla/kernels/latent_append.py): what MLA's cached call
does with the new positions' down-projection [c ; k^R] before attending, in the ops the model runs otherwise:

    latent[b, positions[b, s]] = RMSNorm(c[b, s]) * w          (in fp32, rounded to the cache's dtype once)
    k_rope[b, positions[b, s]] = RoPE(k^R[b, s], cos[b, s], sin[b, s])
    stats.out[b, positions[b, s]] = layernorm_stats(latent[b, positions[b, s]], gates of the new ids, W_UKV)   (stats)
    q_rope[b, s] = RoPE(q_rope[b, s], cos[b, s], sin[b, s])      (in place, every head; q_rope)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from egmla.kernels.egmla_decode_ref import layernorm_stats
from egmla.kernels.rope_ref import rope_ref


def latent_append_ref(projected: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                      sin: torch.Tensor, positions: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                      keep_latent: bool = False, stats=None, q_rope: torch.Tensor | None = None) -> torch.Tensor | None:
    d_c = latent.shape[-1]
    c, k_pe = projected[..., :d_c].float(), projected[..., d_c:]
    normed = F.rms_norm(c, (d_c,), None if weight is None else weight.float(), eps)
    rows = torch.arange(projected.shape[0], device=projected.device)[:, None]
    latent[rows, positions] = normed.to(latent.dtype)
    k_rope[rows, positions] = rope_ref(k_pe, cos, sin).to(k_rope.dtype)
    if q_rope is not None:  # the query's RoPE slice, in place
        q_rope.copy_(rope_ref(q_rope, cos, sin))
    if stats is not None:  # latent_append.AppendedStats
        gates = stats.gate_table[stats.token_ids.long()]
        stats.out[rows, positions] = layernorm_stats(normed.to(latent.dtype), gates, stats.wkv_b, stats.eps,
                                                     stats.gate_op, stats.norm)
    return normed.to(latent.dtype) if keep_latent else None
