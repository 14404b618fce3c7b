"""The generation engine's decode step: one new token for each of a batch bucket's cache rows, with fixed
shapes and no host sync, so that on CUDA it is captured once in a CUDA graph and replayed every step
(as vLLM and SGLang do). Capture is an optimisation of this one code path, never a second
implementation: without a graph (CPU, `cuda_graphs=False`) the very same call runs eagerly.

A bucket is a batch size the step is built for; a batch is padded up to the smallest bucket that holds
it. Padding rows, and rows whose sequence has finished, append nothing (n_new = 0): their positions stay
inside the cache, their logits are ignored, and they never touch another row.
"""
from __future__ import annotations

import bisect

import torch

from egmla.attention import KVCache
from egmla.infer.sampling import long_tensor

# Batch sizes graphs are captured for: dense where padding would cost most (powers of two and their
# midpoints), up to MAX_GRAPH_BATCH; a larger batch runs the same step eagerly, unpadded, where the
# launch overhead a graph removes is small next to the work.
MAX_GRAPH_BATCH = 512
DEFAULT_BUCKETS = tuple(sorted({1, 2, 3} | {m * 2 ** k for k in range(1, 9) for m in (2, 3)
                                            if m * 2 ** k <= MAX_GRAPH_BATCH}))


def bucket_for(batch: int, buckets: tuple[int, ...] | None) -> int:
    """The smallest bucket >= batch, or batch itself when there are none or it is larger than all."""
    if not buckets:
        return batch
    index = bisect.bisect_left(buckets, batch)
    return buckets[index] if index < len(buckets) else batch


class DecodeStep:
    """One decode step over cache rows [0, batch) of `cache`: set `tokens` [batch, 1] and `n_new` [batch]
    (`set_n_new`; 1 = append this row's token, 0 = padding or finished), then `run()` -> last logits [batch, vocab].
    `tokens` may be given: a buffer the step reads by address (a graph replays it), e.g. shared by buckets.

    use_graph: capture the step in a CUDA graph on the first run and replay it afterwards. The graph
    reads the cache's storage directly, so it is valid as long as that storage is (the engine drops its
    steps when it reallocates the cache)."""

    def __init__(self, model, cache: KVCache, batch: int, use_graph: bool, tokens: torch.Tensor | None = None):
        self.model, self.batch = model, batch
        self.cache = cache.rows(0, batch) if batch < cache.batch_size else cache
        device = cache.lengths.device
        if tokens is not None and (tuple(tokens.shape) != (batch, 1) or tokens.dtype != torch.long):
            raise ValueError(f"tokens: a [{batch}, 1] int64 buffer, got {tuple(tokens.shape)} {tokens.dtype}")
        # the input tokens: its own buffer, or a view the engine shares between buckets (rows [0, batch) of one)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device) if tokens is None else tokens
        self.n_new = torch.zeros(batch, dtype=torch.long, device=device)
        self.use_graph = use_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def set_n_new(self, appending: list[int]) -> None:
        """Each row's append count (`n_new`). On CUDA from pinned memory, without waiting: a copy from pageable memory
        waits for the stream to drain, i.e. for the step run ahead, which would undo the host's overlap whenever a
        row is about to end (the caching host allocator keeps the pinned buffer until the copy has run)."""
        values = long_tensor(appending)  # n_new is int64
        if self.n_new.is_cuda:
            self.n_new.copy_(values.pin_memory(), non_blocking=True)
        else:
            self.n_new.copy_(values)

    def forward(self) -> torch.Tensor:
        return self.model(self.tokens, self.cache, n_new=self.n_new, capturable=True)[:, -1]

    def run(self) -> torch.Tensor:
        if not self.use_graph:
            return self.forward()
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.logits

    def capture(self) -> None:
        """Warm up (Triton compiles, kernels pick their tiles) with n_new = 0, which changes no sequence,
        then capture. Capturing records kernels without running them, so the cache is untouched too."""
        n_new = self.n_new.clone()
        self.n_new.zero_()
        side = torch.cuda.Stream(device=self.tokens.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward()
        torch.cuda.current_stream().wait_stream(side)
        self.n_new.copy_(n_new)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.forward()
        self.graph = graph
