"""Plain PyTorch reference of the MLA absorbed decode kernel (egmla/kernels/mla_decode.py).

One query token per sequence; every head attends over the same cached latent (an MQA whose single
key/value "head" is the latent c_t, with the shared RoPE key k^R_t appended to the key):

    score[b, h, t] = scale * (q_latent[b, h] . c[b, t] + q_pe[b, h] . k_rope[b, t]),   t < lengths[b]
    o_latent[b, h] = softmax_t(score[b, h]) @ c[b]

q_latent = W_UK^T q^C per head (absorbed outside); the caller applies W_UV to o_latent.
"""
from __future__ import annotations

import torch


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[batch, max_len] bool: position t of sequence b is cached (t < lengths[b])."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def mla_decode_ref(q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                   lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """o_latent [batch, heads, d_c] in fp32 from q_latent [batch, heads, d_c], q_pe [batch, heads, d_r],
    latent [batch, T, d_c], k_rope [batch, T, d_r], lengths [batch] (1 <= lengths <= T)."""
    q_latent, q_pe, latent, k_rope = (x.float() for x in (q_latent, q_pe, latent, k_rope))
    scores = (torch.einsum("bhc,btc->bht", q_latent, latent) + torch.einsum("bhr,btr->bht", q_pe, k_rope)) * scale
    scores = scores.masked_fill(~length_mask(lengths, latent.shape[1])[:, None, :], float("-inf"))
    return torch.einsum("bht,btc->bhc", scores.softmax(dim=-1), latent)
