"""Prefix caching's bookkeeping for the scheduler: which prompt tokens each cache row holds from position 0, and
which rows could share a new prompt's start.

A row keeps its prompt's positions after its request ends, until the row is taken again; a new request whose
prompt starts the same way can start from a copy of that row (`Scheduler._reuse_prefix`) and prefill only the rest.
Comparing every prompt with every row costs O(rows) per admitted request, so `PrefixTable` also indexes the rows by
their first `minimum` tokens, the shortest prefix worth reusing: a prompt looks only at the rows of its own key. The
table owns that invariant: every change of a row's prefix (set, moved with its row) goes through it.
"""
from __future__ import annotations

import bisect
from typing import Iterator


class PrefixTable:
    """Per cache row, the prompt tokens it holds from position 0 (a tuple; () for none), indexed by their first
    `minimum` tokens (minimum = 0: no index, nothing is ever reused)."""

    def __init__(self, rows: int, minimum: int):
        self.minimum = minimum
        self._prefixes: list[tuple[int, ...]] = [()] * rows
        self._index: dict[tuple[int, ...], list[int]] = {}  # first `minimum` tokens -> rows, ascending

    def __len__(self) -> int:
        return len(self._prefixes)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(self._prefixes)

    def __getitem__(self, row: int) -> tuple[int, ...]:
        return self._prefixes[row]

    def __setitem__(self, row: int, prefix: tuple[int, ...]) -> None:
        minimum, old = self.minimum, self._prefixes[row]
        if minimum and len(old) >= minimum:
            rows = self._index[old[:minimum]]
            rows.remove(row)
            if not rows:
                del self._index[old[:minimum]]
        if minimum and len(prefix) >= minimum:
            bisect.insort(self._index.setdefault(prefix[:minimum], []), row)
        self._prefixes[row] = prefix

    def move(self, sources: list[int], targets: list[int]) -> None:
        """Row sources[i]'s prefix becomes row targets[i]'s, all at once (rows swapped or permuted with their
        contents: `Scheduler._make_adjacent`, `Scheduler._compact`)."""
        values = [self._prefixes[row] for row in sources]
        for row, prefix in zip(targets, values):
            self[row] = prefix

    def longest(self, prompt: tuple[int, ...], free: list[int]) -> tuple[int, int | None]:
        """(tokens shared, row): the row holding the longest prefix of `prompt` that some row has cached, at least
        `minimum` tokens and one token short of the prompt (its last position's logits are needed; so too a full
        row's last position, which the decode steps overwrite, is never reused), a row in `free` winning a tie; (0,
        None) where there is none."""
        minimum = self.minimum
        if not minimum or len(prompt) <= minimum:
            return 0, None
        best, source = 0, None
        for row in self._index.get(prompt[:minimum], ()):
            shared = common_prefix(prompt, self._prefixes[row], len(prompt) - 1, minimum)
            if shared > best or (shared == best and shared and row in free and source not in free):
                best, source = shared, row
        return (best, source) if best >= minimum else (0, None)


def common_prefix(a: tuple[int, ...], b: tuple[int, ...], limit: int, minimum: int = 1) -> int:
    """How many leading tokens a and b share, at most `limit`; 0 where that is below `minimum` (too short to use): a
    binary search over slice comparisons (C loops), as every admission compares its prompt with the rows of its key;
    most fail the first `minimum` tokens' comparison and cost no search."""
    low, high = 0, min(len(a), len(b), limit)
    if high < max(minimum, 1) or a[:minimum] != b[:minimum] or a[0] != b[0]:
        return 0
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low
