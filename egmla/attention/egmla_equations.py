"""EG-MLA's decode equations in plain PyTorch, one line of math per line of code: the grouped decode
(docs/grouped-decode.md) and the bias controls' absorbed decode. `EmbeddingGatedMLA` (egmla/attention/egmla.py)
and the controls' `TableBiasMLA` (egmla/attention/table_bias.py) run them where their Triton kernels do not
(egmla/kernels/grouped_decode.py, bias_decode.py), and the latter builds its folded decode weights with
`split_heads`; tests/attention/test_grouped.py and test_bias_absorbed.py test them directly.
"""
from __future__ import annotations

import torch


# ---- the norm's affine and the gate rows, split per head: shared by both PyTorch decodes below ---------------
def split_heads(vector: torch.Tensor | None, n_heads: int, d_n: int, fill: float,
                dtype=torch.float32) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """A [..., n_h*(d_n+d_v)] vector in wkv_b's per-head [k; v] layout -> its K [..., n_h, d_n] and V [..., n_h, d_v]
    parts, in `dtype`; when the vector is absent (no affine weight, or no bias) the float `fill` for both, not a
    tensor (callers test `torch.is_tensor`)."""
    if vector is None:
        return fill, fill
    per_head = vector.to(dtype).unflatten(-1, (n_heads, -1))
    return per_head[..., :d_n], per_head[..., d_n:]


# ---- the grouped decode's equations (docs/grouped-decode.md), in PyTorch ------------------------------------
# Per cached position t the cache holds c_t, k^R_t and the norm statistics of x_t = (W_UKV c_t) ⊙ g_t:
# mu_t = mean(x_t), rho_t = 1/sqrt(var(x_t) + eps) (RMSNorm: mu_t = 0, rho_t = 1/sqrt(mean(x_t^2) + eps), no beta).
# Then, exactly:
#   a_{h,v} = W^K_h^T (gamma^K_h ⊙ q^C_h ⊙ g^K_{h,v})                                  once per distinct id v
#   score_t = scale (rho_t (a_{h,i_t} . c_t - mu_t gamma^K_h . q^C_h) + beta^K_h . q^C_h + q^R_h . k^R_t)
#   w_t = softmax_t(score)_t rho_t,   s_{h,v} = sum_{t: i_t = v} w_t c_t
#   o_h = gamma^V_h ⊙ sum_v g^V_{h,v} ⊙ (W^V_h s_{h,v}) - gamma^V_h sum_t w_t mu_t + beta^V_h
def grouped_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                      ln_stats: torch.Tensor, slots: torch.Tensor, gates: torch.Tensor, mask: torch.Tensor,
                      w_uk: torch.Tensor, w_uv: torch.Tensor, gamma: torch.Tensor | None,
                      beta: torch.Tensor | None, scale: float) -> torch.Tensor:
    """docs/grouped-decode.md's equations, one line each (fp32; fp64 for fp64 inputs). Returns o [b, s, h, d_v].

    q_nope [b, s, h, d_n], q_pe [b, s, h, d_r]; cache latent [b, T, d_c], k_pe [b, T, d_r],
    ln_stats [b, T, 2] (mu, rho); slots [b, T] (index into the distinct ids), gates [b, U, h*(d_n+d_v)]
    (gate rows of the distinct ids, per-head [k; v] layout); mask [b, s, T] (True = attend);
    w_uk [h, d_n, d_c], w_uv [h, d_v, d_c]; gamma/beta [h*(d_n+d_v)] or None (RMSNorm: beta None)."""
    n_heads, d_n = q_nope.shape[2], q_nope.shape[3]
    dt = torch.promote_types(q_nope.dtype, torch.float32)
    q, q_pe, latent, k_pe = q_nope.to(dt), q_pe.to(dt), latent.to(dt), k_pe.to(dt)
    mu, rho = ln_stats[..., 0].to(dt)[:, None, None, :], ln_stats[..., 1].to(dt)[:, None, None, :]
    gate_k, gate_v = split_heads(gates, n_heads, d_n, 1.0, dt)  # [b, U, h, d_n], [b, U, h, d_v]
    gamma_k, gamma_v = split_heads(gamma, n_heads, d_n, 1.0, dt)
    beta_k, beta_v = split_heads(beta, n_heads, d_n, 0.0, dt)
    gq = gamma_k * q  # gamma^K ⊙ q^C  [b, s, h, d_n]
    absorbed = torch.einsum("bshd,buhd,hdc->bshuc", gq, gate_k, w_uk.to(dt))  # a_{h,v}, once per id
    index = slots.long().clamp(0, gates.shape[1] - 1)[:, None, None, :, None]
    index = index.expand(*absorbed.shape[:3], -1, latent.shape[-1])  # [b, s, h, T, d_c]: the slot of t
    content = torch.einsum("bshtc,btc->bsht", absorbed.gather(3, index), latent)  # a_{h,i_t} . c_t
    query_bias = (beta_k * q).sum(-1) if torch.is_tensor(beta_k) else torch.zeros_like(gq[..., 0])  # beta^K . q^C
    scores = (rho * (content - mu * gq.sum(-1)[..., None]) + query_bias[..., None]
              + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * scale
    visible = mask[:, :, None, :]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).masked_fill(~visible, 0.0)
    weights = probs.nan_to_num(0.0) * rho  # w_t = p_t rho_t; a query with nothing visible gets 0
    sums = torch.zeros_like(absorbed).scatter_add_(3, index, weights[..., None] * latent[:, None, None])  # s_{h,v}
    up = torch.einsum("bshuc,hdc->bshud", sums, w_uv.to(dt))  # W^V_h s_{h,v}
    grouped = (gate_v.permute(0, 2, 1, 3)[:, None] * up).sum(3)  # sum_v g^V_{h,v} ⊙ (W^V_h s_{h,v})
    mean_term = (weights * mu).sum(-1)[..., None]  # sum_t w_t mu_t
    out = gamma_v * (grouped - mean_term) + beta_v
    return out * visible.any(-1)[..., None]


# ---- the bias controls' absorbed decode ('bias', 'bias-v'), in PyTorch --------------------------------------
# f_t = Norm(kv_t) + g_{i_t} with kv_t = W_UKV c_t: the norm sees no gate, so with mu_t, rho_t of kv_t, exactly
#   score_t = scale (rho_t (qa_h . c_t - mu_t gamma^K_h . q^C_h) + beta^K_h . q^C_h + r_{h,i_t} + q^R_h . k^R_t),
#             qa_h = W^K_h^T (gamma^K_h ⊙ q^C_h)  (MLA's absorbed query),  r_{h,v} = q^C_h . g^K_{h,v}  per distinct id
#             (0 for 'bias-v', whose gate rows are 0 in the K slots)
#   o_h = gamma^V_h ⊙ (W^V_h sum_t w_t c_t - sum_t w_t mu_t) + beta^V_h + sum_v P_{h,v} g^V_{h,v},
#             w_t = p_t rho_t,  P_{h,v} = sum_{t: i_t = v} p_t
def bias_absorbed_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                            ln_stats: torch.Tensor, slots: torch.Tensor, gates: torch.Tensor, mask: torch.Tensor,
                            w_uk: torch.Tensor, w_uv: torch.Tensor, gamma: torch.Tensor | None,
                            beta: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The equations above, one line each (fp32; fp64 for fp64 inputs); arguments as `grouped_attention`'s,
    with ln_stats the (mu, rho) of the ungated kv_t. Returns o [b, s, h, d_v]."""
    n_heads, d_n = q_nope.shape[2], q_nope.shape[3]
    dt = torch.promote_types(q_nope.dtype, torch.float32)
    q, q_pe, latent, k_pe = q_nope.to(dt), q_pe.to(dt), latent.to(dt), k_pe.to(dt)
    mu, rho = ln_stats[..., 0].to(dt)[:, None, None, :], ln_stats[..., 1].to(dt)[:, None, None, :]
    gate_k, gate_v = split_heads(gates, n_heads, d_n, 0.0, dt)  # [b, U, h, d_n], [b, U, h, d_v]
    gamma_k, gamma_v = split_heads(gamma, n_heads, d_n, 1.0, dt)
    beta_k, beta_v = split_heads(beta, n_heads, d_n, 0.0, dt)
    gq = gamma_k * q  # gamma^K ⊙ q^C  [b, s, h, d_n]
    q_absorbed = torch.einsum("bshd,hdc->bshc", gq, w_uk.to(dt))  # MLA's W_UK^T (gamma ⊙ q) per head
    per_id = torch.einsum("bshd,buhd->bshu", q, gate_k)  # r_{h,v} = q^C . g^K_{h,v}, once per distinct id
    slot = slots.long().clamp(0, gates.shape[1] - 1)[:, None, None, :].expand(*per_id.shape[:3], -1)  # [b, s, h, T]
    query_bias = (beta_k * q).sum(-1) if torch.is_tensor(beta_k) else torch.zeros_like(gq[..., 0])  # beta^K . q^C
    content = torch.einsum("bshc,btc->bsht", q_absorbed, latent)
    scores = (rho * (content - mu * gq.sum(-1)[..., None]) + query_bias[..., None] + per_id.gather(3, slot)
              + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * scale
    visible = mask[:, :, None, :]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).masked_fill(~visible, 0.0).nan_to_num(0.0)
    weights = probs * rho  # w_t = p_t rho_t
    # W^V_h sum_t w_t c_t
    rebuilt = torch.einsum("bshc,hdc->bshd", torch.einsum("bsht,btc->bshc", weights, latent), w_uv.to(dt))
    mean_term = (weights * mu).sum(-1)[..., None]  # sum_t w_t mu_t
    mass = torch.zeros_like(per_id).scatter_add_(3, slot, probs)  # P_{h,v}
    table_term = torch.einsum("bshu,buhd->bshd", mass, gate_v)  # sum_v P_{h,v} g^V_{h,v}
    out = gamma_v * (rebuilt - mean_term) + beta_v + table_term
    return out * visible.any(-1)[..., None]
