"""Plain PyTorch reference of the MHA / GQA append kernel (egmla/kernels/kv_append.py): what a cached call does with
the new positions' q, k and v before attending, in the ops the model runs otherwise:

    q[b, s] = RoPE(q[b, s], cos[b, s], sin[b, s])                       (in place, every head)
    k_cache[b, positions[b, s]] = RoPE(k[b, s], cos[b, s], sin[b, s])
    v_cache[b, positions[b, s]] = v[b, s]
"""
from __future__ import annotations

import torch

from egmla.kernels.rope_ref import rope_ref


def kv_append_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    rows = torch.arange(q.shape[0], device=q.device)[:, None]
    q.copy_(rope_ref(q, cos, sin))
    k_cache[rows, positions] = rope_ref(k, cos, sin).to(k_cache.dtype)
    v_cache[rows, positions] = v.to(v_cache.dtype)
