"""Embedding-Gated MLA (Cai & Hou, arXiv 2509.16686), docs/design.md §1.

MLA plus a token-specific gate. Per layer an embedding table E_l [vocab, d_e]; for token id i_t

    e_t = E_l[i_t]                    g_t = W_UE e_t     (gate_init="identity": g_t = 1 + W_UE e_t)
    placement "up" (paper):      kv_t = W_UKV c_t,   f_t = Norm(kv_t ⊙ g_t)   split per head into k^C, v
    placement "latent" (ours):   f_t = Norm(c_t ⊙ g_t),   [k^C ; v] = W_UKV f_t   (f_t is cached)

`gate_op="add"` replaces ⊙ with +, `gate_norm` picks LayerNorm (paper), RMSNorm or none (ablations).
Controls (issue 18) change one thing each:
  gate_init="identity"     g_t = 1 + W_UE e_t with W_UE = 0 at the start (Transformer.reset_parameters):
                           every gate starts at exactly 1, where the paper's g_t = W_UE e_t starts with
                           variance 1 per entry (e_t ~ N(0, 1), W_UE ~ N(0, 1/d_e)).
  gate_op="bias", "bias-v" the same-table controls, f_t = Norm(kv_t) + g_t: the table added after the norm, gating
                           nothing; their own class with their own 'absorbed' decode, `TableBiasMLA`
                           (egmla/attention/table_bias.py).
The norm of the paper's placement covers the whole n_h·(d_n + d_v) vector, so MLA's weight absorption
does not apply to it: decode rebuilds K/V per position ('naive', 'gate-table', 'kernel') or per distinct
id ('grouped'). The cache holds c_t and k^R_t, plus on 'kernel' and 'grouped' each position's norm statistics
(mu, rho) per layer; the gate is recomputed from the token id, which the cache stores once per position for all
layers.

Decode paths, all in this class (their table: `EmbeddingGatedMLA.UP_PATHS`, placement latent MLA's); the
equations of 'grouped' in plain PyTorch in egmla/attention/egmla_equations.py:
  up:      naive       recompute g = W_UE E[id] for every cached position, rebuild K/V, SDPA
           gate-table  the paper's EG-MLA-A: G = E W_UE^T precomputed once, decode gathers rows
           kernel      Triton fused rebuild-and-attend over the gate table (egmla/kernels/egmla_decode.py);
                       the cache also holds each position's norm statistics (mu, rho)
           grouped     (mul; LayerNorm or RMSNorm) exact decode grouped by token id (docs/grouped-decode.md):
                       rebuild work scales with the distinct ids of a context; the cache holds (mu, rho)
                       and the token groups. The equations in PyTorch: `grouped_attention`; the
                       Triton kernels in egmla/kernels/grouped_decode.py
  latent:  naive       rebuild K/V from the cached f_t
           absorbed    MLA's absorbed decode over f_t (the gate is already inside the cache)
           kernel      MLA's absorbed decode kernel over f_t
A prompt into an empty cache takes the causal pass on every path (`attend_causal`: K/V rebuilt, FlashAttention
on CUDA). A later chunk of several new tokens on 'kernel' and 'grouped' takes the gate-table rebuild, which is
exact and compute-bound there anyway; so does 'kernel' on a device Triton cannot run on (with one warning), while
'grouped' there takes its PyTorch equations.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from egmla.attention.cache import FP8, CacheSpec, LayerCache, quantize
from egmla.attention.context import AttnContext, decode_kernel_can_run
from egmla.attention.egmla_equations import grouped_attention
from egmla.attention.gate_table import DeviceRows, GateRows
from egmla.attention.mla import MultiHeadLatentAttention
from egmla.attention.norms import LayerNorm, RMSNorm
from egmla.attention.paths import DecodePath, path_table
from egmla.attention.precomputed import sources_key
from egmla.config import ModelConfig
from egmla.kernels import computes_like, kernel_unavailable_reason


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps)  # fp32 norm, bf16 out under autocast (egmla/attention/norms.py)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    return nn.Identity()


def supports_grouped(config: ModelConfig) -> bool:
    """The grouped decode needs the norm to factor per position (LayerNorm, RMSNorm) and the gate to
    multiply (an additive gate does not factor out of W_UKV c_t); the gate must sit after W_UKV."""
    return (config.attention == "eg-mla" and config.gate_placement == "up" and config.gate_op == "mul"
            and config.gate_norm in ("layernorm", "rmsnorm"))


_STATS_CACHE_NEEDED = ("decode_path='{path}' needs a cache with LayerNorm statistics and token groups: call "
                       "model.set_decode_path('{path}') before model.new_cache(...)")


class EmbeddingGatedMLA(MultiHeadLatentAttention):
    # Placement up: every path but 'naive' reads the precomputed gate table G_l = E_l W_UE^T (built when the path is
    # set, beside the embeddings E_l it comes from: the memory planner counts both, egmla.infer.plan); the Triton
    # ones keep each position's norm statistics (mu, rho) in the cache, and 'grouped' and the bias controls'
    # 'absorbed' its token groups (positions by id). Placement latent takes MLA's paths (`decode_path_table`).
    UP_PATHS = path_table(
        DecodePath("naive", "attend_naive", gate_rows_by_id=True),
        DecodePath("gate-table", "attend_gate_table", reads_weights=True, reads_gate_table=True, gate_rows_by_id=True),
        DecodePath("kernel", "attend_kernel", reads_weights=True, reads_gate_table=True, keeps_stats=True,
                   reads_own_positions=True, gate_rows_by_id=True),
        DecodePath("grouped", "attend_grouped", reads_weights=True, reads_gate_table=True, keeps_stats=True,
                   keeps_token_groups=True, reads_own_positions=True, gate_rows_by_id=True))
    # Placement latent caches f_t in place of c_t and decodes it with MLA's paths; the gate reads E_l's rows by id
    # when a position is appended.
    LATENT_PATHS = {name: dataclasses.replace(path, gate_rows_by_id=True)
                    for name, path in MultiHeadLatentAttention.DECODE_PATHS.items()}

    @property
    def fuses_append(self) -> bool:
        return self.gate_placement == "up"  # placement latent gates c_t before it is cached

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.gate_op, self.gate_placement = config.gate_op, config.gate_placement
        self.identity_gate = config.gate_init == "identity"
        self.gate_embed = nn.Embedding(config.vocab_size, config.gate_dim)  # E_l
        self.wue = nn.Linear(config.gate_dim, config.gate_out_dim, bias=False)  # W_UE
        self.gate_norm = make_norm(config.gate_norm, config.gate_norm_dim, config.norm_eps)
        self.norm_kind = config.gate_norm
        # G_l = E_l W_UE^T, built for the paths that read it: its rows (egmla.attention.gate_table), on the device or
        # under an offload (egmla.infer.offload) its stand-in, as gate_embed then is
        self.gate_table: GateRows | None = None
        self.gate_table_from: tuple | None = None  # gate_sources_key() when it was built
        self.grouped_backend = "auto"  # 'grouped' one-token steps: auto (Triton on CUDA), kernel or pytorch

    # ---- what the registry needs ---------------------------------------------------------
    @staticmethod
    def decode_path_table(config: ModelConfig) -> dict[str, DecodePath]:
        if config.gate_placement == "latent":  # f_t is cached in place of c_t: MLA's paths over it
            return dict(EmbeddingGatedMLA.LATENT_PATHS)
        names = ("naive", "gate-table", "kernel") + (("grouped",) if supports_grouped(config) else ())
        return {name: EmbeddingGatedMLA.UP_PATHS[name] for name in names}

    @classmethod
    def cache_spec(cls, config: ModelConfig, decode_path: str = "naive") -> CacheSpec:
        spec = MultiHeadLatentAttention.cache_spec(config, decode_path)
        if config.gate_placement == "latent":
            return spec  # f_t is cached in place of c_t: the gate needs no id at decode time
        path = cls.decode_path_table(config)[decode_path]
        if path.keeps_stats:  # + (mu, rho) of each position, written at append
            return CacheSpec({**spec.tensors, "ln_stats": ((2,), torch.float32)}, needs_token_ids=True,
                             needs_token_groups=path.keeps_token_groups)
        return CacheSpec(spec.tensors, needs_token_ids=True)

    @property
    def gates_offloaded(self) -> bool:
        """Whether an offload (egmla.infer.offload) serves the gate rows: its stand-in, `GateRows`, holds E_l's place
        (told by that interface, not by the embedding's class: peft wraps a real nn.Embedding in a module of its own)."""
        return isinstance(self.gate_embed, GateRows)

    def check_path_switch(self, path: str, keep_precomputed: bool) -> None:
        """Before any layer switches: with offloaded gate tables (egmla.infer.offload) only a switch that keeps them
        works (building a table needs E_l on the device; dropping one would lose the offload's stand-in)."""
        if not self.gates_offloaded:
            return
        no_table = self.paths[path].reads_gate_table and self.gate_table is None
        if not keep_precomputed or no_table:
            raise ValueError(f"set_decode_path({path!r}): this model's gate tables are offloaded to host memory; "
                             f"call restore() on its GateTableOffload first" + (
                                 " (the offload holds no gate table G_l for this path: it was made on a path that "
                                 "reads none)" if no_table else
                                 ", or pass keep_precomputed=True to keep the offloaded tables serving the new path"))

    def on_decode_path_set(self, keep_precomputed: bool = False) -> None:
        """Build the gate table for the paths that read it; keep_precomputed: keep one already built (a CUDA graph
        captured on the previous path reads that tensor: GenerationEngine switching between 'kernel' and 'grouped')."""
        if self.gates_offloaded:  # keep the offload's stand-ins
            if self.gate_placement == "latent":
                super().on_decode_path_set(keep_precomputed)
            return
        if self.gate_placement == "latent":
            self.gate_table = None
            super().on_decode_path_set(keep_precomputed)  # MLA's folded absorption
        elif self.path.reads_gate_table:
            if keep_precomputed and self.gate_table is not None:
                self.refresh_gate_table()
            else:
                self.build_gate_table()
        else:
            self.gate_table = None

    @torch.no_grad()
    def build_gate_table(self) -> torch.Tensor:
        """G_l = E_l W_UE^T [vocab, n_h (d_n + d_v)]: every token's gate in the per-head [k; v] layout (as `up_project`
        makes it: zeros in the K slots for 'bias-v', 1 + ... for the identity start), computed once
        (refresh_gate_table builds it again when its source weights change). Returns the tensor; `gate_table` holds
        its rows (`DeviceRows`)."""
        table = self.up_project(self.gate_embed.weight)
        self.gate_table, self.gate_table_from = DeviceRows(table), self.gate_sources_key()
        return table

    def gate_sources_key(self) -> tuple | None:
        """E_l and W_UE as egmla.attention.precomputed.sources_key identifies them; None while an offload serves the
        rows (egmla.infer.offload: the tables then live on the host, copied once)."""
        if not isinstance(self.gate_embed, nn.Embedding):
            return None
        return sources_key(self, self.gate_embed.weight, self.wue.weight)

    def refresh_gate_table(self) -> None:
        """Build the gate table again if a source weight changed since it was built (in place, as an optimizer step
        or load_state_dict does, or moved): a cached call after training reads the new gates, as the paths without
        a table do. A no-op without a table or under an offload."""
        key = self.gate_sources_key()
        if self.gate_table is not None and not self.gates_offloaded and self.gate_table_from != key:
            # gate_table_like may have cast it to the cache's dtype: keep that cast, unless the weights themselves
            # changed dtype (model.to(torch.bfloat16)): then the table follows them, as a fresh build would
            same_dtype = self.gate_table_from is not None and key is not None and \
                [k[2] for k in self.gate_table_from[:2]] == [k[2] for k in key[:2]]  # the two weights' dtypes
            dtype = self.gate_table.dtype
            table = self.build_gate_table()
            if same_dtype:
                self.gate_table = DeviceRows(table.to(dtype))

    def refresh_precomputed(self) -> None:
        """MLA's folded absorption and the gate table, built again where a source weight changed or moved."""
        super().refresh_precomputed()
        self.refresh_gate_table()

    # ---- the gate ------------------------------------------------------------------------
    def gate(self, token_ids: torch.Tensor, use_table: bool = False) -> torch.Tensor:
        """g [batch, len, n_h (d_n + d_v)] (placement up, per-head [k; v] layout) or [batch, len, d_c] (placement
        latent) for token ids [batch, len]: from the gate table's rows (use_table), else W_UE E[ids]."""
        if use_table:
            if self.gate_table is None:
                raise RuntimeError("gate table not built: call model.set_decode_path('gate-table') first")
            return self.gate_table[token_ids.long()]
        return self.up_project(self.gate_embed(token_ids.long()))

    def up_project(self, embedding: torch.Tensor) -> torch.Tensor:
        """g = W_UE e, or 1 + W_UE e for gate_init='identity'."""
        gate = self.wue(embedding)
        return gate + 1.0 if self.identity_gate else gate

    def gated_norm(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Norm(x ⊙ g) or Norm(x + g)."""
        return self.gate_norm(x * gate if self.gate_op == "mul" else x + gate)

    def norm_stats(self, latent: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq, 2] fp32 (mu, rho) of the norm's input x_t (`norm_input`): what the norm needs of each position,
        fixed once it is appended, so the 'kernel' and 'grouped' caches store it (8 B per position and layer).
        LayerNorm: (mean, 1/sqrt(biased var + eps)); RMSNorm: (0, 1/sqrt(mean(x^2) + eps)); none: (0, 1)."""
        x = self.norm_input(F.linear(latent.float(), self.wkv_b.weight.float()), token_ids)
        zeros = torch.zeros_like(x[..., 0])
        if self.norm_kind == "layernorm":
            var, mean = torch.var_mean(x, dim=-1, unbiased=False)
            return torch.stack([mean, (var + self.gate_norm.eps).rsqrt()], dim=-1)
        if self.norm_kind == "rmsnorm":
            return torch.stack([zeros, (x.square().mean(-1) + self.gate_norm.eps).rsqrt()], dim=-1)
        return torch.stack([zeros, torch.ones_like(zeros)], dim=-1)

    def norm_input(self, kv: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """x_t = kv_t ⊙ g_t (or + g_t) in fp32, kv_t = W_UKV c_t: the gates from the table's rows where it is built
        (the gates the decode kernels read), not W_UE E[ids] per token."""
        table = self.gate_table is not None and self.gate_table.device == token_ids.device
        gate = self.gate(token_ids, use_table=table).float()
        return kv * gate if self.gate_op == "mul" else kv + gate

    def appended_stats(self, latent: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """`norm_stats` of the given positions, through `stats_pass` where it runs. Not on the model's own path (the
        append writes the statistics through `write_stats`, which makes the same choice); tests compare the two."""
        if self.stats_pass_runs(latent):
            return self.stats_pass(latent, token_ids)
        return self.norm_stats(latent, token_ids)

    def stats_pass_runs(self, latent: torch.Tensor) -> bool:
        """Where the Triton kernels run, one pass over the gate table the decode kernels read (`layernorm_stats_triton`)
        replaces the ~10 small PyTorch launches per layer and step of `norm_stats` (a fp32 W_UKV product, the gate's
        up-projection, the norm's reductions). A prompt takes the same pass on CUDA (the PyTorch equations' fp32
        W_UKV product alone was 4.9 of 91 ms of kernels in a batch-32 EG-MLA prefill on the H200:
        docs/bench/prefill_h200_diagnostics/); in Triton's CPU interpreter only single positions do (it is slow)."""
        return not (self.norm_kind == "none" or not self.path.keeps_stats
                    or kernel_unavailable_reason(latent.device) is not None
                    or (latent.shape[1] != 1 and latent.device.type != "cuda"))

    def stats_pass(self, latent: torch.Tensor, token_ids: torch.Tensor, out: torch.Tensor | None = None,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
        """`layernorm_stats_triton` of the layer's weights and gate table; out and positions: written at
        out[b, positions[b, t]] (the cache's statistics) by the pass itself."""
        from egmla.kernels.egmla_decode import layernorm_stats_triton

        table, table_rows = self.kernel_gates(latent).kernel_rows(token_ids, latent.dtype)
        return layernorm_stats_triton(latent, table_rows, table, self.wkv_b.weight, self.n_heads,
                                      self.qk_nope_head_dim, self.gate_norm.eps, gate_op=self.gate_op,
                                      norm=self.norm_kind, block_t=16 if latent.shape[1] == 1 else 64, out=out,
                                      positions=positions)

    # ---- placement "latent": gate c_t before it is cached ---------------------------------
    def latent(self, x: torch.Tensor, ctx: AttnContext,
               projected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        latent, k_pe = super().latent(x, ctx, projected)
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

    def keys_values(self, latent: torch.Tensor, k_pe: torch.Tensor, token_ids: torch.Tensor | None,
                    pad_v: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the causal pass (`attend_causal`). Placement up: the norm covers every head's [k^C ; v], so K is a
        cat of its output with k^R and v stays d_v wide (causal_attention pads it); the gate table's rows where it is
        built (the table-reading paths), else W_UE E[ids], the same gates. Placement latent: MLA's."""
        if self.gate_placement == "latent":
            return super().keys_values(latent, k_pe, token_ids, pad_v)
        # Never under autograd: the table is built without it, so E_l and W_UE would get no gradient from it
        use_table = self.gate_table is not None and not torch.is_grad_enabled() and not self.wrapped_weights
        if use_table:
            self.refresh_gate_table()  # an eval pass after training steps reads the current gates
        k_nope, v = self.expand_kv(latent, token_ids, use_table=use_table)
        return torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1), v

    def append(self, cache: LayerCache, ctx: AttnContext, latent: torch.Tensor, k_pe: torch.Tensor) -> AttnContext:
        """MLA's append, then the new positions' (mu, rho) (`write_stats`). Every cached call not taking
        `append_in_one_launch` passes here first: the gate table is refreshed if the weights changed since it was
        built. Returns the context with this layer's kv_ln_stats."""
        self.refresh_gate_table()
        ctx = super().append(cache, ctx, latent, k_pe)
        self.check_stats_cache(cache, ctx)
        return self.write_stats(cache, ctx, latent)

    def append_in_one_launch(self, x: torch.Tensor, ctx: AttnContext, cache: LayerCache,
                             projected: torch.Tensor | None = None, q_rope: torch.Tensor | None = None) -> AttnContext:
        """`append(cache, ctx, *latent(x, ctx, projected))` with MLA's part in one launch (placement up: the latents
        are MLA's), q_rope (the query's RoPE slice) rotated by the same launch; the new (mu, rho) in that launch too
        where it computes them (`append_launch_stats`), else by `write_stats` from the latents it returns."""
        self.refresh_gate_table()
        self.check_stats_cache(cache, ctx)
        stats = self.append_launch_stats(x, ctx, cache)
        latent = self.write_latents(x, ctx, cache, keep_latent=stats is None and "ln_stats" in cache.buffers,
                                    projected=projected, stats=stats, q_rope=q_rope)
        return self.write_stats(cache, ctx, latent, in_the_append=stats is not None)

    def append_launch_stats(self, x: torch.Tensor, ctx: AttnContext, cache: LayerCache) -> "AppendedStats | None":
        """In a one-token step where the statistics pass runs, the append's own launch computes the new (mu, rho)
        (egmla/kernels/latent_append.py): two launches fewer per layer than the pass and its merge. Its arguments
        (`AppendedStats`, the gate rows in the cache's dtype, as the decode kernels read them), or None elsewhere."""
        if not ("ln_stats" in cache.buffers and x.shape[1] == 1 and ctx.stats_arrivals is not None
                and self.stats_pass_runs(x)):
            return None
        from egmla.kernels.latent_append import AppendedStats

        like = computes_like(cache.tensor("latent"), x)  # the gate rows in the model's dtype over an fp8 cache
        table, table_rows = self.kernel_gates(like).kernel_rows(ctx.token_ids, like.dtype)
        return AppendedStats(table_rows, table, self.wkv_b.weight, self.n_heads,
                             self.gate_op, self.norm_kind, self.gate_norm.eps, cache.buffers["ln_stats"],
                             ctx.stats_arrivals)

    def reads_fp8_as_stored(self, x: torch.Tensor, latent: torch.Tensor, ctx: AttnContext) -> bool:
        """Placement up: 'kernel' and 'grouped' where their Triton kernels run (each widens a tile as it reads it; the
        statistics come from the latents as rounded, `write_stats`, so every path reads the same numbers). Placement
        latent: MLA's."""
        if self.gate_placement == "latent":
            return super().reads_fp8_as_stored(x, latent, ctx)
        if self.decode_path == "kernel":
            return decode_kernel_can_run(x, latent, ctx, "EG-MLA")
        return (self.decode_path == "grouped" and self.wants_triton("grouped_backend", latent)
                and decode_kernel_can_run(x, latent, ctx, "EG-MLA grouped"))

    def check_stats_cache(self, cache: LayerCache, ctx: AttnContext) -> None:
        """'grouped' and the bias controls' 'absorbed' refuse a cache allocated without statistics or token groups."""
        if self.path.keeps_token_groups and ("ln_stats" not in cache.buffers or ctx.kv_groups is None):
            raise ValueError(_STATS_CACHE_NEEDED.format(path=self.decode_path))  # before a fresh prompt skips reading

    def write_stats(self, cache: LayerCache, ctx: AttnContext, latent: torch.Tensor | None,
                    in_the_append: bool = False) -> AttnContext:
        """The one place the new positions' (mu, rho) enter the cache, where it keeps them ('kernel', 'grouped', the
        bias controls' 'absorbed'; checked by `check_stats_cache`), from their latents: by the statistics pass where it
        runs, else `norm_stats`; in_the_append: the append's launch wrote them already. Returns the context with this
        layer's kv_ln_stats."""
        if "ln_stats" not in cache.buffers:
            return ctx
        if not in_the_append and "latent" in cache.fp8:  # from the latents as the cache holds them, which decode reads
            latent = quantize(latent, FP8).to(latent.dtype)
        if not in_the_append:
            if self.stats_pass_runs(latent):  # written into the cache's rows by the pass: no index_put launch per layer
                self.stats_pass(latent, ctx.token_ids, out=cache.buffers["ln_stats"], positions=ctx.positions)
            else:
                cache.write(ctx.positions, ctx.batch_rows, ln_stats=self.norm_stats(latent, ctx.token_ids))
        return dataclasses.replace(ctx, kv_ln_stats=cache.read("ln_stats", ctx.kv_len))

    # ---- decode paths ----------------------------------------------------------------------
    def attend_gate_table(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        """EG-MLA-A: gate rows gathered from G_l, K/V rebuilt for every cached position, then SDPA; also the prefill
        chunk of 'kernel', 'grouped' and the bias controls' 'absorbed'. Returns [batch, seq, heads, d_v]."""
        if self.gate_table is None:
            self.build_gate_table()
        k_nope, v = self.expand_kv(latent, kv_ids, use_table=True)
        return self.sdpa(q_nope, q_pe, k_nope, k_pe, v, ctx)

    def attend_kernel(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        """Placement up: fused Triton decode, K/V rebuilt on chip from c_t, the gate-table row and the
        position's norm statistics (computed here in one pass if the cache has none); several new tokens, or a
        device the kernel cannot run on: `attend_gate_table`. Placement latent: MLA's absorbed decode kernel over
        the cached f_t. Returns [batch, seq, heads, d_v]."""
        if self.gate_placement == "latent":
            return super().attend_kernel(q_nope, q_pe, latent, k_pe, kv_ids, ctx)
        if not decode_kernel_can_run(q_nope, latent, ctx, "EG-MLA"):
            return self.attend_gate_table(q_nope, q_pe, latent, k_pe, kv_ids, ctx)
        from egmla.kernels.egmla_decode import egmla_decode, layernorm_stats_triton

        like = computes_like(latent, q_nope)  # over an fp8 cache the gate rows in the model's dtype
        gates = self.kernel_gates(like)
        table, _ = gates.kernel_table(like.dtype)
        norm = self.gate_norm
        stats = ctx.kv_ln_stats
        if stats is None:  # a cache without statistics (allocated for another path): one rebuild pass
            _, rows = gates.kernel_rows(kv_ids, like.dtype)  # the ids, or their slots under an offload
            stats = layernorm_stats_triton(latent, rows, table, self.wkv_b.weight, self.n_heads,
                                           self.qk_nope_head_dim, getattr(norm, "eps", 0.0) or 0.0,
                                           gate_op=self.gate_op, norm=self.norm_kind)
        # the cached ids, or under an offload their slots, gathered once per step for all layers
        out = egmla_decode(q_nope[:, 0], q_pe[:, 0], latent, k_pe, gates.kernel_slots(kv_ids), stats,
                           ctx.seen_lengths(), table, self.wkv_b.weight,
                           getattr(norm, "weight", None), getattr(norm, "bias", None), self.softmax_scale,
                           gate_op=self.gate_op)
        return out.unsqueeze(1)

    def attend_absorbed(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        """Placement latent: MLA's absorbed decode over the cached f_t. Placement up has no absorbed decode: the norm
        covers the gated kv_t (the same-table controls have one: `TableBiasMLA`, egmla/attention/table_bias.py)."""
        if self.gate_placement == "latent":
            return super().attend_absorbed(q_nope, q_pe, latent, k_pe, kv_ids, ctx)
        raise ValueError(f"decode_path='absorbed' with gate placement 'up' needs gate_op='bias' or 'bias-v' "
                         f"(the norm must not see the gate); gate_op={self.gate_op!r}: use 'grouped' or 'kernel'")

    def _checked_groups(self, ctx: AttnContext, path: str):
        """The cache's token groups, after checking that every cached position has its norm statistics."""
        groups = ctx.kv_groups
        if ctx.kv_ln_stats is None or groups is None:
            raise ValueError(_STATS_CACHE_NEEDED.format(path=path))
        if groups.host.unregistered:
            raise ValueError(f"this cache holds positions appended while the decode path was not '{path}', so its "
                             f"token groups miss them: refill it (cache.reset(), then the prompt) after "
                             f"model.set_decode_path('{path}'), or use decode_path='naive' / 'gate-table'")
        return groups

    def _registered_mask_and_ids(self, ctx: AttnContext, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, seq, T] mask of the visible registered positions, and each sequence's distinct ids [batch, U]
        (`_distinct_ids`): what the PyTorch equations read."""
        registered = torch.arange(latent.shape[1], device=latent.device)[None, :] < ctx.kv_groups.lengths[:, None]
        return ctx.mask[:, 0] & registered[:, None, :], self._distinct_ids(ctx)

    def _distinct_ids(self, ctx: AttnContext) -> torch.Tensor:
        """Each sequence's distinct ids [batch, U]: checked against the vocabulary (a host sync), or in a capturable
        context up to the host-side bound on the distinct ids (as the grouped kernels' plan; no sync, fixed shapes
        for a CUDA graph)."""
        groups = ctx.kv_groups
        if ctx.capturable:
            bound = max(groups.host.distinct_bound, groups.host.plan_distinct, 1)
            return groups.distinct_ids[:, : min(bound, groups.distinct_ids.shape[1])]
        ids = groups.distinct_ids[:, : max(int(groups.n_distinct.max()), 1)]
        vocab = self.gate_embed.num_embeddings
        if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            raise ValueError(f"token ids in the cache must lie in [0, vocab_size={vocab}); got {int(ids.min())}.."
                             f"{int(ids.max())}: check the tokenizer matches the model")
        return ids

    def attend_grouped(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        """Exact EG-MLA decode grouped by token id (docs/grouped-decode.md). One new token per sequence: the
        Triton kernels on CUDA (`grouped_backend = "kernel"` also sends CPU tensors through Triton's
        interpreter, for tests), else the equations in PyTorch. Several new tokens (prefill): the gate-table
        rebuild, exact too and compute-bound there anyway. Returns [batch, seq, heads, d_v]."""
        groups = self._checked_groups(ctx, "grouped")
        if q_nope.shape[1] > 1:
            return self.attend_gate_table(q_nope, q_pe, latent, k_pe, kv_ids, ctx)
        wanted = self.wants_triton("grouped_backend", latent)
        if not (wanted and decode_kernel_can_run(q_nope, latent, ctx, "EG-MLA grouped")):
            return self.grouped_pytorch(q_nope, q_pe, latent, k_pe, ctx)
        from egmla.kernels.grouped_decode import CHUNK, grouped_decode

        like = computes_like(latent, q_nope)  # over an fp8 cache the gate rows in the model's dtype
        table, id_to_row = self.kernel_gates(like).kernel_table(like.dtype)
        bounds = (ctx.kv_len, max(groups.host.distinct_bound, groups.host.plan_distinct)) if ctx.capturable else None
        # grouped by token id, checked against the vocabulary; the gate rows are read through id_to_row where given
        plan = groups.plan(CHUNK, vocab_size=self.gate_embed.num_embeddings, bounds=bounds)
        norm = self.gate_norm
        out = grouped_decode(q_nope[:, 0], q_pe[:, 0], latent, k_pe, ctx.kv_ln_stats, plan, table,
                             self.wkv_b.weight, norm.weight, getattr(norm, "bias", None), self.softmax_scale,
                             id_to_row=id_to_row)
        return out.unsqueeze(1)

    def grouped_pytorch(self, q_nope, q_pe, latent, k_pe, ctx: AttnContext) -> torch.Tensor:
        """attend_grouped through `grouped_attention` (syncs with the host: not for graph capture)."""
        groups = ctx.kv_groups
        mask, ids = self._registered_mask_and_ids(ctx, latent)
        w_uk, w_uv = self.up_weights()
        norm = self.gate_norm
        out = grouped_attention(q_nope, q_pe, latent, k_pe, ctx.kv_ln_stats, groups.slots[:, :latent.shape[1]],
                                self.gate(ids), mask, w_uk, w_uv, norm.weight, getattr(norm, "bias", None),
                                self.softmax_scale)
        return out.to(q_nope.dtype)

    def wants_triton(self, backend_setting: str, latent: torch.Tensor) -> bool:
        """Whether a one-token step asks for its Triton kernels: the setting (`grouped_backend`, the controls'
        `absorbed_backend`) is "kernel" (on CPU tensors too: Triton's interpreter, for tests) or "auto" on CUDA."""
        backend = getattr(self, backend_setting)
        if backend not in ("auto", "kernel", "pytorch"):
            raise ValueError(f"{backend_setting}={backend!r}: choose auto, kernel or pytorch")
        return backend == "kernel" or (backend == "auto" and latent.is_cuda)

    def kernel_gates(self, latent: torch.Tensor) -> GateRows:
        """The gate table's rows as the decode kernels read them (in latent's dtype, the dtype they compute in: the
        query's over an fp8 cache, egmla.kernels.computes_like; pass it to `kernel_table` / `kernel_rows`): on the
        device the whole table on latent's device and in its dtype (`gate_table_like`), or under
        an offload (egmla.infer.offload) the rows resident on the device and the slot map, which give the very same
        gates."""
        if not self.gates_offloaded:
            self.gate_table_like(latent)
        return self.gate_table

    def gate_table_like(self, latent: torch.Tensor) -> torch.Tensor:
        """The gate table [vocab, n_h (d_n + d_v)] on latent's device and dtype (built once; rebuilt by set_decode_path,
        or by refresh_gate_table when a source weight changed)."""
        rows = self.gate_table
        if rows is None or rows.device != latent.device or rows.dtype != latent.dtype:
            self.gate_table = DeviceRows(self.build_gate_table().to(latent.dtype))
        return self.gate_table.table
