"""Multi-head attention with any number of KV heads: MHA (n_kv = n_h), GQA, MQA (n_kv = 1).

Cache per token and layer: K and V for each KV head, 2·n_kv·head_dim elements.

Decode paths over the cache:
  naive   SDPA over the cached K/V with a mask of each sequence's length
  kernel  one Triton flash-decoding kernel (egmla/kernels/gqa_decode.py) for one new token per sequence,
          the context split across programs; prefill, or a device it cannot run on, takes 'naive'
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from egmla.attention.cache import FP8, CacheSpec, LayerCache
from egmla.attention.context import AttnContext, decode_kernel_can_run
from egmla.attention.paths import DecodePath, path_table
from egmla.attention.precomputed import ReadsWeights, derived, sources_key
from egmla.attention.rope import apply_rope
from egmla.config import ModelConfig
from egmla.kernels import no_grad_kernel_can_run


class GroupedQueryAttention(ReadsWeights):
    DECODE_PATHS = path_table(DecodePath("naive"), DecodePath("kernel", reads_own_positions=True))

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.kv_heads
        self.head_dim = config.mha_head_dim
        self.wq = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)
        self.decode_path = "naive"
        self.paths = self.decode_path_table(config)  # this config's decode paths (egmla.attention.paths)
        self.merge_products = True  # False: q, k, v as three GEMMs (no weight copy; Transformer.set_merged_products)

    @staticmethod
    def decode_path_table(config: ModelConfig) -> dict[str, DecodePath]:
        return GroupedQueryAttention.DECODE_PATHS

    @staticmethod
    def rope_dim(config: ModelConfig) -> int:
        return config.mha_head_dim

    def on_decode_path_set(self, keep_precomputed: bool = False) -> None:
        """Nothing to precompute: both paths read the cached K/V as they are."""

    def refresh_precomputed(self) -> None:
        """Nothing precomputed (the merged [wq ; wk ; wv] copy is rebuilt on use where its sources changed)."""

    @staticmethod
    def cache_spec(config: ModelConfig, decode_path: str = "naive") -> CacheSpec:
        shape = (config.kv_heads, config.mha_head_dim)
        return CacheSpec({"k": (shape, None), "v": (shape, None)})

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: LayerCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        reads_cache = cache is not None and not ctx.fresh  # a decode step (or a prompt's later chunk)
        if reads_cache and self.appends_in_one_launch(x, ctx):
            q = self.append_in_one_launch(x, ctx, cache)
        else:
            q = apply_rope(self.wq(x).view(batch, seq, self.n_heads, self.head_dim), ctx.cos, ctx.sin)
            k = apply_rope(self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim), ctx.cos, ctx.sin)
            v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
            if cache is not None:
                cache.write(ctx.positions, ctx.batch_rows, k=k, v=v)
            if not reads_cache:  # training, full forwards, a fresh prompt: causal over its own K/V
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
                return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))
        k, v = cache.read("k", ctx.kv_len), cache.read("v", ctx.kv_len)
        kernel = self.decode_path == "kernel" and decode_kernel_can_run(q, k, ctx, "MHA/GQA")
        if FP8 in (k.dtype, v.dtype) and not kernel:
            k, v = k.to(q.dtype), v.to(q.dtype)  # an fp8 cache (or fp8-keep-rope's V): the kernel widens it as it reads
        if kernel:
            from egmla.kernels.gqa_decode import gqa_decode

            out = gqa_decode(q[:, 0], k, v, ctx.seen_lengths(), self.head_dim ** -0.5)
            return self.wo(out.reshape(batch, 1, -1))
        out = self._cached_attention(q, k, v, ctx.mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    # ---- a cached call without autograd on a GPU: one GEMM for q, k, v and one launch for RoPE and the cache ----
    def appends_in_one_launch(self, x: torch.Tensor, ctx: AttnContext) -> bool:
        """A cached call without autograd on a GPU (a decode step): the kernel has no backward, and the launches it
        replaces (two rotations, two cache writes) bind a CUDA-graph step at small batch."""
        return no_grad_kernel_can_run(x) and not torch.is_grad_enabled() and ctx.cos.dtype == torch.float32

    def append_in_one_launch(self, x: torch.Tensor, ctx: AttnContext, cache: LayerCache) -> torch.Tensor:
        """The new K/V rotated and written into the cache and q [batch, seq, heads, D] rotated, from [q ; k ; v] as one
        GEMM (`input_weight`, unless merge_products is off) and one launch (egmla/kernels/kv_append.py)."""
        from egmla.kernels.kv_append import kv_append

        widths = [self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2
        if self.merge_products and not self.wrapped_weights:
            q, k, v = F.linear(x, self.input_weight()).split(widths, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))
        kv_append(q, k, v, ctx.cos, ctx.sin, ctx.positions, cache.tensor("k"), cache.tensor("v"))
        return q

    def input_weight(self) -> torch.Tensor:
        """[wq ; wk ; wv] [(n_heads + 2 n_kv_heads) head_dim, d_model], built once (`derived`) and again when a source
        weight changes."""
        return derived(self, "merged_input_weight", sources_key(self, self.wq.weight, self.wk.weight, self.wv.weight),
                       lambda: torch.cat([self.wq.weight, self.wk.weight, self.wv.weight]))

    def _cached_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
        """q [batch, seq, n_heads, dim] over cached k, v [batch, kv_len, n_kv, dim] -> [batch, n_heads, seq, dim].

        With a mask, SDPA's GQA support (enable_gqa) has only the math kernel on the GPU; instead the
        query heads sharing a KV head are stacked as extra query rows of that head (all rows of a group
        read the same K/V), which keeps the fused masked kernels and never copies K/V."""
        batch, seq, _, dim = q.shape
        group = self.n_heads // self.n_kv_heads
        if group == 1:
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=mask)
        # head h = kv * group + g reads KV head kv; its row in the stack is g * seq + s
        rows = q.view(batch, seq, self.n_kv_heads, group, dim).permute(0, 2, 3, 1, 4)
        rows = rows.reshape(batch, self.n_kv_heads, group * seq, dim)
        out = F.scaled_dot_product_attention(rows, k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask.repeat(1, 1, group, 1))
        out = out.view(batch, self.n_kv_heads, group, seq, dim).reshape(batch, self.n_heads, seq, dim)
        return out
