"""Multi-head Latent Attention (DeepSeek-V2), docs/design.md §1.

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
  kernel    the absorbed decode as a Triton flash-decoding kernel (egmla/kernels/mla_decode.py; the context split
            where `choose_num_splits` says so, then a combine launch) for one new token per sequence; a later
            prompt chunk of several new tokens takes `absorbed`'s PyTorch einsums.
A prompt into an empty cache (`ctx.fresh`), like training, takes the causal pass on every path (`attend_causal`:
K/V rebuilt, FlashAttention on CUDA). For 'absorbed' and 'kernel', W_UK and W_UV are folded into the query and
output projections when the path is set (`fold_absorption`), where that makes the projections no larger
(d_c <= d_n, d_v); a cached call then takes `forward_folded`, and `attend_absorbed` / `attend_kernel` serve only
the unfolded shapes. A call that reads the cache, without autograd on a GPU, runs wkv_a and the query's first
projection as one GEMM (`input_products`), and norms and rotates the new latents straight into the cache in one
Triton launch (`append_in_one_launch`).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from egmla.attention.cache import FP8, CacheSpec, LayerCache
from egmla.attention.context import AttnContext, decode_kernel_can_run, masked_softmax_attention
from egmla.attention.norms import RMSNorm
from egmla.attention.paths import DecodePath, path_table
from egmla.attention.precomputed import ReadsWeights, derived, sources_key, weights_key
from egmla.attention.rope import apply_rope
from egmla.config import ModelConfig
from egmla.kernels import no_grad_kernel_can_run


class MultiHeadLatentAttention(ReadsWeights):
    DECODE_PATHS = path_table(
        DecodePath("naive", "attend_naive"),
        DecodePath("absorbed", "attend_absorbed", reads_weights=True, folds_absorption=True),
        DecodePath("kernel", "attend_kernel", reads_weights=True, folds_absorption=True, reads_own_positions=True))

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
            self.q_norm = RMSNorm(config.q_lora_rank, eps=config.norm_eps)
            self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(config.d_model, self.n_heads * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(config.d_model, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, eps=config.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, config.kv_up_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, config.d_model, bias=False)
        self.decode_path = "naive"
        self.paths = self.decode_path_table(config)  # this config's decode paths (egmla.attention.paths)
        self.merge_products = True  # False: never `input_products` (no weight copy; Transformer.set_merged_products)
        self.folded: tuple[torch.Tensor, torch.Tensor] | None = None  # see fold_absorption
        self.folded_from: tuple = ()  # fold_sources_key() when it was folded

    # ---- what the registry needs ---------------------------------------------------------
    @staticmethod
    def decode_path_table(config: ModelConfig) -> dict[str, DecodePath]:
        return MultiHeadLatentAttention.DECODE_PATHS

    @staticmethod
    def rope_dim(config: ModelConfig) -> int:
        return config.qk_rope_head_dim

    @staticmethod
    def cache_spec(config: ModelConfig, decode_path: str = "naive") -> CacheSpec:
        return CacheSpec({"latent": ((config.kv_lora_rank,), None),
                          "k_rope": ((config.qk_rope_head_dim,), None)})

    @property
    def path(self) -> DecodePath:
        """The decode path set (`decode_path`), as this config's table describes it."""
        return self.paths[self.decode_path]

    def on_decode_path_set(self, keep_precomputed: bool = False) -> None:
        """Precompute what the chosen path reads: the folded absorption for 'absorbed' and 'kernel'.
        keep_precomputed: keep a folding already made (a CUDA graph captured on the previous path reads it)."""
        if self.path.folds_absorption:
            if not (keep_precomputed and getattr(self, "folded", None) is not None):
                self.fold_absorption()
        else:
            self.folded = None

    # ---- projections ---------------------------------------------------------------------
    def query(self, x: torch.Tensor, ctx: AttnContext, projected: torch.Tensor | None = None,
              rotated: bool = False, folded_query: torch.Tensor | None = None) -> torch.Tensor:
        """q [batch, seq, heads, d_n + d_r], per head [q^C ; RoPE'd q^R]: the projection's own layout, so only the
        q^R slice is rewritten (in place) and attention reads q without a cat. The one place the query is formed:
        the folded decode (`forward_folded`) passes folded_query, the folded weight (`fold_absorption`) that
        replaces the last projection (wq, or wq_b after the low-rank query's norm) and makes per head
        [W_UK^T q^C (d_c) ; RoPE'd q^R] instead, with the same matmuls. projected: the first query projection
        (wq_a's, else the last one's) where the merged input product (`input_products`) made it already; rotated: its
        q^R slice was rotated already (by the append's launch, `query_rope_slice`)."""
        low_rank = hasattr(self, "wq_a")
        last = self.wq_b if low_rank else self.wq  # the projection whose output is q
        if folded_query is not None:
            last = partial(F.linear, weight=folded_query)
        if projected is None:
            projected = self.wq_a(x) if low_rank else last(x)
        q = last(self.q_norm(projected)) if low_rank else projected
        q = q.view(*x.shape[:2], self.n_heads, -1)
        if not rotated:
            q_pe = q[..., -self.qk_rope_head_dim:]  # the last d_r of each head, in either layout
            apply_rope(q_pe, ctx.cos, ctx.sin, out=q_pe)
        return q

    def query_rope_slice(self, projected: torch.Tensor | None) -> torch.Tensor | None:
        """The RoPE slice [batch, seq, heads, d_r] of the query inside `projected` (the merged input product's query
        part), which the one-launch append rotates in place; None where the query is not that product itself (a
        low-rank query still has wq_b to go through) or there is no product."""
        if projected is None or hasattr(self, "wq_a"):
            return None
        return projected.unflatten(-1, (self.n_heads, -1))[..., -self.qk_rope_head_dim:]

    def latent(self, x: torch.Tensor, ctx: AttnContext,
               projected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores: c_t [batch, seq, d_c] (the normed first d_c of wkv_a(x)) and k^R_t [batch, seq, d_r]
        (a view of its last d_r, rotated in place). projected: wkv_a(x) where the merged input product
        (`input_products`) made it already."""
        projected = self.wkv_a(x) if projected is None else projected
        # slices, not split: autograd refuses in-place writes into split's views
        kv, k_pe = projected[..., : self.kv_lora_rank], projected[..., self.kv_lora_rank:]
        apply_rope(k_pe, ctx.cos, ctx.sin, out=k_pe)  # in place, before the norm saves its input for backward
        return self.kv_norm(kv), k_pe

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
        reads_cache = cache is not None and not ctx.fresh  # a decode step (or a prompt's later chunk)
        kv_projected = q_projected = None  # wkv_a(x) and the first query projection, where one GEMM makes both
        if reads_cache and self.merges_input_products(x):
            kv_projected, q_projected = self.input_products(x)
        q_rotated = False  # the query's RoPE slice rotated by the append's launch
        if reads_cache and self.appends_in_one_launch(x, ctx):
            q_rope = self.query_rope_slice(q_projected)
            ctx = self.append_in_one_launch(x, ctx, cache, kv_projected, q_rope)
            q_rotated = q_rope is not None
        else:
            latent, k_pe = self.latent(x, ctx, kv_projected)
            if cache is not None:
                ctx = self.append(cache, ctx, latent, k_pe)
            if not reads_cache:  # training, full forwards, a prompt into an empty cache: over its own latents
                return self.wo(self.attend_causal(self.query(x, ctx), latent, k_pe, ctx.token_ids).flatten(2))
        # the append returned the context the decode paths read (EG-MLA's holds this layer's cached (mu, rho))
        latent, k_pe = cache.read("latent", ctx.kv_len), cache.read("k_rope", ctx.kv_len)
        if FP8 in (latent.dtype, k_pe.dtype) and not self.reads_fp8_as_stored(x, latent, ctx):
            # an fp8 cache (or fp8-keep-rope's fp8 latent beside wide RoPE keys): only the Triton kernels read it as is
            latent, k_pe = latent.to(x.dtype), k_pe.to(x.dtype)
        if self.reads_folded_weights():
            return self.forward_folded(x, latent, k_pe, ctx, q_projected, q_rotated)
        q_nope, q_pe = self.query(x, ctx, q_projected, q_rotated).split([self.qk_nope_head_dim, self.qk_rope_head_dim],
                                                                       dim=-1)
        # attend_naive, attend_absorbed, attend_kernel; EG-MLA adds attend_gate_table and attend_grouped
        attend = getattr(self, self.path.method)
        return self.wo(attend(q_nope, q_pe, latent, k_pe, ctx.kv_token_ids, ctx).flatten(2))

    def reads_fp8_as_stored(self, x: torch.Tensor, latent: torch.Tensor, ctx: AttnContext) -> bool:
        """Whether this call's decode path reads an fp8 cache as stored (its Triton kernel widens each tile as it reads
        it); every other path gets the cache widened to the model's dtype first."""
        return self.decode_path == "kernel" and decode_kernel_can_run(x, latent, ctx, "MLA")

    def attend_causal(self, q: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                      token_ids: torch.Tensor) -> torch.Tensor:
        """Causal attention of q [batch, seq, heads, d_n + d_r] over the same tokens' K/V, rebuilt from their latents
        (FlashAttention on CUDA beats any latent-space pass here). Returns [batch, seq, heads, d_v]."""
        k, v = self.keys_values(latent, k_pe, token_ids, pad_v=q.is_cuda)
        return causal_attention(q, k, v, self.softmax_scale)[..., : self.v_head_dim]

    def keys_values(self, latent: torch.Tensor, k_pe: torch.Tensor, token_ids: torch.Tensor | None,
                    pad_v: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """k [batch, len, heads, d_n + d_r] = [k^C ; k^R] and v [batch, len, heads, d_v], or with pad_v v zero-padded to
        k's width (FlashAttention's one head dim, see causal_attention).

        Views of one buffer that one product writes per head as [k^C ; 0 ; v ; 0]: wkv_b's rows with zero rows
        between them (exact zeros in the output), then k^R is copied into its slot for every head. No cat for K and
        no pad for V; autograd sees a cat, a linear and a copy into a fresh tensor."""
        d_n, d_r, d_v, heads = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, self.n_heads
        v_width = d_n + d_r if pad_v else d_v
        if self.wrapped_weights:  # wkv_b's own forward (a LoRA adapter on it, say): K/V as the naive decode builds them
            k_nope, v = self.expand_kv(latent, token_ids)
            k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, heads, -1)], dim=-1)
            return k, F.pad(v, (0, v_width - d_v))
        w_uk, w_uv = self.up_weights()  # [heads, d_n, d_c], [heads, d_v, d_c]
        zero = w_uk.new_zeros(())
        rows = [w_uk, zero.expand(heads, d_r, self.kv_lora_rank), w_uv,
                zero.expand(heads, v_width - d_v, self.kv_lora_rank)]
        kv = F.linear(latent, torch.cat(rows, dim=1).flatten(0, 1)).unflatten(-1, (heads, -1))
        kv[..., d_n:d_n + d_r] = k_pe.unsqueeze(2)  # one k^R for all heads
        return kv.split([d_n + d_r, v_width], dim=-1)

    def append(self, cache: LayerCache, ctx: AttnContext, latent: torch.Tensor, k_pe: torch.Tensor) -> AttnContext:
        """Write the new positions' cache entries; returns the context the decode paths read."""
        cache.write(ctx.positions, ctx.batch_rows, latent=latent, k_rope=k_pe)
        return ctx

    # `latent` and `append` in one Triton launch (egmla/kernels/latent_append.py) where a cached call reads the cache
    # back; a subclass that changes the latents (EG-MLA's placement latent gates them) says False
    fuses_append = True

    def appends_in_one_launch(self, x: torch.Tensor, ctx: AttnContext) -> bool:
        """A cached call without autograd on a GPU (a decode step): the kernel has no backward, and the four PyTorch
        launches it replaces bind a CUDA-graph step at small batch."""
        return (self.fuses_append and no_grad_kernel_can_run(x) and ctx.cos.dtype == torch.float32
                and (self.kv_norm.weight is None or self.kv_norm.weight.dtype == x.dtype))

    def append_in_one_launch(self, x: torch.Tensor, ctx: AttnContext, cache: LayerCache,
                             projected: torch.Tensor | None = None, q_rope: torch.Tensor | None = None) -> AttnContext:
        """`append(cache, ctx, *latent(x, ctx, projected))` with the latents written by `write_latents` (and q_rope, the
        query's RoPE slice, rotated in place by the same launch)."""
        self.write_latents(x, ctx, cache, projected=projected, q_rope=q_rope)
        return ctx

    def write_latents(self, x: torch.Tensor, ctx: AttnContext, cache: LayerCache, keep_latent: bool = False,
                      projected: torch.Tensor | None = None, stats=None,
                      q_rope: torch.Tensor | None = None) -> torch.Tensor | None:
        """The new latents normed and their RoPE keys rotated straight into the cache, from one read of the
        down-projection (wkv_a(x), or `projected`: its slice of the merged input product); keep_latent: also return
        the latents [batch, seq, d_c]; stats (`AppendedStats`, EG-MLA): their norm statistics too, same launch;
        q_rope: the query's RoPE slice, rotated in place, same launch."""
        from egmla.kernels.latent_append import latent_append

        projected = self.wkv_a(x) if projected is None else projected
        norm = self.kv_norm
        return latent_append(projected, norm.weight, norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps,
                             ctx.cos, ctx.sin, ctx.positions, cache.tensor("latent"), cache.tensor("k_rope"),
                             keep_latent=keep_latent, stats=stats, q_rope=q_rope)

    def attend_naive(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        """Rebuild K/V and run SDPA. Returns [batch, seq, heads, d_v]."""
        k_nope, v = self.expand_kv(latent, kv_ids)
        return self.sdpa(q_nope, q_pe, k_nope, k_pe, v, ctx)

    def sdpa(self, q_nope, q_pe, k_nope, k_pe, v, ctx: AttnContext) -> torch.Tensor:
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        if not ctx.cached or ctx.fresh:  # training, full forwards, fresh prompts: causal over the new tokens
            return causal_attention(q, k, v, self.softmax_scale)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=ctx.mask, scale=self.softmax_scale)
        return out.transpose(1, 2)

    def attend_absorbed(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        """Weight absorption: scores and values computed on the latent, never rebuilding K/V (reached only where the
        absorption is not folded, d_c > d_n or d_v: `reads_folded_weights`). Returns [batch, seq, heads, d_v]."""
        return self.absorbed(q_nope, q_pe, latent, k_pe, ctx, use_kernel=False)

    def attend_kernel(self, q_nope, q_pe, latent, k_pe, kv_ids, ctx: AttnContext) -> torch.Tensor:
        """Absorbed decode through the Triton kernel (one new token per sequence); several new tokens
        (a later prompt chunk) take the absorbed PyTorch path, and so does a device the kernel cannot run on.
        Reached only where the absorption is not folded, as `attend_absorbed`."""
        return self.absorbed(q_nope, q_pe, latent, k_pe, ctx, use_kernel=True)

    def absorbed(self, q_nope, q_pe, latent, k_pe, ctx: AttnContext, use_kernel: bool) -> torch.Tensor:
        w_uk, w_uv = self.up_weights()
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # W_UK^T q^C per head
        out_latent = self.latent_attention(q_latent, q_pe, latent, k_pe, ctx, use_kernel)
        return torch.einsum("bshc,hdc->bshd", out_latent, w_uv)  # W_UV per head

    def latent_attention(self, q_latent, q_pe, latent, k_pe, ctx: AttnContext, use_kernel: bool) -> torch.Tensor:
        """Attention of q_latent [batch, seq, heads, d_c] (+ q^R) over the cached latents, an MQA whose one
        key/value head is c_t (+ k^R_t in the key). Returns [batch, seq, heads, d_c]."""
        if use_kernel and decode_kernel_can_run(q_latent, latent, ctx, "MLA"):
            from egmla.kernels.mla_decode import mla_decode

            out = mla_decode(q_latent[:, 0], q_pe[:, 0], latent, k_pe, ctx.seen_lengths(), self.softmax_scale)  # views
            return out.unsqueeze(1)
        if q_latent.shape[1] > 1 and ctx.mask is not None:  # a prompt's later chunk over its row
            return self.latent_sdpa(q_latent, q_pe, latent, k_pe, ctx.mask)
        return self.latent_reference(q_latent, q_pe, latent, k_pe, ctx)

    def latent_reference(self, q_latent, q_pe, latent, k_pe, ctx: AttnContext) -> torch.Tensor:
        """`latent_attention` in plain PyTorch: the scores [batch, seq, heads, kv_len], softmax in fp32."""
        scores = (torch.einsum("bshc,btc->bsht", q_latent, latent)
                  + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * self.softmax_scale
        mask = ctx.mask.transpose(1, 2) if ctx.mask is not None else _causal(scores)
        probs = masked_softmax_attention(scores, mask).to(latent.dtype)
        return torch.einsum("bsht,btc->bshc", probs, latent)

    def latent_sdpa(self, q_latent, q_pe, latent, k_pe, mask: torch.Tensor) -> torch.Tensor:
        """`latent_reference` for several new tokens per sequence through SDPA: keys [c_t ; k^R_t] and values c_t,
        one head shared by all query heads (expanded, not copied). The reference's fp32 scores of a 32-row chunk of
        1,000 tokens over 1,700 positions take 2.6 GB at paper-base; SDPA's memory-efficient kernel never writes them
        (on a GPU; elsewhere its math backend does what the reference does). mask: [batch, 1, seq, kv_len] bool."""
        heads = q_latent.shape[2]
        q = torch.cat([q_latent, q_pe], dim=-1).transpose(1, 2)  # [batch, heads, seq, d_c + d_r]
        k = torch.cat([latent, k_pe], dim=-1).unsqueeze(1).expand(-1, heads, -1, -1)
        v = latent.unsqueeze(1).expand(-1, heads, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return out.transpose(1, 2)

    # ---- absorption folded into the projections (decode paths 'absorbed' and 'kernel') ----------
    @torch.no_grad()
    def fold_absorption(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """W_UK folded into the query projection and W_UV into the output projection, once, so a decode
        step runs no absorb matmuls: q_latent_h = (W_UK_h^T W_Q_h^C) x and out = sum_h (W_O_h W_UV_h) o_h, with
        o_h [d_c] the attention's output over the latents (x: the query's input, h_t or RMSNorm(W_DQ h_t)).
        Only where it costs no more than it saves (d_c <= d_n and d_c <= d_v, as at paper-base kv64);
        None otherwise. Built by set_decode_path; folded_weights folds again when a source weight changed."""
        heads, d_n, d_r, d_v, d_c = (self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim,
                                     self.kv_lora_rank)
        self.folded, self.folded_from = None, self.fold_sources_key()
        if d_c > d_n or d_c > d_v:
            return None
        w_uk, w_uv = (w.float() for w in self.up_weights())  # [heads, d_n, d_c], [heads, d_v, d_c]
        w_q = (self.wq_b if hasattr(self, "wq_b") else self.wq).weight
        w_q = w_q.float().view(heads, d_n + d_r, -1)
        q_latent = torch.einsum("hnc,hni->hci", w_uk, w_q[:, :d_n])  # [heads, d_c, in]
        w_query = torch.cat([q_latent, w_q[:, d_n:]], dim=1).flatten(0, 1)  # per head [q_latent ; q^R]
        w_out = torch.einsum("ohv,hvc->ohc", self.wo.weight.float().unflatten(1, (heads, d_v)), w_uv).flatten(1)
        self.folded = (w_query.to(w_q.device, self.wo.weight.dtype), w_out.to(self.wo.weight.dtype))
        return self.folded

    def fold_sources_key(self) -> tuple:
        """The folded weights' sources as egmla.attention.precomputed.sources_key identifies them."""
        return sources_key(self, (self.wq_b if hasattr(self, "wq_b") else self.wq).weight, self.wkv_b.weight,
                           self.wo.weight)

    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The folded absorption, folded again if a source weight changed since (in place, or the model moved with
        `.to(...)`): a cached step after an optimizer step uses the new weights, as the unfolded paths do."""
        if self.folded is not None and self.folded_from != self.fold_sources_key():
            self.fold_absorption()
        return self.folded

    def refresh_precomputed(self) -> None:
        """What the decode path precomputed from the weights (the folded absorption), built again where a source
        weight changed or moved (`Transformer._apply` calls this after `.to(...)`)."""
        if getattr(self, "folded", None) is not None:
            self.folded_weights()

    def reads_folded_weights(self) -> bool:
        """Whether a cached call over the cache takes `forward_folded`: 'absorbed' / 'kernel' where they fold."""
        return self.path.folds_absorption and self.folded_weights() is not None

    def forward_folded(self, x: torch.Tensor, latent, k_pe, ctx: AttnContext,
                       projected: torch.Tensor | None = None, rotated: bool = False) -> torch.Tensor:
        """Cached forward of 'absorbed' / 'kernel' with the absorption folded into the projections. projected: the
        first query projection (wq_a's, or without a low-rank query the folded query's) from `input_products`;
        rotated: its RoPE slice was rotated already (by the append's launch)."""
        w_query, w_out = self.folded
        q = self.query(x, ctx, projected, rotated, folded_query=w_query)  # per head [W_UK^T q^C ; q^R]
        q_latent, q_pe = q[..., : self.kv_lora_rank], q[..., self.kv_lora_rank:]
        out_latent = self.latent_attention(q_latent, q_pe, latent, k_pe, ctx, use_kernel=self.decode_path == "kernel")
        return F.linear(out_latent.flatten(2), w_out)

    # ---- the input products merged (a cached call without autograd on a GPU) ------------------------------
    def merges_input_products(self, x: torch.Tensor) -> bool:
        """Where `input_products` replaces the two input GEMMs, one launch fewer (on a decode step's few rows a GEMM
        costs its launch and its weight read, not its FLOPs): a cached call without autograd on a GPU, as for the
        one-launch append; no gradient may be wanted at all, as the concatenated weight is a copy."""
        return (self.merge_products and not self.wrapped_weights and no_grad_kernel_can_run(x)
                and not torch.is_grad_enabled())

    def input_products(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv_a(x) [batch, seq, d_c + d_r] and the query's first projection of x (as `query` reads it, folded or
        not), as views of one GEMM over `input_weight`."""
        projected, kv_width = F.linear(x, self.input_weight()), self.kv_lora_rank + self.qk_rope_head_dim
        return projected[..., :kv_width], projected[..., kv_width:]

    def input_weight(self) -> torch.Tensor:
        """[wkv_a ; the query's first projection] [d_c + d_r + width, d_model]: wq_a with a low-rank query, else the
        folded query where the decode path reads it, else wq. Built once (`derived`), again when a source changes
        or the path's choice of query weight does."""
        if hasattr(self, "wq_a"):
            query_weight, query_key = self.wq_a.weight, ("wq_a", weights_key(self.wq_a.weight))
        elif self.reads_folded_weights():
            query_weight, query_key = self.folded[0], ("folded", self.folded_from)  # current: just checked
        else:
            query_weight, query_key = self.wq.weight, ("wq", weights_key(self.wq.weight))
        return derived(self, "merged_input_weight", (sources_key(self, self.wkv_a.weight), query_key),
                       lambda: torch.cat([self.wkv_a.weight, query_weight]))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     pad_v: bool | None = None) -> torch.Tensor:
    """Causal SDPA of q, k [batch, seq, heads, d_n + d_r] and v [batch, seq, heads, d_v] -> [batch, seq, heads, d_v].

    FlashAttention needs one head dim for q, k and v; MLA's v is narrower (64 against 128 at paper-base). With
    pad_v (default: on CUDA, where FlashAttention runs) v gets zero columns up to q's width and the output
    is cut back: the zero columns only add zero output columns, so the result is the same up to rounding."""
    width = v.shape[-1]
    if (q.is_cuda if pad_v is None else pad_v) and width < q.shape[-1]:
        padded = v.new_empty(*v.shape[:-1], q.shape[-1])
        padded[..., width:].zero_()  # (F.pad would fill the whole buffer, then copy v over it)
        padded[..., :width] = v
        v = padded
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale)
    return out.transpose(1, 2)[..., :width]


def _causal(scores: torch.Tensor) -> torch.Tensor:
    seq, kv_len = scores.shape[1], scores.shape[-1]
    return torch.ones(seq, kv_len, dtype=torch.bool, device=scores.device).tril()[None, :, None]
