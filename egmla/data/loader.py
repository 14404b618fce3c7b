"""Batches from a token shard: fixed-length windows, shuffled per epoch, addressed by position.

The training stream is cut into windows of seq_len + 1 tokens (window i starts at i·seq_len, so
consecutive windows share one token: the last target of one is the first input of the next). Each
epoch visits every window once in an order drawn from (seed, epoch). A global batch is the next
`batch_size` windows of that stream, so the data order depends only on (seed, sequences consumed):
resuming needs one integer, and the same global batch is seen for any number of processes.
"""
from __future__ import annotations

import numpy as np
import torch


class WindowedTokens:
    """Windows of seq_len + 1 tokens over a 1-D token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int, split: str):
        self.tokens, self.seq_len = tokens, seq_len
        self.num_windows = max(0, (len(tokens) - 1) // seq_len)
        if self.num_windows == 0:
            raise ValueError(f"train.seq_len={seq_len}: the {split} split holds only {len(tokens)} tokens, "
                             f"fewer than one sequence; lower train.seq_len or use more data")

    def batch(self, window_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 [len(window_ids), seq_len]."""
        rows = np.stack([self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1] for i in window_ids])
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


class TrainBatches:
    """Global batches of window ids, in a seeded per-epoch shuffle, resumable at any position."""

    def __init__(self, windows: WindowedTokens, batch_size: int, seed: int, position: int = 0):
        if windows.num_windows < batch_size:
            raise ValueError(f"train.batch_size={batch_size}: the training split has only "
                             f"{windows.num_windows} sequences of train.seq_len={windows.seq_len}; "
                             f"lower the batch size or sequence length, or use more data")
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.position = position  # sequences consumed so far (over all processes)
        self._epoch, self._order = -1, None

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.windows.num_windows)
        return self._order

    def next_window_ids(self) -> np.ndarray:
        """Window ids of the next global batch [batch_size]; advances the position."""
        ids = []
        n = self.windows.num_windows
        while len(ids) < self.batch_size:
            epoch, offset = divmod(self.position, n)
            take = min(self.batch_size - len(ids), n - offset)
            ids.extend(self._order_of(epoch)[offset:offset + take])
            self.position += take
        return np.asarray(ids)

    @property
    def epoch(self) -> float:
        return self.position / self.windows.num_windows


def local_micro_batches(window_ids: np.ndarray, rank: int, world_size: int, micro_batch_size: int):
    """This process's share of a global batch, split into micro-batches of window ids.

    Process r takes the r-th contiguous slice, so the union over processes is the global batch."""
    per_rank = len(window_ids) // world_size
    mine = window_ids[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def validation_window_ids(windows: WindowedTokens, max_sequences: int, rank: int, world_size: int) -> np.ndarray:
    """The fixed held-out set: the first max_sequences windows (0 = all), strided over processes."""
    count = windows.num_windows if max_sequences <= 0 else min(max_sequences, windows.num_windows)
    return np.arange(count)[rank::world_size]
