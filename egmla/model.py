"""The decoder LM, top to bottom: token embedding -> N x [RMSNorm -> attention -> RMSNorm -> SwiGLU]
-> RMSNorm -> output head. The attention variant comes from `config.attention` (see egmla.attention).

`forward(tokens)` is the training forward (causal SDPA over the whole sequence). With a `KVCache` the
same call appends `tokens` to each sequence at its own length and attends over everything cached,
which covers prefill (empty cache, padded prompts) and one-token decode with ragged lengths alike.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from egmla.attention import (KVCache, allocate_cache, attention_class, cache_format, check_decode_path,
                             checked_cache_dtype, decode_paths)
from egmla.attention.context import AttnContext
from egmla.attention.precomputed import ReadsWeights, derived, sources_key
from egmla.attention.rope import at_least_fp32, rope_tables
from egmla.config import ModelConfig
from egmla.kernels import no_grad_kernel_can_run


class SwiGLU(ReadsWeights):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.merge_products = True  # False: never the merged GEMM (no copy of w1, w3; Transformer.set_merged_products)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, cached: bool = False,
                residual_in_place: bool = False) -> torch.Tensor:
        """SwiGLU(x), plus `residual` if given. cached: a call with a KV cache (generation), the only one where w1 and
        w3 may run as one GEMM (`merges_gate_up`), so that evaluation builds no copy of their weights.
        residual_in_place: the caller owns `residual` (a fresh tensor no one else reads), which may then become the
        result: the down projection adds into it, where a new output would first be a copy of it."""
        if cached and self.merges_gate_up(x):
            gate, up = F.linear(x, self.gate_up_weight()).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        if no_grad_kernel_can_run(gate):  # decode on a GPU: one launch instead of two (kernels/decode_elementwise.py)
            from egmla.kernels.decode_elementwise import silu_mul

            hidden = silu_mul(gate, up)
            if residual is None or self.wrapped_weights:
                return self.w2(hidden) if residual is None else residual + self.w2(hidden)
            # the residual add in the down projection's epilogue (beta = 1): one launch fewer per layer; into the
            # residual itself where the caller allows it, as an output of its own is first a copy of it (a launch)
            rows, hidden = residual.reshape(-1, residual.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
            if residual_in_place:
                return rows.addmm_(hidden, self.w2.weight.t()).view(residual.shape)
            return torch.addmm(rows, hidden, self.w2.weight.t()).view(residual.shape)
        out = self.w2(F.silu(gate) * up)
        return out if residual is None else residual + out

    def merges_gate_up(self, x: torch.Tensor) -> bool:
        """Where w1 and w3 run as one GEMM over `gate_up_weight`, one launch fewer (on a decode step's few rows a GEMM
        costs its launch and its weight read, not its FLOPs): without autograd on a GPU, as the kernels here; no
        gradient may be wanted at all, as the concatenated weight is a copy."""
        return (self.merge_products and not self.wrapped_weights and no_grad_kernel_can_run(x)
                and not torch.is_grad_enabled())

    def gate_up_weight(self) -> torch.Tensor:
        """[w1 ; w3] [2 hidden, dim], built once (`derived`) and again when either weight changes."""
        return derived(self, "merged_gate_up_weight", sources_key(self, self.w1.weight, self.w3.weight),
                       lambda: torch.cat([self.w1.weight, self.w3.weight]))


def residual_rms_norm(x: torch.Tensor, y: torch.Tensor, norm: nn.RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, norm(x + y)): a residual add and the norm after it; one launch instead of two where no gradient is
    wanted on a GPU (kernels/decode_elementwise.py)."""
    if no_grad_kernel_can_run(x) and (norm.weight is None or norm.weight.dtype == x.dtype) and x.dtype == y.dtype:
        from egmla.kernels.decode_elementwise import add_rms_norm

        return add_rms_norm(x, y, norm.weight, norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps)
    x = x + y
    return x, norm(x)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = attention_class(config)(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = SwiGLU(config.d_model, config.ffn_dim)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache=None) -> torch.Tensor:
        x, h = residual_rms_norm(x, self.attn(self.attn_norm(x), ctx, cache), self.ffn_norm)  # h = ffn_norm(x)
        # x + ffn(h), into x: the residual stream's tensor is residual_rms_norm's new output, read by no one else
        return self.ffn(h, residual=x, cached=cache is not None, residual_in_place=True)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._rebuild_buffers()
        self.decode_path = decode_paths(config)[0]
        self.decode_path_chosen = False  # set_decode_path was called: wrappers (transformers) keep the choice
        self.check_inputs = True  # token-id range check (a host sync on GPU); trainers may turn it off
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the output head with the token embedding (again after to_empty(), which unties)."""
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _rebuild_buffers(self) -> None:
        """RoPE tables are derived, not saved: recompute them (also after loading on the meta device)."""
        device = self.tok_embeddings.weight.device
        cos, sin = rope_tables(attention_class(self.config).rope_dim(self.config), self.config.max_seq_len,
                               self.config.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, param in self.named_parameters():
            if name.endswith("gate_embed.weight"):
                nn.init.normal_(param, std=1.0)  # e_t ~ N(0, 1) so that g_t = W_UE e_t starts O(1)
            elif name.endswith("wue.weight") and self.config.gate_init == "identity":
                nn.init.zeros_(param)  # g = 1 + W_UE e starts at exactly 1: K/V start as MLA's, normed
            elif name.endswith("wue.weight"):
                nn.init.normal_(param, std=param.shape[1] ** -0.5)
            elif name.endswith(("wo.weight", "w2.weight")):  # residual outputs, GPT-2 style
                nn.init.normal_(param, std=std / math.sqrt(2 * self.config.n_layers))
            elif param.dim() >= 2:
                nn.init.normal_(param, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            elif name.endswith("norm.weight"):
                nn.init.ones_(param)
            else:  # a new 1-D parameter (a temperature, a gate scale) must say how it starts: ones would be a guess
                raise ValueError(f"reset_parameters: no initialisation for {name} (shape {tuple(param.shape)}); "
                                 f"add a rule for it here")

    # ---- decoding ------------------------------------------------------------------------
    def set_decode_path(self, path: str, keep_precomputed: bool = False) -> None:
        """Choose how cached attention is computed (all paths give the same logits). The path's precomputed tensors
        (EG-MLA's gate tables, MLA's folded absorption) are rebuilt from the current weights, unless
        keep_precomputed and a layer already holds them (the generation engine switching paths under its kept
        CUDA graphs, with the weights unchanged)."""
        check_decode_path(self.config, path)
        for layer in self.layers:  # every refusal before any layer changes
            if hasattr(layer.attn, "check_path_switch"):
                layer.attn.check_path_switch(path, keep_precomputed)
        self.decode_path, self.decode_path_chosen = path, True
        for layer in self.layers:
            layer.attn.decode_path = path
            layer.attn.on_decode_path_set(keep_precomputed)

    def _apply(self, fn, recurse: bool = True):
        """`.to(...)`, `.cuda()`, `.half()` and the like: what the decode path precomputed from the weights (gate
        tables, folded absorption) is built again where the weights went and in their dtype, and the merged products'
        copies and the bias controls' folded decode weights are dropped (built again on use): the old ones would hold
        memory on the old device, or mix dtypes."""
        super()._apply(fn, recurse)
        for layer in getattr(self, "layers", ()):
            for module in (layer.ffn, layer.attn):  # the copies `derived` holds, and the table controls' folding
                for name in ("merged_gate_up_weight", "merged_input_weight", "_absorbed_weights"):
                    module.__dict__.pop(name, None)
            layer.attn.refresh_precomputed()
        return self

    def set_merged_products(self, enabled: bool) -> None:
        """Whether cached GPU calls without autograd merge their input and MLP products into one GEMM each (the
        default: 3–18% off a paper-base decode step on an H200, docs/bench/ab_h200_merged_products/) at the cost of
        concatenated copies of those weights (~106 MB for MLA kv64 at paper-base in bf16). False drops the copies."""
        for layer in self.layers:
            for module in (layer.ffn, layer.attn):
                if hasattr(module, "merge_products"):
                    module.merge_products = enabled
                    if not enabled:  # the copies `derived` holds
                        module.__dict__.pop("merged_gate_up_weight", None)
                        module.__dict__.pop("merged_input_weight", None)

    def merged_product_weights(self) -> list[torch.Tensor]:
        """The concatenated weights that a cached call without autograd on a GPU reads (every layer's SwiGLU [w1 ; w3]
        and, for the latent variants, [wkv_a ; the query's first projection] of the decode path), built now, or again
        where a source weight changed: a CUDA graph of a decode step reads them by address (egmla.infer.engine)."""
        weights = []
        for layer in self.layers:
            if layer.ffn.merge_products and not layer.ffn.wrapped_weights:
                weights.append(layer.ffn.gate_up_weight())
            if getattr(layer.attn, "merge_products", False) and not layer.attn.wrapped_weights:
                weights.append(layer.attn.input_weight())
        return weights

    def wrapped_weights(self) -> list[str]:
        """The linear and embedding layers replaced by modules that compute something else with the same `.weight`
        (peft's LoRA layers, quantized linears), by name: the fast paths call those instead of reading the weight
        (egmla.attention.precomputed.ReadsWeights), and decode paths that cannot are refused."""
        return [f"layers.{i}.{part}.{name}" for i, layer in enumerate(self.layers) for part in ("attn", "ffn")
                for name in getattr(layer, part).wrapped_weights]

    def usable_decode_path(self, path: str) -> str:
        """`path`, or the variant's first path (which calls every module) where `path` reads weights that are
        wrapped: what generation takes when the caller did not choose a path."""
        reads = self.layers and self.layers[0].attn.paths[path].reads_weights
        return decode_paths(self.config)[0] if reads and self.wrapped_weights() else path

    def _refuse_wrapped_weights(self) -> None:
        wrapped = self.wrapped_weights()
        if wrapped:
            module = self.get_submodule(wrapped[0])
            raise ValueError(
                f"decode_path={self.decode_path!r} reads the weights of {', '.join(wrapped[:3])}"
                f"{' ...' if len(wrapped) > 3 else ''} directly (folded, concatenated or in a gate table), but "
                f"{wrapped[0]} is a {type(module).__module__}.{type(module).__name__}, not a plain torch.nn.Linear / "
                f"nn.Embedding (a peft LoRA adapter, a quantized layer), and what it adds would be ignored. Merge the "
                f"adapters into the weights first (peft: `model = model.merge_and_unload()`), or use "
                f"decode_path={decode_paths(self.config)[0]!r}, which calls the modules")

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None, fp8_tensors=()) -> KVCache:
        """An empty cache on the model's device; dtype: the model's (None), a torch dtype, "fp8" or "fp8-keep-rope"
        (egmla.attention.checked_cache_dtype)."""
        param = self.tok_embeddings.weight
        dtype = cache_format(checked_cache_dtype(dtype), param.dtype)
        return allocate_cache(self.config, batch_size, max_len, dtype=dtype, device=param.device,
                              decode_path=self.decode_path, fp8_tensors=fp8_tensors)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, n_new: torch.Tensor | None = None,
                capturable: bool = False, logits_at: torch.Tensor | None = None, empty: bool = False,
                return_hidden: bool = False, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab] for tokens [batch, seq].

        With a cache, sequence b's tokens go at positions cache.lengths[b] + i and its length then
        grows by n_new[b] (default seq): positions past n_new[b] are padding, overwritten later.
        capturable: attend over the cache's whole max_len with no host sync and fixed shapes, so the call
        can be captured in a CUDA graph (the generation engine's decode step); same logits.
        logits_at [batch]: the logits of position logits_at[b] only, [batch, 1, vocab] (prefill).
        empty: every row of the cache is empty, as the caller guarantees (lengths are not read): the tokens go at
        positions 0 .. seq-1, attention is causal over them alone, and lengths become n_new. With capturable, no host
        sync for any seq: a prompt's prefill replayed from a CUDA graph (egmla/infer/prefill_step.py), which leaves the
        cache's token groups unregistered (their dedup cannot be captured: the caller registers the prompts).
        return_hidden: the final norm's output [batch, seq, d_model] instead of the logits, for a loss that applies
        the output head itself, a chunk of tokens at a time (egmla/train/loss.py).
        embeds [batch, seq, d_model]: the layers' input in place of tok_embeddings(tokens) (transformers'
        inputs_embeds); `tokens` still give the ids that the attention and the cache read (EG-MLA's gate)."""
        batch, seq = tokens.shape
        if embeds is not None and embeds.shape[:2] != tokens.shape:
            raise ValueError(f"embeds {tuple(embeds.shape)} do not match tokens {tuple(tokens.shape)}: one vector "
                             f"per token")
        if self.check_inputs and not capturable and not torch.compiler.is_compiling():
            self._check_tokens(tokens)
        if cache is None:
            if seq > self.config.max_seq_len:
                raise ValueError(f"sequence length {seq} exceeds max_seq_len={self.config.max_seq_len}: "
                                 f"shorten the input or raise model.max_seq_len")
            positions = torch.arange(seq, device=tokens.device).expand(batch, seq)
            cos, sin = at_least_fp32(self.rope_cos[:seq], self.rope_sin[:seq])
            ctx = AttnContext(tokens, positions, cos.expand(batch, -1, -1), sin.expand(batch, -1, -1))
        else:
            ctx = self._cached_context(tokens, cache, n_new, capturable, empty)
        h = self.tok_embeddings(tokens) if embeds is None else embeds
        for i, layer in enumerate(self.layers):
            h = layer(h, ctx, cache.layers[i] if cache is not None else None)
        if logits_at is not None:
            h = h[torch.arange(batch, device=h.device), logits_at][:, None]
        h = self.norm(h)
        logits = h if return_hidden else self.output(h)
        if cache is not None:
            n_new = n_new if n_new is not None else torch.full_like(cache.lengths, seq)
            if empty:
                cache.lengths.copy_(n_new)
            else:
                cache.advance(n_new)
        return logits

    def _cached_context(self, tokens: torch.Tensor, cache: KVCache, n_new: torch.Tensor | None,
                        capturable: bool, empty: bool = False) -> AttnContext:
        """The context every layer reads in a call with a cache: the new tokens' positions and RoPE angles, their ids
        written into the cache's token ids, and registered in its token groups on the paths that read them."""
        if cache.batch_size != tokens.shape[0]:
            raise ValueError(f"tokens batch {tokens.shape[0]} != cache batch_size {cache.batch_size}: "
                             f"allocate the cache with new_cache({tokens.shape[0]})")
        if self.layers and self.layers[0].attn.paths[self.decode_path].reads_weights:
            self._refuse_wrapped_weights()
        decode_lengths = None
        if not empty and self.builds_context_in_one_launch(tokens, capturable):  # the engine's graph step on a GPU
            from egmla.kernels.decode_context import decode_context

            kv_len = cache.max_len
            positions, rows, decode_lengths, cos, sin = decode_context(cache.lengths, tokens, cache.token_ids,
                                                                       self.rope_cos, self.rope_sin, kv_len)
        else:
            if empty:  # nothing cached: positions from 0, read from no tensor (no host sync)
                if tokens.shape[1] > cache.max_len:
                    raise ValueError(f"sequence length {tokens.shape[1]} exceeds the cache's max_len={cache.max_len}: "
                                     f"allocate a larger cache or shorten the input")
                kv_len = tokens.shape[1]
                positions = torch.arange(kv_len, device=tokens.device).expand(tokens.shape[0], kv_len)
            else:
                positions, kv_len = cache.positions_for(tokens.shape[1], static=capturable)
            rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]  # every layer's cache writes use it
            if cache.token_ids is not None:
                cache.token_ids[rows, positions] = tokens.to(cache.token_ids.dtype)
            cos, sin = at_least_fp32(self.rope_cos[positions], self.rope_sin[positions])
            if tokens.shape[1] == 1:
                decode_lengths = positions[:, 0] + 1
        kv_ids = cache.token_ids[:, :kv_len] if cache.token_ids is not None else None
        if cache.token_groups is not None:
            # positions by id, on the paths that read them (the bias control's 'absorbed' too); not kept up otherwise,
            # nor in a captured prefill (the caller registers its prompts): reset() clears the flag, a reader raises
            if self.layers[0].attn.paths[self.decode_path].keeps_token_groups and not (capturable and empty):
                cache.token_groups.append(tokens, positions, n_new)
            else:
                cache.token_groups.host.unregistered = True
        return AttnContext(tokens, positions, cos, sin,
                           kv_len=kv_len, kv_token_ids=kv_ids,
                           kv_groups=cache.token_groups, capturable=capturable,
                           fresh=empty or (not capturable and kv_len == tokens.shape[1]),  # every row started empty
                           decode_lengths=decode_lengths, batch_rows=rows, stats_arrivals=cache.stats_arrivals)

    def builds_context_in_one_launch(self, tokens: torch.Tensor, capturable: bool) -> bool:
        """A capturable one-token step on a GPU (the engine's CUDA-graph step) builds its positions, row index,
        lengths, RoPE angles and token-id write in one launch (egmla/kernels/decode_context.py) instead of ~8."""
        return (capturable and tokens.shape[1] == 1 and self.rope_cos.dtype != torch.float64
                and no_grad_kernel_can_run(tokens))

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens.dtype={tokens.dtype}: token ids must be int32 or int64")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.config.vocab_size}); got "
                             f"min {int(tokens.min())}, max {int(tokens.max())}: check the tokenizer matches the model")

    # ---- sizes ---------------------------------------------------------------------------
    def num_params(self, include_gate_tables: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if not include_gate_tables:
            total -= sum(p.numel() for n, p in self.named_parameters() if n.endswith("gate_embed.weight"))
        return total


def count_params(config: ModelConfig, include_gate_tables: bool = True) -> int:
    """Closed-form parameter count (tests check it against the module)."""
    d, heads = config.d_model, config.n_heads
    per_layer = 2 * d + 3 * d * config.ffn_dim
    if config.is_latent:
        qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        if config.q_lora_rank:
            per_layer += d * config.q_lora_rank + config.q_lora_rank + config.q_lora_rank * heads * qk_dim
        else:
            per_layer += d * heads * qk_dim
        per_layer += d * (config.kv_lora_rank + config.qk_rope_head_dim) + config.kv_lora_rank
        per_layer += config.kv_lora_rank * config.kv_up_dim + heads * config.v_head_dim * d
        if config.is_gated:
            out, normed = config.gate_out_dim, config.gate_norm_dim
            norm_params = {"layernorm": 2 * normed, "rmsnorm": normed, "none": 0}[config.gate_norm]
            per_layer += config.gate_dim * out + norm_params
            if include_gate_tables:
                per_layer += config.vocab_size * config.gate_dim
    else:
        hd = config.mha_head_dim
        per_layer += 2 * d * heads * hd + 2 * d * config.kv_heads * hd
    embeddings = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    return embeddings + config.n_layers * per_layer + d
