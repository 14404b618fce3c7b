"""`EgmlaCache`: a transformers `Cache` that holds egmla's own compressed `KVCache`.

For MLA and EG-MLA it stores per token and layer only the latent c_t and the RoPE key k^R_t
(d_c + d_r elements), plus EG-MLA's token id once per position; never the rebuilt K/V. Its bytes are
those of `egmla.attention.KVCache` (what `egmla kv-report` measures).

transformers sees a cache of `seen` positions: the input columns consumed so far, padding included,
as its own caches count them. Inside, each sequence keeps only its real tokens (left padding from
`generate` is dropped when written), so `kv.lengths[b]` may be smaller than `seen`; positions, RoPE
and the EG-MLA gates follow the real tokens, exactly as egmla's engine runs them.

The storage grows by doubling (up to max_position_embeddings) when a call needs more room.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from egmla.attention import KVCache, allocate_cache
from egmla.config import ModelConfig


class _LayerView(CacheLayerMixin):
    """What transformers' generic code may ask one layer; the tensors live in the parent's KVCache."""

    is_sliding = False
    is_croppable = True

    def __init__(self, parent: "EgmlaCache"):
        super().__init__()
        self.parent, self.is_initialized = parent, True

    def lazy_initialization(self, key_states, value_states) -> None:
        """Nothing to do: the parent allocated the layer's tensors."""

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("EgmlaCache is written by EgmlaForCausalLM's forward, not through update()")

    def get_seq_length(self) -> int:
        return self.parent.seen

    def get_max_length(self) -> int:
        return self.parent.max_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.parent.seen + query_length, 0

    def reset(self) -> None:
        """The parent resets the shared tensors."""


class EgmlaCache(Cache):
    """Cache for `EgmlaForCausalLM`: `kv` is an `egmla.attention.KVCache` [batch, capacity, ...].

    max_length: the most positions a sequence may reach (default: the model's max_seq_len).
    initial_length: positions allocated up front (default 256); the storage doubles as needed."""

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None, decode_path: str | None = None,
                 initial_length: int = 256):
        self.config, self.decode_path = config, decode_path
        self.max_length = max_length or config.max_seq_len
        if self.max_length > config.max_seq_len:
            raise ValueError(f"max_length={self.max_length} exceeds max_position_embeddings={config.max_seq_len}: "
                             f"use at most {config.max_seq_len}")
        self.kv: KVCache = allocate_cache(config, batch_size, min(initial_length, self.max_length), dtype=dtype,
                                          device=device, decode_path=decode_path)
        self.seen = 0
        super().__init__(layers=[_LayerView(self) for _ in range(config.n_layers)])

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.kv.batch_size

    def nbytes(self) -> int:
        """Bytes held: the variant's cache tensors (+ token ids for EG-MLA), nothing else."""
        return self.kv.nbytes()

    def bytes_per_token(self) -> float:
        return self.kv.bytes_per_token()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen + query_length, 0

    # ---- growth --------------------------------------------------------------------------
    def reserve(self, new_columns: int) -> None:
        """Make room for `new_columns` more positions in every sequence (grows the storage by doubling)."""
        needed = self.seen + new_columns  # an upper bound on every row's length, known without a host sync
        if needed > self.kv.max_len and needed > self.max_length:
            needed = int(self.kv.lengths.max()) + new_columns  # left padding dropped: the exact need
        if needed <= self.kv.max_len:
            return
        if needed > self.max_length:
            raise ValueError(f"sequence length {needed} exceeds the cache's max_length={self.max_length} "
                             f"(max_position_embeddings={self.config.max_seq_len}): shorten the input")
        self.kv.grow(min(self.max_length, max(needed, 2 * self.kv.max_len)))

    # ---- what generate() does to caches -----------------------------------------------------
    def reset(self) -> None:
        self.kv.reset()
        self.seen = 0

    def _select_rows(self, rows: torch.Tensor) -> None:
        """Keep cache rows `rows` (any order, repeats allowed) as the new batch."""
        self.kv.select_rows(rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(torch.arange(self.kv.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last tokens (zero or negative: that many; positive: keep that many, transformers' legacy form;
        assisted decoding calls crop(0) after a fully accepted draft).

        Assumes the dropped columns were real tokens in every row, as in assisted decoding."""
        remove = -tokens_to_remove if tokens_to_remove <= 0 else max(self.seen - tokens_to_remove, 0)
        remove = min(remove, self.seen)
        self.kv.truncate((self.kv.lengths - remove).clamp(min=0))
        self.seen -= remove
