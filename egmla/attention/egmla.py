"""Embedding-Gated MLA (Cai & Hou, arXiv 2509.16686), DESIGN.md §1.

MLA plus a token-specific gate. Per layer an embedding table E_l [vocab, d_e]; for token id i_t

    e_t = E_l[i_t]                    g_t = W_UE e_t
    placement "up" (paper):      kv_t = W_UKV c_t,   f_t = Norm(kv_t ⊙ g_t)   split per head into k^C, v
    placement "latent" (ours):   f_t = Norm(c_t ⊙ g_t),   [k^C ; v] = W_UKV f_t   (f_t is cached)

`gate_op="add"` replaces ⊙ with +, `gate_norm` picks LayerNorm (paper), RMSNorm or none (ablations).
The norm of the paper's placement covers the whole n_h·(d_n + d_v) vector, so MLA's weight absorption
does not apply to it: decode rebuilds K/V per position. The cache still holds only c_t and k^R_t;
the gate is recomputed from the token id, stored once per sequence.

Decode paths:
  up:      naive       recompute g = W_UE E[id] for every cached position, rebuild K/V, SDPA
           gate-table  the paper's EG-MLA-A: G = E W_UE^T precomputed once, decode gathers rows
  latent:  naive       rebuild K/V from the cached f_t
           absorbed    MLA's absorbed decode over f_t (the gate is already inside the cache)
  both:    kernel      Triton: up = fused rebuild-and-attend (egmla/kernels/egmla_decode.py) over the
                       gate table, latent = MLA's absorbed decode kernel
  up, mul, LayerNorm/RMSNorm:
           grouped     exact decode grouped by token id (DESIGN.md §4b, egmla/attention/grouped.py): the
                       cache also holds each position's norm statistics; rebuild work scales with distinct ids
"""
from __future__ import annotations

import torch
from torch import nn

from egmla.attention import grouped
from egmla.attention.cache import CacheSpec
from egmla.attention.context import AttnContext
from egmla.attention.mla import MultiHeadLatentAttention
from egmla.config import ModelConfig


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    return nn.Identity()


class EmbeddingGatedMLA(MultiHeadLatentAttention):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.gate_op, self.gate_placement = config.gate_op, config.gate_placement
        self.gate_embed = nn.Embedding(config.vocab_size, config.gate_dim)  # E_l
        self.wue = nn.Linear(config.gate_dim, config.gate_out_dim, bias=False)  # W_UE
        self.gate_norm = make_norm(config.gate_norm, config.gate_out_dim, config.norm_eps)
        self.gate_table: torch.Tensor | None = None  # G_l = E_l W_UE^T, built for "gate-table"

    @staticmethod
    def decode_paths(config: ModelConfig) -> tuple[str, ...]:
        if config.gate_placement == "latent":
            return ("naive", "absorbed", "kernel")
        return ("naive", "gate-table", "kernel") + (("grouped",) if grouped.supports_grouped(config) else ())

    @staticmethod
    def cache_spec(config: ModelConfig, decode_path: str = "naive") -> CacheSpec:
        spec = MultiHeadLatentAttention.cache_spec(config, decode_path)
        if decode_path == "grouped":  # + (mu, rho) of each position, and positions grouped by token id
            tensors = {**spec.tensors, "ln_stats": ((2,), torch.float32)}
            return CacheSpec(tensors, needs_token_ids=True, needs_token_groups=True)
        if decode_path == "kernel" and config.gate_placement == "up":  # + (mu, rho): the fused kernel reads them
            return CacheSpec({**spec.tensors, "ln_stats": ((2,), torch.float32)}, needs_token_ids=True)
        return CacheSpec(spec.tensors, needs_token_ids=config.gate_placement == "up")

    def on_decode_path_set(self) -> None:
        if self.decode_path == "gate-table" or (self.decode_path == "kernel" and self.gate_placement == "up"):
            self.build_gate_table()
        else:
            self.gate_table = None

    @torch.no_grad()
    def build_gate_table(self) -> torch.Tensor:
        """G_l [vocab, gate_out]: every token's gate, computed once (rebuild after weights change)."""
        self.gate_table = self.wue(self.gate_embed.weight)
        return self.gate_table

    def gate(self, token_ids: torch.Tensor, use_table: bool = False) -> torch.Tensor:
        """g [batch, len, gate_out] for token ids [batch, len]."""
        if use_table:
            if self.gate_table is None:
                raise RuntimeError("gate table not built: call model.set_decode_path('gate-table') first")
            return self.gate_table[token_ids.long()]
        return self.wue(self.gate_embed(token_ids.long()))

    def gated_norm(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Norm(x ⊙ g) or Norm(x + g)."""
        return self.gate_norm(x * gate if self.gate_op == "mul" else x + gate)

    # ---- placement "latent": gate c_t before it is cached ---------------------------------
    def latent(self, x: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor]:
        latent, k_pe = super().latent(x, ctx)
        if self.gate_placement == "latent":
            latent = self.gated_norm(latent, self.gate(ctx.token_ids))  # f_t, cached in place of c_t
        return latent, k_pe

    # ---- placement "up": gate the rebuilt K/V --------------------------------------------
    def expand_kv(self, latent: torch.Tensor, token_ids: torch.Tensor | None,
                  use_table: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gate_placement == "latent":
            return super().expand_kv(latent, token_ids)
        kv = self.gated_norm(self.wkv_b(latent), self.gate(token_ids, use_table))  # f_t
        kv = kv.view(*latent.shape[:2], self.n_heads, -1)
        return kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

    def attend_gate_table(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        k_nope, v = self.expand_kv(latent, kv_ids, use_table=True)
        return self.sdpa(q_nope, q_pe, k_nope, k_pe, v, ctx)

    # ---- Triton decode ("kernel") ---------------------------------------------------------
    def attend_kernel(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        """Placement up: fused Triton decode, K/V rebuilt on chip from c_t, the gate-table row and the
        position's norm statistics; prefill, or a device the kernel cannot run on, takes 'gate-table'.
        Placement latent: MLA's absorbed decode kernel over the cached f_t."""
        if self.gate_placement == "latent":
            return super().attend_kernel(q_nope, q_pe, latent, k_pe, kv_ids, ctx)
        if not self.kernel_can_run(q_nope, latent, ctx, "EG-MLA"):
            return self.attend_gate_table(q_nope, q_pe, latent, k_pe, kv_ids, ctx)
        from egmla.kernels.egmla_decode import egmla_decode

        norm = self.gate_norm
        stats = ctx.kv_ln_stats if ctx.kv_ln_stats is not None else self.ln_stats(latent, kv_ids)
        out = egmla_decode(q_nope[:, 0], q_pe[:, 0], latent, k_pe, kv_ids, stats,
                           ctx.positions[:, 0] + 1, self.gate_table, self.wkv_b.weight,
                           getattr(norm, "weight", None), getattr(norm, "bias", None), self.softmax_scale,
                           gate_op=self.gate_op)
        return out.unsqueeze(1)

    def ln_stats(self, latent: torch.Tensor, kv_ids: torch.Tensor) -> torch.Tensor:
        """[batch, len, 2] fp32 (mean, rstd) of each cached position's gated K/V, for the fused kernel.

        Recomputed for the whole context by one Triton pass (a second rebuild per step): used only when
        the cache holds no statistics (the 'kernel' path's cache stores them at append time)."""
        from egmla.kernels.egmla_decode import layernorm_stats_triton

        kind = {nn.LayerNorm: "layernorm", nn.RMSNorm: "rmsnorm"}.get(type(self.gate_norm), "none")
        return layernorm_stats_triton(latent, kv_ids, self.gate_table, self.wkv_b.weight, self.n_heads,
                                      self.qk_nope_head_dim, getattr(self.gate_norm, "eps", 0.0) or 0.0,
                                      gate_op=self.gate_op, norm=kind)

    # ---- decode grouped by token id ("grouped", DESIGN.md §4b) ------------------------------
    def forward(self, x: torch.Tensor, ctx: AttnContext, cache=None) -> torch.Tensor:
        if cache is not None and self.decode_path == "grouped":
            return grouped.forward(self, x, ctx, cache)  # also writes each new position's (mu, rho)
        if cache is not None and self.decode_path == "kernel" and self.gate_placement == "up":
            return grouped.forward_with_stats(self, x, ctx, cache, self.attend_kernel)
        return super().forward(x, ctx, cache)

    def attend_grouped(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        """Exact EG-MLA attention grouped by token id: Triton kernels for one new token per sequence
        on CUDA, the PyTorch reference otherwise. Returns [batch, seq, heads, d_v]."""
        return grouped.attend(self, q_nope, q_pe, latent, k_pe, ctx)
