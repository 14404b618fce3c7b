"""Multi-head Latent Attention (DeepSeek-V2), DESIGN.md §1.

    c_t            = RMSNorm(W_DKV h_t)                      latent, d_c = kv_lora_rank   (cached)
    k^R_t          = RoPE(W_KR h_t)                          one RoPE key for all heads   (cached)
    [k^C_t ; v_t]  = W_UKV c_t                               per head [d_n ; d_v]
    q_t            = W_Q h_t  or  W_UQ RMSNorm(W_DQ h_t)     per head [q^C (d_n) ; q^R (d_r)]
    score          = (q^C·k^C + q^R·k^R) / sqrt(d_n + d_r)

As in DeepSeek-V3's code, W_DKV and W_KR are one projection `wkv_a` (d -> d_c + d_r) and W_UKV is
`wkv_b` (d_c -> n_h·(d_n + d_v), rows grouped per head as [k^C ; v]).

Decode paths over the cache (c_t, k^R_t):
  naive     rebuild k^C, v for every cached position, then SDPA.
  absorbed  fold W_UK into the query and W_UV into the output, attend over c_t directly
            (an MQA with one shared "head" of width d_c + d_r). Exact in real arithmetic.
  kernel    the absorbed decode as one Triton flash-decoding kernel (egmla/kernels/mla_decode.py)
            for one new token per sequence; prefill uses `absorbed`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from egmla.attention.cache import CacheSpec, LayerCache
from egmla.attention.context import AttnContext, masked_softmax_attention
from egmla.attention.rope import apply_rope
from egmla.config import ModelConfig


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.softmax_scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        if config.q_lora_rank:
            self.wq_a = nn.Linear(config.d_model, config.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(config.q_lora_rank, eps=config.norm_eps)
            self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(config.d_model, self.n_heads * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(config.d_model, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=config.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, config.kv_up_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, config.d_model, bias=False)
        self.decode_path = "naive"

    # ---- what the registry needs ---------------------------------------------------------
    @staticmethod
    def decode_paths(config: ModelConfig) -> tuple[str, ...]:
        return ("naive", "absorbed", "kernel")

    @staticmethod
    def rope_dim(config: ModelConfig) -> int:
        return config.qk_rope_head_dim

    @staticmethod
    def cache_spec(config: ModelConfig, decode_path: str = "naive") -> CacheSpec:
        return CacheSpec({"latent": ((config.kv_lora_rank,), None),
                          "k_rope": ((config.qk_rope_head_dim,), None)})

    def on_decode_path_set(self) -> None:
        """Hook for subclasses that precompute something for a path (EG-MLA's gate table)."""

    # ---- projections ---------------------------------------------------------------------
    def query(self, x: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor]:
        """q^C [batch, seq, heads, d_n] and RoPE'd q^R [batch, seq, heads, d_r]."""
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q = q.view(*x.shape[:2], self.n_heads, -1)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, ctx.cos, ctx.sin)

    def latent(self, x: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores: c_t [batch, seq, d_c] and k^R_t [batch, seq, d_r]."""
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_norm(kv), apply_rope(k_pe, ctx.cos, ctx.sin)

    def expand_kv(self, latent: torch.Tensor, token_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild k^C [batch, len, heads, d_n] and v [batch, len, heads, d_v] from the latent."""
        kv = self.wkv_b(latent).view(*latent.shape[:2], self.n_heads, -1)
        return kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [heads, d_n, d_c] and W_UV [heads, d_v, d_c]: the per-head rows of wkv_b."""
        w = self.wkv_b.weight.view(self.n_heads, -1, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: LayerCache | None = None) -> torch.Tensor:
        q_nope, q_pe = self.query(x, ctx)
        latent, k_pe = self.latent(x, ctx)
        kv_ids = ctx.token_ids
        if cache is not None:
            cache.write(ctx.positions, latent=latent, k_rope=k_pe)
            latent, k_pe = cache.read("latent", ctx.kv_len), cache.read("k_rope", ctx.kv_len)
            kv_ids = ctx.kv_token_ids
        path = self.decode_path if cache is not None else "naive"
        out = getattr(self, "attend_" + path.replace("-", "_"))(q_nope, q_pe, latent, k_pe, kv_ids, ctx)
        return self.wo(out.flatten(2))

    def attend_naive(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        """Rebuild K/V and run SDPA. Returns [batch, seq, heads, d_v]."""
        k_nope, v = self.expand_kv(latent, kv_ids)
        return self.sdpa(q_nope, q_pe, k_nope, k_pe, v, ctx)

    def sdpa(self, q_nope, q_pe, k_nope, k_pe, v, ctx: AttnContext) -> torch.Tensor:
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=ctx.mask, is_causal=not ctx.cached, scale=self.softmax_scale)
        return out.transpose(1, 2)

    def attend_absorbed(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        """Weight absorption: scores and values computed on the latent, never rebuilding K/V."""
        w_uk, w_uv = self.up_weights()
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # W_UK^T q^C per head
        scores = (torch.einsum("bshc,btc->bsht", q_latent, latent)
                  + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * self.softmax_scale
        mask = ctx.mask.transpose(1, 2) if ctx.mask is not None else _causal(scores)
        probs = masked_softmax_attention(scores, mask).to(latent.dtype)
        out_latent = torch.einsum("bsht,btc->bshc", probs, latent)
        return torch.einsum("bshc,hdc->bshd", out_latent, w_uv)  # W_UV per head

    @staticmethod
    def kernel_can_run(q_nope: torch.Tensor, latent: torch.Tensor, ctx: AttnContext, variant: str) -> bool:
        """A Triton decode kernel takes one new token per sequence on a device it runs on; otherwise
        (prefill, no CUDA or Triton) the caller uses its PyTorch path, after a one-time warning."""
        from egmla.kernels import kernel_unavailable_reason, warn_fallback_once

        if q_nope.shape[1] != 1 or not ctx.cached:
            return False
        reason = kernel_unavailable_reason(latent.device)
        if reason:
            warn_fallback_once(f"decode path 'kernel' ({variant})", reason)
            return False
        return True

    def attend_kernel(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        """Absorbed decode through the Triton kernel (one new token per sequence); several new tokens
        (prefill) take the absorbed PyTorch path, and so does a device the kernel cannot run on."""
        if not self.kernel_can_run(q_nope, latent, ctx, "MLA"):
            return self.attend_absorbed(q_nope, q_pe, latent, k_pe, kv_ids, ctx)
        from egmla.kernels.mla_decode import mla_decode

        w_uk, w_uv = self.up_weights()
        q_latent = torch.einsum("bhd,hdc->bhc", q_nope[:, 0], w_uk)  # W_UK^T q^C per head
        lengths = ctx.positions[:, 0] + 1  # the new token sees positions 0..its own
        out_latent = mla_decode(q_latent, q_pe[:, 0].contiguous(), latent, k_pe, lengths, self.softmax_scale)
        return torch.einsum("bhc,hdc->bhd", out_latent, w_uv).unsqueeze(1)  # W_UV per head


def _causal(scores: torch.Tensor) -> torch.Tensor:
    seq, kv_len = scores.shape[1], scores.shape[-1]
    return torch.ones(seq, kv_len, dtype=torch.bool, device=scores.device).tril()[None, :, None]
