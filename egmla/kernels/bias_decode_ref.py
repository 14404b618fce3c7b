"""Plain PyTorch reference of the bias control's absorbed decode kernel (egmla/kernels/bias_decode.py), with the
kernel's inputs and outputs. The control is f_t = Norm(W_UKV c_t) + g_{i_t} (gate_op = "bias"); its decode is
MLA's absorbed attention plus per-id terms (egmla/attention/egmla_equations.py, `bias_absorbed_attention`):

    s_{h,t} = scale (rho_t (qa_h . c_t - mu_t alpha_h) + b0_h + e_{h, slot_t} + q^R_h . k^R_t),   t < lengths[b]
    p = softmax_t(s),   out_latent_h = sum_t p_t rho_t c_t,   mean_h = sum_t p_t rho_t mu_t,
    mass_{h,u} = sum_{t: slot_t = u} p_t

with qa_h = W^K_h^T (gamma^K_h ⊙ q^C_h), alpha_h = gamma^K_h . q^C_h, b0_h = beta^K_h . q^C_h and
e_{h,u} = q^C_h . g^K_{h,u} computed beforehand. The caller finishes o_h = gamma^V_h ⊙ (W^V_h out_latent_h -
mean_h) + beta^V_h + sum_u mass_{h,u} g^V_{h,u}. Everything in fp32; an empty sequence gives zeros.
"""
from __future__ import annotations

import torch


def bias_decode_ref(q_absorbed: torch.Tensor, q_pe: torch.Tensor, q_terms: torch.Tensor, latent: torch.Tensor,
                    k_rope: torch.Tensor, ln_stats: torch.Tensor, slots: torch.Tensor, per_id: torch.Tensor | None,
                    lengths: torch.Tensor, scale: float,
                    n_ids: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out_latent [batch, heads, d_c], mean [batch, heads], mass [batch, heads, U]) fp32 for q_absorbed
    [batch, heads, d_c], q_pe [batch, heads, d_r], q_terms [batch, heads, 2] (alpha, b0), latent [batch, T, d_c],
    k_rope [batch, T, d_r], ln_stats [batch, T, 2] (mu, rho), slots [batch, T] (< U), per_id [batch, heads, U],
    lengths [batch] (positions [0, lengths[b]) are read). per_id=None: no score term (the table on V alone), and
    n_ids gives the mass's width U."""
    max_len = latent.shape[1]
    if per_id is None:
        per_id = q_absorbed.new_zeros(q_absorbed.shape[0], q_absorbed.shape[1], n_ids, dtype=torch.float32)
    latent, k_rope, stats = latent.float(), k_rope.float(), ln_stats[:, :max_len].float()
    mu, rho = stats[..., 0][:, None], stats[..., 1][:, None]  # [batch, 1, T]
    slot = slots[:, :max_len].long().clamp(0, per_id.shape[-1] - 1)[:, None].expand(-1, q_absorbed.shape[1], -1)
    content = torch.einsum("bhc,btc->bht", q_absorbed.float(), latent)
    scores = (rho * (content - mu * q_terms[..., :1].float()) + q_terms[..., 1:].float()
              + per_id.float().gather(2, slot) + torch.einsum("bhr,btr->bht", q_pe.float(), k_rope)) * scale
    visible = (torch.arange(max_len, device=latent.device)[None, :] < lengths[:, None])[:, None]  # [batch, 1, T]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)  # empty sequence: zeros
    weights = probs * rho
    mass = torch.zeros_like(per_id, dtype=torch.float32).scatter_add_(2, slot, probs)
    return torch.einsum("bht,btc->bhc", weights, latent), (weights * mu).sum(-1), mass


def _visible_rows(table: torch.Tensor, ids: torch.Tensor, n_ids: torch.Tensor) -> torch.Tensor:
    """[batch, U, d_e] fp32: each sequence's distinct ids' table rows, zero from n_ids[b] on."""
    live = torch.arange(ids.shape[1], device=ids.device)[None, :] < n_ids[:, None]
    return table[ids.long().clamp(0, table.shape[0] - 1)].float() * live[..., None]


def per_id_scores_ref(q_embed: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, n_ids: torch.Tensor) -> torch.Tensor:
    """[batch, heads, U]: q_embed[b, h] . table[ids[b, u]] (the score term's e_{h,u} through the gate embedding)."""
    return torch.einsum("bhe,bue->bhu", q_embed.float(), _visible_rows(table, ids, n_ids))


def mass_embeddings_ref(mass: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, n_ids: torch.Tensor) -> torch.Tensor:
    """[batch, heads, d_e]: sum_u mass[b, h, u] table[ids[b, u]] (the value term's sum_v P_{h,v} e_v)."""
    return torch.einsum("bhu,bue->bhe", mass.float(), _visible_rows(table, ids, n_ids))
