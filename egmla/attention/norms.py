"""LayerNorm and RMSNorm that compute in their weights' dtype and return the input's: under bf16 autocast
(fp32 weights, bf16 input) they normalise in fp32 on the fused kernel and hand bf16 on.

nn.RMSNorm on a bf16 input with fp32 weights cannot dispatch to its fused kernel ("Mismatch dtype between
input and weight ... Cannot dispatch to fused implementation") and runs the composite ops; nn.LayerNorm under
CUDA autocast runs in fp32 and returns fp32, which doubles the bytes of what follows it (K/V in MLA and
EG-MLA). Casting the input up to the weights' dtype and the result back gives both the fused fp32 kernel and a
bf16 output. Everywhere else (fp32 or bf16 throughout) the casts are no-ops and these are nn.LayerNorm and
nn.RMSNorm exactly, with the same parameter names, so checkpoints load either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = x if self.weight is None else x.to(self.weight.dtype)
        return F.layer_norm(compute, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = x if self.weight is None else x.to(self.weight.dtype)
        return F.rms_norm(compute, self.normalized_shape, self.weight, self.eps).to(x.dtype)
