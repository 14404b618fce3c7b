"""What every attention layer needs to know about the current call, built once per model forward."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttnContext:
    token_ids: torch.Tensor  # [batch, seq] ids of the new tokens
    positions: torch.Tensor  # [batch, seq] absolute positions of the new tokens
    cos: torch.Tensor  # [batch, seq, rope_dim // 2]
    sin: torch.Tensor
    # Set only when decoding with a cache:
    kv_len: int = 0  # cached positions to read (max over the batch, after this call's writes)
    kv_token_ids: torch.Tensor | None = None  # [batch, kv_len] ids of all cached positions
    kv_groups: Any = None  # the cache's TokenGroups (decode path 'grouped', egmla/attention/cache.py)
    kv_ln_stats: torch.Tensor | None = None  # [batch, kv_len, 2] this layer's cached norm stats (grouped, kernel)
    # True in a decode step with fixed shapes and no host sync (kv_len = the cache's max_len), which a
    # CUDA graph can capture: layers must not read device values back or size buffers from them.
    capturable: bool = False
    # True when every sequence's new tokens start at position 0 (a prompt into an empty cache): attention over
    # the cache is then causal attention over the new tokens alone, which layers compute from them directly
    # (FlashAttention, as in training) after writing the cache, instead of a masked pass over the cache.
    fresh: bool = False
    # [batch] positions[:, 0] + 1 in a one-token step, built once for all layers (a launch each otherwise)
    decode_lengths: torch.Tensor | None = None
    # [batch, 1] arange: the row index of the cache writes, built once for all layers (a launch each otherwise)
    batch_rows: torch.Tensor | None = None
    # [batch] int32 zeros: the cache's per-sequence counters that let the last head's program of a one-launch append
    # merge the norm statistics (egmla/kernels/latent_append.py); None where the cache keeps no statistics
    stats_arrivals: torch.Tensor | None = None
    # what is built on first read (`mask`): one dict that dataclasses.replace passes on, so every layer's copy of
    # the context shares what the first reader built
    built: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def cached(self) -> bool:
        return self.kv_len > 0

    @property
    def mask(self) -> torch.Tensor | None:
        """[batch, 1, seq, kv_len] bool, True = may attend (`attention_mask`), for a call over a cache; None without
        one. Built on first read: the decode kernels never read it, so their steps launch nothing for it."""
        if not self.cached:
            return None
        if "mask" not in self.built:
            self.built["mask"] = attention_mask(self.positions, self.kv_len)
        return self.built["mask"]

    def seen_lengths(self) -> torch.Tensor:
        """[batch] cached positions each sequence's new token sees (0 .. its own): what the decode kernels take as
        lengths in a one-token step."""
        return self.decode_lengths if self.decode_lengths is not None else self.positions[:, 0] + 1

    def registered_lengths(self) -> torch.Tensor:
        """[batch] positions each new token sees that the cache's token groups hold: min(seen_lengths(),
        kv_groups.lengths), what the bias controls' absorbed decode reads. Built on first read, once per step for
        every layer (a launch per layer otherwise)."""
        if "registered" not in self.built:
            self.built["registered"] = torch.minimum(self.seen_lengths(), self.kv_groups.lengths)
        return self.built["registered"]


def attention_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Causal mask over cached positions: query at position p sees keys 0..p of its own sequence."""
    keys = torch.arange(kv_len, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)


def masked_softmax_attention(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax in fp32 over the last dim of scores [..., seq, kv_len] with mask broadcast to it."""
    scores = scores.float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def decode_kernel_can_run(q: torch.Tensor, cache_tensor: torch.Tensor, ctx: AttnContext, what: str) -> bool:
    """A Triton decode kernel takes one new token per sequence on a device it runs on; otherwise
    (prefill, no CUDA or Triton) the caller uses its PyTorch path, after a one-time warning."""
    from egmla.kernels import kernel_unavailable_reason, warn_fallback_once

    if q.shape[1] != 1 or not ctx.cached:
        return False
    reason = kernel_unavailable_reason(cache_tensor.device)
    if reason:
        warn_fallback_once(f"decode path 'kernel' ({what})", reason)
        return False
    return True
