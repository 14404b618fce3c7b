"""Rotary position embedding, half-split ("rotate_half") convention as in Llama and transformers.

Pairs (x[i], x[i + D/2]) rotate by angle pos · theta^(-2i/D). Tables are computed once for the
maximum length and gathered by per-sequence positions, so ragged batches need no special case.
"""
import torch


def rope_tables(dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [max_len, dim // 2], in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, seq, (heads,) dim] by cos/sin [batch, seq, dim // 2]."""
    if x.dim() == 4:  # broadcast over heads
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
