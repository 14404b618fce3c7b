"""Plain PyTorch reference of the grouped EG-MLA decode kernel (egmla/kernels/grouped_decode.py):
one query token per sequence, with the kernel's inputs. The equations themselves (DESIGN.md §4b) are
written once, in `egmla.attention.grouped.grouped_attention`; this adapter feeds it."""
from __future__ import annotations

import torch

from egmla.attention.grouped import grouped_attention
from egmla.kernels.mla_decode_ref import length_mask


def grouped_decode_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                       ln_stats: torch.Tensor, slots: torch.Tensor, distinct_ids: torch.Tensor,
                       lengths: torch.Tensor, gate_table: torch.Tensor, wkv_b: torch.Tensor,
                       norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """o [batch, heads, d_v] fp32 for q_nope [batch, heads, d_n], q_pe [batch, heads, d_r], latent [batch, T, d_c],
    k_rope [batch, T, d_r], ln_stats [batch, T, 2], slots [batch, T] (index into distinct_ids [batch, U]),
    lengths [batch] (positions [0, lengths[b]) are read), gate_table [vocab, heads*(d_n+d_v)],
    wkv_b [heads*(d_n+d_v), d_c] (rows per head [k; v]), norm_weight / norm_bias [heads*(d_n+d_v)] or None."""
    heads, d_n = q_nope.shape[1:]
    w = wkv_b.view(heads, -1, wkv_b.shape[-1])
    gates = gate_table[distinct_ids.long()]
    mask = length_mask(lengths, latent.shape[1])[:, None, :]
    out = grouped_attention(q_nope[:, None], q_pe[:, None], latent, k_rope, ln_stats, slots[:, :latent.shape[1]],
                            gates, mask, w[:, :d_n], w[:, d_n:], norm_weight, norm_bias, scale)
    return out[:, 0]
