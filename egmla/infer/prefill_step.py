"""The generation engine's prefill of fresh prompts with fixed shapes and no host sync, so that on CUDA it is captured
once per (rows, width) bucket in a CUDA graph and replayed, as the decode step is (decode_step.py).

Why: an eager prefill forward costs 10-30 ms of host time on an H100 whatever it carries (hundreds of launches
through Python: docs/NOTES.md, 2026-12-05), several times its GPU time for a few short prompts, and a server admitting
requests as rows free up pays it over and over. How: the prompts, right-padded to the bucket, are prefilled into a
scratch cache (one allocation shared by every bucket, `KVCache.reshaped`), whose rows are then copied into the serving
cache's (`KVCache.take_rows`) and, where the decode path reads token groups, registered there on the host
(`TokenGroups.register_prompts`): a graph replays addresses, and the serving rows differ from call to call. Only fresh
prompts qualify (each starting at position 0 of an empty row): a cached prefix's rest or a prompt's later chunk
attends over what its row holds, and goes through the eager forward. As with the decode step, capture is an
optimisation of this one code path: without a graph (CPU) the same call runs eagerly.

Buckets: rows as the decode step's (DEFAULT_BUCKETS), widths powers of two and their midpoints from 16, with rows x
width within PREFILL_GRAPH_TOKENS. Padding rows and positions compute into the scratch and are never copied.
"""
from __future__ import annotations

import torch

from egmla.attention import KVCache
from egmla.infer.decode_step import DEFAULT_BUCKETS, bucket_for

# The largest prefill (rows x width, right-padded) a graph is captured for: beyond it the launches are a small part of
# the forward's time (an H100 took ~30 ms of host time for 16 x 384 tokens eagerly), and the scratch cache stays
# small (paper-base EG-MLA kv64: 50 MB; MHA: 600 MB). 8,192 left most refills of 16-32 rows of 512-token prompts eager
PREFILL_GRAPH_TOKENS = 16384
MIN_WIDTH = 16
WIDTH_BUCKETS = tuple(sorted({m * 2 ** k for k in range(3, 14) for m in (2, 3)
                              if MIN_WIDTH <= m * 2 ** k <= PREFILL_GRAPH_TOKENS}))


def prefill_bucket(rows: int, width: int, max_len: int) -> tuple[int, int] | None:
    """The (rows, width) bucket of a prefill of `rows` prompts of at most `width` tokens into a cache of `max_len`
    positions, or None where none takes it (rows x width beyond PREFILL_GRAPH_TOKENS, or more rows than the engine's
    scratch holds, PREFILL_GRAPH_TOKENS // MIN_WIDTH: a cache shorter than MIN_WIDTH caps the width below it)."""
    bucket_rows = bucket_for(rows, DEFAULT_BUCKETS)
    bucket_width = min(bucket_for(width, WIDTH_BUCKETS), max_len)
    if bucket_width < width or bucket_rows * max(bucket_width, MIN_WIDTH) > PREFILL_GRAPH_TOKENS:
        return None
    return bucket_rows, bucket_width


class PrefillStep:
    """A prefill of up to `rows` fresh prompts of up to `width` tokens each into a `reshaped` view of `scratch`:
    `prefill(cache, start, tokens, n_new, registers_groups)` runs it (from a CUDA graph where use_graph) and moves the
    result into rows [start, start + len(tokens)) of `cache`, returning each prompt's last logits.

    The graph reads the scratch's storage and the static inputs by address: valid as long as the scratch lives
    (the engine drops its steps with it)."""

    def __init__(self, model, scratch: KVCache, rows: int, width: int, use_graph: bool, pool=None):
        """scratch: a cache of the serving cache's layout and dtype with room for rows x width positions (the engine's
        holds PREFILL_GRAPH_TOKENS, a row per MIN_WIDTH of them); pool: the graph memory pool the steps share (they
        run one at a time, and `prefill` returns a copy of the logits, never the graph's output)."""
        self.model, self.rows, self.width, self.use_graph, self.pool = model, rows, width, use_graph, pool
        self.cache = scratch.reshaped(rows, width)
        device = scratch.lengths.device
        self.tokens = torch.zeros(rows, width, dtype=torch.long, device=device)
        self.n_new = torch.zeros(rows, dtype=torch.long, device=device)
        self.ends = torch.zeros(rows, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def forward(self) -> torch.Tensor:
        return self.model(self.tokens, self.cache, n_new=self.n_new, logits_at=self.ends, capturable=True,
                          empty=True)[:, 0]

    def prefill(self, cache: KVCache, start: int, tokens: torch.Tensor, n_new: torch.Tensor,
                registers_groups: bool) -> torch.Tensor:
        """Prefill prompts tokens [n, w] (host tensors, right-padded; row i's first n_new[i] count, n <= rows,
        w <= width) into the empty rows [start, start + n) of `cache`; their logits at each prompt's last token
        [n, vocab], a tensor of the caller's (not the graph's output, which the next replay overwrites).
        registers_groups: the decode path reads the cache's token groups (else they are marked stale)."""
        count, columns = tokens.shape
        if count > self.rows or columns > self.width or int(n_new.min()) < 1:
            raise ValueError(f"prefill of {count} x {columns} tokens (n_new min {int(n_new.min())}) into a step of "
                             f"{self.rows} x {self.width}: need at most that and at least one token per row")
        padded = torch.zeros(3, self.rows, self.width, dtype=torch.long)  # one copy to the device for all three
        padded[0, :count, :columns] = tokens
        padded[1, :count, 0] = n_new
        padded[2, :count, 0] = n_new - 1
        staged = padded.pin_memory().to(self.tokens.device, non_blocking=True) if self.tokens.is_cuda else padded
        self.tokens.copy_(staged[0])
        self.n_new.copy_(staged[1, :, 0])
        self.ends.copy_(staged[2, :, 0])
        if self.use_graph:
            if self.graph is None:
                self.capture()
            self.graph.replay()
            logits = self.logits[:count].clone()  # the graph's output buffer: the next replay overwrites it
        else:
            logits = self.forward()[:count]
        cache.take_rows(self.cache, start, count, columns)
        if cache.token_groups is not None:
            if registers_groups:
                cache.token_groups.register_prompts(start, tokens, n_new)
            else:
                cache.token_groups.host.unregistered = True
        return logits

    def capture(self) -> None:
        """Warm up (Triton compiles, the allocator settles) on a side stream, then capture; both only write the
        scratch, which every prefill overwrites before its rows are copied."""
        side = torch.cuda.Stream(device=self.tokens.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits = self.forward()
        self.graph = graph


# ---- which prefill steps a scheduler runs (egmla/infer/scheduler.py) ----------------------------------------
def padded_runs(work: list[tuple[int, int, int]], budget: int, max_len: int) -> list[list[tuple[int, int]]]:
    """Split (row, tokens to feed, tokens fed) items, sorted by row, into runs of adjacent rows for one right-padded
    forward each: rows x the widest item within `budget` tokens (an item wider than the budget goes alone), and every
    row's fed tokens + the widest item within `max_len`. The forward checks each row's length plus its width against
    the cache's end, whatever the row appends; for the same reason a row in between (decoding, n_new = 0) is never
    spanned."""
    runs: list[list[tuple[int, int, int]]] = []
    for row, take, fed in work:
        if runs:
            run = runs[-1]
            width = max(take, *(t for _, t, _ in run))
            if (row == run[-1][0] + 1 and (row - run[0][0] + 1) * width <= budget
                    and max(fed, *(f for _, _, f in run)) + width <= max_len):
                run.append((row, take, fed))
                continue
        runs.append([(row, take, fed)])
    return [[(row, take) for row, take, _ in run] for run in runs]


def prefill_buckets(max_batch: int, max_len: int, prefill_chunk: int,
                    max_prompt_tokens: int | None = None) -> list[tuple[int, int]]:
    """The (rows, width) buckets of the prefill steps that a scheduler of these settings meets for fresh prompts of
    at most max_prompt_tokens tokens (None: any), largest first (`Scheduler.prefill_buckets`; also what `egmla serve
    --max-batch auto` reserves the captured graphs' logits for before any scheduler exists)."""
    longest = min(max_len, prefill_chunk, max_len if max_prompt_tokens is None else max_prompt_tokens)
    buckets = set()
    for rows in range(1, max_batch + 1):
        for width in _width_per_bucket(min(longest, prefill_chunk // rows)):
            bucket = prefill_bucket(rows, width, max_len)
            if bucket is not None:
                buckets.add(bucket)
    return sorted(buckets, key=lambda bucket: (bucket[0] * bucket[1], bucket[0]), reverse=True)


def _width_per_bucket(widest: int) -> list[int]:
    """One width in each width bucket that widths 1..widest pad to: every bucket below `widest`, and `widest`."""
    return [width for width in WIDTH_BUCKETS if width < widest] + ([widest] if widest >= 1 else [])
