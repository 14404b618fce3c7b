"""Plain PyTorch reference of the MHA / GQA decode kernel (egmla/kernels/gqa_decode.py):

    o[b, h] = softmax_t(scale * q[b, h] . k[b, t, h // group]) @ v[b, :, h // group],   t < lengths[b]

with group = heads // kv_heads. Everything in fp32; a sequence with no position gets 0.
"""
from __future__ import annotations

import torch

from egmla.kernels.mla_decode_ref import length_mask


def gqa_decode_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """o [batch, heads, head_dim] fp32 for q [batch, heads, head_dim], k, v [batch, T, kv_heads, head_dim]."""
    group = q.shape[1] // k.shape[2]
    k, v = (x.float().repeat_interleave(group, dim=2) for x in (k, v))  # [batch, T, heads, head_dim]
    scores = torch.einsum("bhd,bthd->bht", q.float(), k) * scale
    visible = length_mask(lengths, k.shape[1])[:, None, :]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return torch.einsum("bht,bthd->bhd", probs, v)
