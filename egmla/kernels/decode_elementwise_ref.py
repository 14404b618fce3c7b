"""Plain PyTorch references of the decode step's fused elementwise kernels (egmla/kernels/decode_elementwise.py),
rounding where the unfused PyTorch ops round (each op's result in the tensors' dtype):

    add_rms_norm(x, y, w, eps) = (s, s / sqrt(mean(s^2) + eps) * w),   s = x + y
    silu_mul(a, b)             = silu(a) * b                            (SwiGLU's activation)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm_ref(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + y
    return total, F.rms_norm(total, (total.shape[-1],), weight, eps)


def silu_mul_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b
