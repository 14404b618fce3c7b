"""Plain PyTorch reference of the EG-MLA fused decode kernel (egmla/kernels/egmla_decode.py),
gate placement `up` (the paper's), docs/design.md §1:

    kv_t = W_UKV c_t,   x_t = kv_t ⊙ g_t  (or + g_t),   f_t = Norm(x_t)   split per head into [k^C ; v]
    score[b, h, t] = scale * (q^C[b, h] . k^C[b, t, h] + q^R[b, h] . k^R[b, t]),   t < lengths[b]
    o[b, h] = softmax_t(score[b, h]) @ v[b, :, h]

g_t = gate_table[token_ids[b, t]] (EG-MLA-A's precomputed G = E W_UE^T). Everything in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from egmla.kernels.mla_decode_ref import length_mask

NORMS = ("layernorm", "rmsnorm", "none")


def gated_kv(latent: torch.Tensor, gates: torch.Tensor, wkv_b: torch.Tensor, gate_op: str = "mul") -> torch.Tensor:
    """x = (W_UKV c) ⊙ g (or + g), fp32 [batch, T, n_h*(d_n+d_v)], from latent [batch, T, d_c],
    gates [batch, T, n_h*(d_n+d_v)], wkv_b [n_h*(d_n+d_v), d_c]. gate_op 'bias' (the control): the norm's input
    is W_UKV c alone (its table is added after the norm), so x ignores the gates."""
    kv = latent.float() @ wkv_b.float().t()
    if gate_op in ("bias", "bias-v"):
        return kv
    return kv * gates.float() if gate_op == "mul" else kv + gates.float()


def layernorm_stats(latent: torch.Tensor, gates: torch.Tensor, wkv_b: torch.Tensor, eps: float = 1e-6,
                    gate_op: str = "mul", norm: str = "layernorm") -> torch.Tensor:
    """Per-position statistics of x_t = gated_kv(...) that the norm needs: [batch, T, 2] fp32 (mean, rstd).

    layernorm: (mean, 1/sqrt(biased var + eps)); rmsnorm: (0, 1/sqrt(mean(x^2) + eps)); none: (0, 1).
    They are fixed once a token is appended, so a cache may store them (8 bytes per position)."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: choose one of {', '.join(NORMS)}")
    x = gated_kv(latent, gates, wkv_b, gate_op)
    if norm == "layernorm":
        var, mean = torch.var_mean(x, dim=-1, unbiased=False)
        return torch.stack([mean, (var + eps).rsqrt()], dim=-1)
    zeros = torch.zeros_like(x[..., 0])
    if norm == "rmsnorm":
        return torch.stack([zeros, (x.square().mean(-1) + eps).rsqrt()], dim=-1)
    return torch.stack([zeros, torch.ones_like(zeros)], dim=-1)


def egmla_decode_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                     token_ids: torch.Tensor, lengths: torch.Tensor, gate_table: torch.Tensor, wkv_b: torch.Tensor,
                     norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, scale: float,
                     eps: float = 1e-6, gate_op: str = "mul", norm: str = "layernorm") -> torch.Tensor:
    """o [batch, heads, d_v] fp32 for q_nope [batch, heads, d_n], q_pe [batch, heads, d_r], latent [batch, T, d_c],
    k_rope [batch, T, d_r], token_ids [batch, T], lengths [batch], gate_table [vocab, heads*(d_n+d_v)],
    wkv_b [heads*(d_n+d_v), d_c]; the norm's affine norm_weight/norm_bias [heads*(d_n+d_v)] or None."""
    if gate_op not in ("mul", "add"):  # 'bias' adds its table after the norm: bias_decode_ref.py
        raise ValueError(f"gate_op={gate_op!r}: choose mul or add (the bias control: egmla/kernels/bias_decode_ref.py)")
    x = gated_kv(latent, gate_table[token_ids.long()], wkv_b, gate_op)
    weight = norm_weight.float() if norm_weight is not None else None
    bias = norm_bias.float() if norm_bias is not None else None
    if norm == "layernorm":
        x = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    elif norm == "rmsnorm":
        x = F.rms_norm(x, x.shape[-1:], weight, eps)
    elif norm != "none":
        raise ValueError(f"norm={norm!r}: choose one of {', '.join(NORMS)}")
    return attend_rebuilt(q_nope, q_pe, x, k_rope, lengths, scale)


def attend_rebuilt(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor,
                   lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """o [batch, heads, d_v] fp32: softmax attention of q_nope [batch, heads, d_n] (+ q_pe) over rebuilt
    kv [batch, T, heads*(d_n+d_v)] (per head [k^C ; v]) and k_rope [batch, T, d_r], positions t < lengths[b];
    a sequence with no position gets 0."""
    batch, heads, d_n = q_nope.shape
    k_nope, v = kv.view(batch, kv.shape[1], heads, -1).split([d_n, kv.shape[-1] // heads - d_n], dim=-1)
    scores = (torch.einsum("bhd,bthd->bht", q_nope.float(), k_nope)
              + torch.einsum("bhr,btr->bht", q_pe.float(), k_rope.float())) * scale
    visible = length_mask(lengths, kv.shape[1])[:, None, :]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return torch.einsum("bht,bthd->bhd", probs, v)
