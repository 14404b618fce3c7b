"""KV cache containers and byte accounting.

Each attention class declares what it caches per token and layer (`cache_spec`); `KVCache`
preallocates exactly those tensors for a batch, plus the token ids once per sequence when a variant
needs them (EG-MLA rebuilds its gates from ids). `lengths[b]` is how many positions of sequence b
are filled; appends land at `lengths[b] + i`, so sequences of different lengths share one batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from egmla.config import ModelConfig


@dataclass(frozen=True)
class CacheSpec:
    """What one layer caches per token: name -> (trailing shape, dtype or None for the model dtype)."""

    tensors: dict[str, tuple[tuple[int, ...], torch.dtype | None]]
    needs_token_ids: bool = False
    needs_token_groups: bool = False  # positions grouped by token id (EG-MLA decode path 'grouped')


class LayerCache:
    """One layer's cache tensors, each [batch, max_len, *shape]."""

    def __init__(self, spec: CacheSpec, batch_size: int, max_len: int, dtype, device):
        self.buffers = {
            name: torch.zeros(batch_size, max_len, *shape, dtype=buf_dtype or dtype, device=device)
            for name, (shape, buf_dtype) in spec.tensors.items()
        }

    def write(self, positions: torch.Tensor, **values: torch.Tensor) -> None:
        """Store values [batch, seq, ...] at positions [batch, seq]."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        for name, value in values.items():
            self.buffers[name][rows, positions] = value.to(self.buffers[name].dtype)

    def read(self, name: str, length: int) -> torch.Tensor:
        return self.buffers[name][:, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())


class KVCache:
    """The whole model's cache: per-layer tensors, per-sequence lengths and (if needed) token ids."""

    def __init__(self, specs: list[CacheSpec], batch_size: int, max_len: int,
                 dtype=torch.float32, device=None):
        self.batch_size, self.max_len = batch_size, max_len
        self.layers = [LayerCache(spec, batch_size, max_len, dtype, device) for spec in specs]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        # One int32 per position, shared by all layers: the gates are recomputed from it.
        needs_ids = any(spec.needs_token_ids for spec in specs)
        self.token_ids = (torch.zeros(batch_size, max_len, dtype=torch.int32, device=device)
                          if needs_ids else None)
        self.token_groups = None  # per-sequence distinct ids + slot per position, shared by all layers
        if any(spec.needs_token_groups for spec in specs):
            from egmla.attention.grouped import TokenGroups

            self.token_groups = TokenGroups(batch_size, max_len, device)

    def positions_for(self, seq_len: int) -> tuple[torch.Tensor, int]:
        """Positions [batch, seq_len] where the next `seq_len` tokens of each sequence go, and the
        number of cached positions to attend over afterwards (one host sync per call)."""
        positions = self.lengths[:, None] + torch.arange(seq_len, device=self.lengths.device)
        end = int(positions[:, -1].max()) + 1
        if end > self.max_len:
            raise ValueError(
                f"sequence length {end} exceeds the cache's max_len={self.max_len}: allocate a larger "
                f"cache (new_cache(max_len=...), at most the model's max_seq_len) or shorten the input")
        return positions, end

    def advance(self, n_new: torch.Tensor) -> None:
        self.lengths += n_new.to(self.lengths.device)

    def reset(self) -> None:
        self.lengths.zero_()
        if self.token_groups is not None:
            self.token_groups.reset()

    def nbytes(self) -> int:
        ids = self.token_ids.numel() * self.token_ids.element_size() if self.token_ids is not None else 0
        groups = self.token_groups.nbytes() if self.token_groups is not None else 0
        return sum(layer.nbytes() for layer in self.layers) + ids + groups

    def bytes_per_token(self) -> float:
        """Bytes actually allocated per cached position (per sequence), measured from the tensors."""
        return self.nbytes() / (self.batch_size * self.max_len)
