"""Rotary position embedding, half-split ("rotate_half") convention as in Llama and transformers.

Pairs (x[i], x[i + D/2]) rotate by angle pos · theta^(-2i/D). Tables are computed once for the
maximum length and gathered by per-sequence positions, so ragged batches need no special case.
"""
from __future__ import annotations

import torch


def rope_tables(dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [max_len, dim // 2], in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def at_least_fp32(*tables: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """RoPE computes in fp32: tables that model.to(bf16) cast go up again (exactly), once per forward where the model
    builds its context, so that no layer converts its query or key to fp32 for the product."""
    return tuple(t if t.dtype in (torch.float32, torch.float64) else t.float() for t in tables)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x [batch, seq, (heads,) dim] by cos/sin [batch, seq, dim // 2], in fp32 (or wider, as the inputs).

    Returns a new tensor of x's dtype, or writes into `out` (x's shape; x itself rotates it in place, as MLA's
    query and key slices do: both halves are computed before either is written). Four elementwise launches; on a
    GPU without autograd (decode, evaluation) one Triton launch instead (egmla/kernels/rope.py), the same numbers
    up to fp32 rounding."""
    cos, sin = at_least_fp32(cos, sin)
    if _kernel_rotates(x, cos):
        from egmla.kernels.rope import rope

        return rope(x, cos, sin, out=out)
    if x.dim() == 4:  # broadcast over heads
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    halves = x.unflatten(-1, (2, -1))  # [..., 2, dim // 2]: x1, x2
    rotated = halves * cos.unsqueeze(-2)  # [x1 cos ; x2 cos], in the wider dtype
    rotated[..., 0, :].addcmul_(halves[..., 1, :], sin, value=-1)  # x1 cos - x2 sin
    rotated[..., 1, :].addcmul_(halves[..., 0, :], sin)  # x2 cos + x1 sin
    if out is None:
        return rotated.flatten(-2).to(x.dtype)
    return out.copy_(rotated.flatten(-2))


def _kernel_rotates(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Where the one-launch kernel replaces the PyTorch rotation: fp32 tables, a contiguous last dim, and a GPU
    tensor that wants no gradient (the kernel has no backward), outside torch.compile."""
    from egmla.kernels import no_grad_kernel_can_run

    return cos.dtype == torch.float32 and x.stride(-1) == 1 and no_grad_kernel_can_run(x)
