"""Plain PyTorch reference of the RoPE kernel (egmla/kernels/rope.py): the half-split rotation, in fp32.

    out[..., :D/2] = x1 cos - x2 sin,   out[..., D/2:] = x2 cos + x1 sin,   x = [x1 ; x2]

with cos, sin [batch, seq, D/2] broadcast over the heads of x [batch, seq, heads, D] (or x [batch, seq, D]).
"""
from __future__ import annotations

import torch


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotated x in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    cos, sin = cos.float(), sin.float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
