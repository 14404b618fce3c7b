"""Continuous batching: requests join and leave one running batch between decode steps (`egmla serve`).

`GenerationEngine.generate` runs a batch from its prompts to its last token; a server meets requests one at a
time, and a batch that waits for its longest member wastes the rows of the ones that finished. The scheduler
keeps one cache of `max_batch` rows (rounded up to the engine's batch bucket; the rows past max_batch are never
handed out) and `max_len` positions and loops:

    admit     waiting requests (first come, first served) take free rows, emptied (`KVCache.reset_rows`), or
              starting from a copy of a row that has cached a prefix of the prompt (prefix caching: another
              request's prompt, running or finished while its row was not taken since), cut to that prefix
              (`KVCache.keep_prefix`); while requests run, admission waits until `admit_batch` rows are free (or
              every waiting request fits, or `admit_wait` decode steps have passed), so that rows freed one by one
              are refilled by one prefill forward rather than one each
    prefill   at most `prefill_chunk` prompt tokens in all go into their rows, the oldest requests first; adjacent
              rows share one forward; a long prompt is fed over several iterations (chunked prefill), so the
              running requests keep getting tokens meanwhile; a prompt that fits the budget whole waits for the
              next iteration rather than be cut by the little budget left in this one (`CUT_WASTE`); a row whose
              prompt is complete samples its first
              token; a prompt another request is already feeding (the samples of one prompt) is not fed again:
              its row becomes a copy of the other's; fresh prompts (from position 0 of emptied rows) go through
              the engine's fixed-shape `PrefillStep`, a CUDA graph per (rows, width) bucket on a GPU
    step      one decode step for every live row, through the engine's `DecodeStep` of the smallest bucket that
              holds the highest live row (a CUDA graph per bucket on a GPU, the one the engine replays); free rows
              append nothing (n_new = 0)
    retire    a request that ends (eos, stop string, max_new_tokens, the cache's end) or is cancelled frees its
              row at once; when nothing waits and the live rows fit a smaller bucket, they move to the front
              (`KVCache.compact`) so the step does less work

As the engine does (`overlap_host`), each decode step is queued before the host reads the previous step's tokens,
so that the host's per-request work (streaming, detokenizing, stop strings) overlaps the device's; a request that
ends on an eos or a stop string has then appended one token more into its own row, which nobody reads.

Each request has its own sampling settings (`sample_rows` filters every row under its own in one pass) and, with a seed, its own
random stream: the same seed and prompt give the same text whatever else is running, up to the batch-size
dependence of floating-point products on a GPU. Tokens stream to each request's handle as they are produced.
Every row's tokens are exactly what `GenerationEngine.generate` gives that prompt alone (tests compare them).

One thread runs the model (`start()`, or `step()` by hand); `submit` and the handles are thread-safe. The
scheduler owns its engine while it runs: do not call `engine.generate` at the same time.
"""
from __future__ import annotations

import array
import collections
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from egmla.infer.decode_step import bucket_for
from egmla.infer.engine import GenerationEngine, SequenceState, TokenEvent
from egmla.infer.prefill_step import padded_runs, prefill_buckets
from egmla.infer.prefix_cache import PrefixTable
from egmla.infer.requests import RequestHandle, SchedulerStats
from egmla.infer.sampling import (SamplingParams, checked_logprobs, host_to_device, long_tensor, padded_rows,
                                  sample_rows, to_device_async, to_host_async, token_logprobs)

MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI allows 5, vLLM 20)
# prompt tokens per forward for requests that want their prompt's log-probabilities: those forwards keep every
# position's logits, [tokens, vocab] (1,024 x 32,768 fp32 = 134 MB)
PROMPT_LOGPROBS_CHUNK = 1024
# A prompt that the prefill budget left in an iteration would cut, but that fits a whole budget, waits for the next
# iteration when at most this share of the budget is left: its first token comes in that iteration either way, and a
# cut prompt's rest needs an eager forward of its own (its rows attend over the cache; 10-30 ms of host time on a GPU)
# where whole fresh prompts replay a captured step. Above it, cutting keeps the budget's throughput (a small
# `prefill_chunk` against prompts nearly as long).
CUT_WASTE = 1 / 8


@dataclass(eq=False)  # identity: rows.count(None), rows.index, deque.remove compare in C, not a Python __eq__ per row
class _Request:
    handle: RequestHandle
    sequence: SequenceState
    max_new_tokens: int
    sampling: SamplingParams
    eos_token_id: int | None
    logprobs: int | None = None  # alternatives per token, None: no log-probabilities
    prompt_logprobs: bool = False  # the prompt tokens' too
    generator: torch.Generator | None = None  # its own stream where it has a seed (made at admission)
    fed: int = 0  # prompt tokens in its cache row so far
    # tokens sampled for it on the device so far, read on the host or not (`_sample_next`): while it holds its row,
    # its result's tokens plus those of the queued steps not read yet
    sampled: int = 0
    limit: int = 0  # sampled tokens after which it ends by length: max_new_tokens, or the row's end (`_rows_ahead`)

    def __post_init__(self):
        ids = self.handle.prompt_ids
        self.prompt_len = len(ids)
        # made once, on the submitting thread: the scheduler's thread keys prompts by the tuple (shared prompts, cached
        # prefixes) and copies prefill inputs from the array by slices (`padded_rows`), rather than converting the
        # list at every iteration and prefill
        self.prompt, self.prompt_array = tuple(ids), array.array("q", ids)
        # greedy and no log-probabilities: a step of such rows only takes its argmax (`_sample_next`)
        self.plain = self.sampling.greedy and self.logprobs is None

    @property
    def prefilled(self) -> bool:
        return self.fed == self.prompt_len


@dataclass
class _Pending:
    """A decode step (or a prefill's first tokens) queued on the device: its rows, their requests then, and a function
    that reads the sampled ids on the host (waiting for them)."""

    rows: list[int]
    requests: list[_Request]
    read: Callable[[], list[int]]
    # where some rows asked for log-probabilities: those rows' indices in `rows`, and readers of their chosen token's
    # log-probability [n] and the step's top ones [n, k] (values, ids)
    logprob_rows: list[int] = field(default_factory=list)
    read_logprobs: tuple[Callable[[], list], ...] = ()


class Scheduler:
    """Continuous batching over a `GenerationEngine` (see the module docstring).

    max_batch: rows of the cache, i.e. requests generating at once; more wait in a queue (up to `max_waiting` beyond
        the free rows, after which `submit` refuses with a clear error rather than queueing without bound).
    max_len: positions per row, prompt and generated tokens together (default the model's max_seq_len); a request
        stops by length at the row's end.
    seed: the random stream of sampled requests that bring no seed of their own.
    prefill_chunk: prompt tokens prefilled per iteration, over all requests (default: the engine's
        prefill_token_budget, 32,768). Smaller keeps the running requests' time per token steadier while long prompts
        arrive, at the cost of their time to first token.
    overlap_host: queue each decode step before reading back the tokens of the one before (default: the engine's
        setting, on), so that the host's per-request work (streaming, detokenizing, stop strings: ~3-8 µs per request
        and step on a CPU core) runs while the device computes; the same tokens.
    prefix_cache_min: reuse a cached prompt prefix of at least this many tokens (0: never): a new request whose prompt
        starts like a running or finished request's starts from a copy of that row, cut to the shared prefix, and
        prefills only the rest (the compressed rows make the copy cheap: EG-MLA kv64 3 KB per position at
        paper-base, MHA 36 KB)
    admit_batch: while requests are running, admit waiting ones only once this many rows are free, or every waiting
        request fits in the free rows, or `admit_wait` decode steps have passed since a row was free for the oldest
        (default max(1, max_batch // 8); 1 = refill each freed row at the next iteration). A prefill forward costs
        about as much host time (hundreds of kernel launches) for one prompt as for many, so refilling rows one at a
        time as requests finish makes every iteration pay for one (the policy of TGI's `waiting_served_ratio` /
        `max_waiting_tokens`). With nothing running, or few requests waiting, admission is immediate.
    admit_wait: the most decode steps admission waits for `admit_batch` free rows (default 16)"""

    def __init__(self, engine: GenerationEngine, max_batch: int = 32, max_len: int | None = None,
                 max_waiting: int = 4096, seed: int | None = None, prefill_chunk: int | None = None,
                 overlap_host: bool | None = None, prefix_cache_min: int = 32, admit_batch: int | None = None,
                 admit_wait: int = 16):
        config = engine.config
        max_len = config.max_seq_len if max_len is None else max_len
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        if not 1 <= max_len <= config.max_seq_len:
            raise ValueError(f"max_len={max_len}: must lie in [1, the model's max_seq_len={config.max_seq_len}]")
        if max_waiting < 0:
            raise ValueError(f"max_waiting={max_waiting}: must be >= 0")
        prefill_chunk = engine.prefill_token_budget if prefill_chunk is None else prefill_chunk
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}: must be >= 1 (prompt tokens per iteration)")
        self.engine, self.max_batch, self.max_len, self.max_waiting = engine, max_batch, max_len, max_waiting
        self.prefill_chunk = prefill_chunk
        self.overlap_host = engine.overlap_host if overlap_host is None else overlap_host
        if prefix_cache_min < 0:
            raise ValueError(f"prefix_cache_min={prefix_cache_min}: must be >= 0 (0 = no prefix caching)")
        self.prefix_cache_min = prefix_cache_min
        admit_batch = max(1, max_batch // 8) if admit_batch is None else admit_batch
        if not 1 <= admit_batch <= max_batch:
            raise ValueError(f"admit_batch={admit_batch}: must lie in [1, max_batch={max_batch}] (free rows that "
                             f"admit waiting requests while others run; 1 = at once)")
        if admit_wait < 0:
            raise ValueError(f"admit_wait={admit_wait}: must be >= 0 (decode steps admission may wait for "
                             f"admit_batch free rows)")
        self.admit_batch, self.admit_wait = admit_batch, admit_wait
        self._held_since: int | None = None  # the decode step since which free rows have waited for admit_batch
        self.stats = SchedulerStats()
        self._ids = itertools.count()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._admitting = 0  # taken off the queue by `_admit`, not in a row yet
        self._wake = threading.Condition()
        self._rows: list[_Request | None] = []  # per cache row: its request, None when free
        self._prefixes = PrefixTable(0, prefix_cache_min)  # per cache row: the prompt tokens it holds from position 0
        self._next: torch.Tensor | None = None  # per cache row, on the device: the token its next step feeds
        self._cache = None
        self._step = None
        self._step_appending: list[int] | None = None
        self._appending: torch.Tensor | None = None  # rows [0, top) that append now, where they are not all of them
        self._indexed_rows: list[int] | None = None  # the rows of `_rows_index` (`_decoding_index`)
        self._rows_index: torch.Tensor | None = None
        # decode steps and prefills' first tokens queued on the device, not read on the host yet, in queue order
        self._pending: list[_Pending] = []
        self._copies_of: dict[int, list[_Request]] = {}  # id(request being prefilled) -> requests of the same prompt
        self._shared_generator = torch.Generator(device=engine.device)
        if seed is None:
            self._shared_generator.seed()
        else:
            self._shared_generator.manual_seed(seed)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cancels = False  # a handle was cancelled since the last `_retire_cancelled`
        self._prefill_due = False  # a row may hold a prompt not fully fed (set by admission, cleared by `_prefill`)
        self._generating_in: int | None = None  # the thread that holds engine.generating() (`_generating_held`)

    # ---- requests ------------------------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], max_new_tokens: int = 64, sampling: SamplingParams = SamplingParams(),
               eos_token_id: int | None = None, stop_strings: Sequence[str] = (),
               logprobs: int | None = None, prompt_logprobs: bool = False, stream: bool = True) -> RequestHandle:
        """Queue one request; returns its handle at once. Bad input raises ValueError here, naming the field; a full
        queue OverflowError (more than max_waiting requests would wait beyond the free rows).

        sampling: SamplingParams' seed (0 by default) gives the request a random stream of its own, so that the same
            prompt and seed sample the same text (one draw of its own per step); seed=None shares the scheduler's
            stream (every such request is drawn in one launch, whatever its settings).

        logprobs: None, or return each generated token's log-probability and the `logprobs` most likely tokens of its
            step (0 to MAX_TOP_LOGPROBS) in the events and the result. They are the model's own distribution, before
            temperature, top-k and top-p shape the sampling (vLLM's default).
        prompt_logprobs: also the log-probability of every prompt token after the first, and the `logprobs` most
            likely tokens at each (result.prompt_logprobs / prompt_top_logprobs, None for the first token): what
            OpenAI's `echo` with `logprobs` returns, and what lm-evaluation-harness scores with.
        stream: False for a request whose tokens only `result()` reads: the scheduler then makes no per-token event
            for it (cheaper on the host; `events()` refuses)."""
        return self.submit_all([dict(prompt=prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                                     eos_token_id=eos_token_id, stop_strings=stop_strings, logprobs=logprobs,
                                     prompt_logprobs=prompt_logprobs, stream=stream)])[0]

    def submit_all(self, requests: Sequence[dict]) -> list[RequestHandle]:
        """Queue several requests (each a dict of `submit`'s arguments) all at once or none: every one is checked
        first, and room is checked for all of them together (a server's `n` choices of one call)."""
        if len(requests) > self.max_batch + self.max_waiting:
            raise ValueError(f"{len(requests)} requests at once can never be queued here: at most max_batch + "
                             f"max_waiting = {self.max_batch + self.max_waiting}; send fewer (a smaller n)")
        made = [self._request(**kwargs) for kwargs in requests]
        with self._wake:
            if self._stopping:
                raise RuntimeError("the scheduler is stopping: no new requests")
            free_rows = self.max_batch - self.running - self._admitting
            if len(self._waiting) + len(made) > self.max_waiting + free_rows:
                raise OverflowError(f"{len(self._waiting)} requests already wait and {free_rows} rows are free: "
                                    f"{len(made)} more would exceed max_waiting={self.max_waiting}; retry later, or "
                                    f"serve with a larger max_batch / max_waiting")
            self._waiting.extend(made)
            self._wake.notify_all()
        return [request.handle for request in made]

    def _request(self, prompt: str | Sequence[int], max_new_tokens: int = 64,
                 sampling: SamplingParams = SamplingParams(), eos_token_id: int | None = None,
                 stop_strings: Sequence[str] = (), logprobs: int | None = None,
                 prompt_logprobs: bool = False, stream: bool = True) -> "_Request":
        engine = self.engine
        if max_new_tokens < 1 and not (max_new_tokens == 0 and prompt_logprobs):
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1 (0 only with prompt_logprobs: scoring a "
                             f"prompt without generating)")
        logprobs = checked_logprobs(logprobs, MAX_TOP_LOGPROBS, f"MAX_TOP_LOGPROBS={MAX_TOP_LOGPROBS} alternatives "
                                                                f"per token")
        if prompt_logprobs and logprobs is None:
            raise ValueError("prompt_logprobs=True needs logprobs (the alternatives per token, 0 for none)")
        if stop_strings and engine.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to see text: make the engine with tokenizer=...")
        if eos_token_id is not None and not 0 <= eos_token_id < engine.config.vocab_size:
            raise ValueError(f"eos_token_id={eos_token_id}: outside [0, vocab_size={engine.config.vocab_size})")
        prompt_ids = engine.encode(prompt, max_len=self.max_len)  # the error names the limit that binds
        handle = RequestHandle(next(self._ids), prompt_ids, stream)
        handle._on_cancel = self._note_cancel
        # a request that reads only its result makes no text per token (a host cost per row and step); stop strings
        # need the text as it grows
        sequence = SequenceState(handle.id, prompt_ids, engine.tokenizer, list(stop_strings), text_per_token=stream)
        request = _Request(handle, sequence, max_new_tokens, sampling, eos_token_id, logprobs, prompt_logprobs)
        # a token ends it by length when it is the max_new_tokens-th, or when the row has no room to feed it
        # (`SequenceState.add`: prompt + generated - 1 >= max_len)
        request.limit = min(max_new_tokens, self.max_len + 1 - len(prompt_ids))
        if logprobs is not None:
            request.sequence.result.logprobs, request.sequence.result.top_logprobs = [], []
        return request

    def _note_cancel(self) -> None:
        self._cancels = True

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows) - self._rows.count(None)

    # ---- the loop ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run `step()` in a background thread until `stop()`; it sleeps while there is nothing to do."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="egmla-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the requests already submitted, refuse new ones, and end the background thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():  # else it is still finishing: a start() now must not run a second loop
                self._thread = None

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._waiting or self.running or self._pending or self._stopping)
                if self._stopping and not self._waiting and not self.running:
                    return
            try:
                with self._generating_held():  # while there is work, not once per iteration
                    while self.step() and not self._stopping:  # (stopping: back to the check above)
                        pass
            except Exception as error:  # noqa: BLE001 - every request learns of it, the loop goes on
                self._fail_all(error)

    def step(self) -> bool:
        """One iteration: free cancelled rows, admit waiting requests, prefill (first tokens), one decode step for
        every row whose prompt is in. Returns whether any request is still running or waiting."""
        if self._generating_in == threading.get_ident():  # the loop's thread holds engine.generating() already
            return self._iterate()
        with self.engine.generating():
            return self._iterate()

    @contextlib.contextmanager
    def _generating_held(self):
        """`engine.generating()` (what the model runs under: its device, inference mode, the SDPA backends; ~25 µs of
        host time to enter and leave on a CPU core) held by this thread for several `step()`s, which then do not enter
        it each (the loop's, while there is work)."""
        with self.engine.generating():
            self._generating_in = threading.get_ident()
            try:
                yield
            finally:
                self._generating_in = None

    def _iterate(self) -> bool:
        """`step()` inside `engine.generating()`."""
        start = time.perf_counter()
        if self._cache is None:
            self._open()
        self._retire_cancelled()
        pending, self._pending = self._pending, []  # queued before this iteration, in queue order
        if pending and self._compaction_due():
            self._timed("read", self._process_all, pending)  # rows are about to move: settle the steps first
            pending = []
        decoded = False
        if pending:
            # the next step is queued before the host reads the pending tokens (they are on the device already),
            # so that streaming and stop checks run while the device works (`overlap_host`)
            ahead = self._timed("decode", lambda: self._decode(self._rows_ahead()))
            self._queue(ahead)
            decoded = ahead is not None  # else (every row ends on a pending token) the rows prefilled now run below
            self._timed("read", self._process_all, pending)
        self._timed("admit", self._admit)
        self._timed("prefill", self._prefill)  # queues its rows' first tokens, read with the next step's
        if not decoded:
            if self._compaction_due():
                self._timed("read", self._process_all, self._pending)
                self._pending = []
                if self._compaction_due():  # still: reading the first tokens may have ended every row
                    self._compact([row for row, request in enumerate(self._rows) if request is not None])
            self._queue(self._timed("decode", lambda: self._decode(self._rows_ahead())))
        if not self.overlap_host:
            self._timed("read", self._process_all, self._pending)
            self._pending = []
        self.stats.busy_seconds += time.perf_counter() - start
        return bool(self.running or self._waiting or self._pending)

    def _timed(self, phase: str, work: Callable, *args):
        """work(*args), its host time added to stats.host_seconds[phase] (where the thread's time goes: `/stats`,
        `egmla bench serve`)."""
        start = time.perf_counter()
        try:
            return work(*args)
        finally:
            seconds = self.stats.host_seconds
            seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start

    def capture_graphs(self) -> int:
        """Capture the decode step's CUDA graph of every batch bucket up to max_batch's now (a server's start), instead
        of the first time each is used while requests wait (a capture synchronizes, collects garbage and warms up:
        tens of milliseconds each). Returns how many were captured; none without graphs (CPU, eager)."""
        engine, captured = self.engine, 0
        with engine.generating():
            if self._cache is None:
                self._open()
            for bucket in [b for b in engine.batch_buckets if b <= len(self._rows)]:
                self._offload_room(bucket)
                step = engine.decode_step(self._cache, bucket, self.max_len)
                if step.use_graph and step.graph is None:
                    step.capture()
                    captured += 1
        self._step_appending = None  # a capture leaves the step's n_new as it found it; set it again anyway
        return captured

    def capture_prefill_graphs(self, max_prompt_tokens: int | None = None) -> int:
        """Capture the CUDA graph of every prefill step that fresh prompts of at most `max_prompt_tokens` tokens can
        meet here (`prefill_buckets`; None: of any length) now (a server's start), instead of the first time each
        bucket is met: a capture then (80-140 ms on an H200) sits inside that request's time to first token and holds
        up every running request. After it, such prompts replay graphs only. Returns how many were captured: none on
        a CPU or an eager engine (the steps are made, as a prefill would make them, but run eagerly), none with
        prefill_graphs off (no steps), none of those captured already.

        Memory: the graphs share one pool (the engine's), captured largest first so that the smaller ones reuse its
        blocks (vLLM orders its captures so); each graph keeps its logits [rows, vocab] in it."""
        if max_prompt_tokens is not None and max_prompt_tokens < 0:
            raise ValueError(f"max_prompt_tokens={max_prompt_tokens}: must be >= 0 (0: capture none)")
        captured = 0
        with self.engine.generating():
            if self._cache is None:
                self._open()
            for rows, width in self.prefill_buckets(max_prompt_tokens):
                # a bucket is its own bucket: the step `_prefill_run` gets for any prefill that pads to it
                self._offload_room(1)  # a step not yet captured has never run: its tokens are all id 0
                step = self.engine.prefill_step(rows, width, self.max_len)
                if step is not None and step.use_graph and step.graph is None:
                    step.capture()
                    captured += 1
        return captured

    def prefill_buckets(self, max_prompt_tokens: int | None = None) -> list[tuple[int, int]]:
        """The (rows, width) buckets of the prefill steps that fresh prompts of at most `max_prompt_tokens` tokens
        (None: any) can take here, largest first: those `_prefill_run` gets from `engine.prefill_step` (through
        `prefill_bucket`) for a run of adjacent fresh rows. A run holds 1 to max_batch rows (admission fills every
        free row when nothing runs, or once admit_batch are free: more may have freed by then), padded to its widest
        prompt, rows x width within prefill_chunk (`padded_runs`); a prompt longer than prefill_chunk starts with a
        run of its first prefill_chunk tokens."""
        return prefill_buckets(self.max_batch, self.max_len, self.prefill_chunk, max_prompt_tokens)

    def _open(self) -> None:
        """The cache (and, under decode_path='auto', the path) for max_batch rows of max_len positions."""
        engine = self.engine
        rows = bucket_for(self.max_batch, engine.batch_buckets)
        self._cache = engine.prepare_cache(rows, self.max_len)
        # the rows of the ids the server's cache holds are kept across requests (evicted when short, `_offload_room`)
        engine.reset_offload_rows(rows)
        self._rows = [None] * rows
        self._prefixes = PrefixTable(rows, self.prefix_cache_min)
        # each row's next input token, in the buffer every decode step reads: a step needs no copy of them
        self._next = engine.step_tokens[:rows, 0]

    def _retire_cancelled(self) -> None:
        if not self._cancels:  # set by a handle's cancel(), from any thread: no scan of the rows every step
            return
        self._cancels = False
        for row, request in enumerate(self._rows):
            if request is not None and request.handle.cancelled:
                self._retire(row, "cancelled")
        with self._wake:
            for request in [r for r in self._waiting if r.handle.cancelled]:
                self._waiting.remove(request)
                self._finish(request, "cancelled")

    def _admit(self) -> None:
        """Give waiting requests free rows, first come first served: emptied, or holding the longest cached prefix of
        the prompt (`_reuse_prefix`); while others run, once `admit_batch` rows are free (see __init__)."""
        admitted: list[_Request] = []
        with self._wake:
            if not self._waiting:
                self._held_since = None  # (cancellations may have emptied the queue during a hold)
                return
            free = [row for row, request in enumerate(self._rows[: self.max_batch]) if request is None]
            if not free:
                return
            if self.running and len(free) < min(len(self._waiting), self.admit_batch):
                if self._held_since is None:
                    self._held_since = self.stats.decode_steps
                if self.stats.decode_steps - self._held_since < self.admit_wait:
                    return  # more rows will free up: refill them together
            self._held_since = None
            while self._waiting and len(admitted) < len(free):
                admitted.append(self._waiting.popleft())
            self._admitting = len(admitted)  # neither waiting nor running until placed: `submit_all` counts them
        now = time.perf_counter()
        free.sort(key=lambda r: (len(self._prefixes[r]), r))  # hand-out order: the long cached prefixes kept longest
        emptied = []  # rows taken empty: reset together below (a launch per row is ~10 µs of host time each)
        try:
            for placed, request in enumerate(admitted):
                request.handle.times.admitted = now
                if not request.sampling.greedy and request.sampling.seed is not None:
                    # made here, on the scheduler's thread: device work from another thread could break a graph capture
                    request.generator = request.sampling.make_generator(self.engine.device)
                row = self._reuse_prefix(request, free)
                if row is None:
                    row = free[0]  # keep the longest cached prefixes
                    emptied.append(row)
                    self._prefixes[row] = ()
                free.remove(row)
                self._rows[row] = request
                self._prefill_due = True
            placed = len(admitted)
            if len(emptied) == 1:
                self._cache.reset_rows(emptied[0], emptied[0] + 1)
            elif emptied:
                self._cache.reset_rows_at(_index(emptied, self.engine.device))
        except BaseException:
            with self._wake:  # back in the queue, so that the failure reaches them too (`_fail_all`)
                self._waiting.extendleft(reversed(admitted[placed:]))
                self._admitting = 0
            raise
        with self._wake:
            self._admitting = 0

    def _reuse_prefix(self, request: "_Request", free: list[int]) -> int | None:
        """Prefix caching: the row (one of `free`, in hand-out order) that now holds the longest prefix of the
        request's prompt that any row has cached (`PrefixTable.longest`: a running request's prompt, or a finished
        one's whose row nobody took since, at least `prefix_cache_min` tokens and one short of the prompt); None where
        there is none. That prefix is copied into a free row (unless the row is free itself, then cut there); only the
        rest is prefilled."""
        if request.prompt_logprobs:  # those need every prompt position's logits
            return None
        prompt = request.prompt
        best, source = self._prefixes.longest(prompt, free)
        if source is None:
            return None
        target = source if source in free else free[0]
        if target != source:
            self._cache.copy_prefix(source, target, best)  # the prefix's positions only, not the whole row
        else:
            self._cache.keep_prefix(target, best)
        self._prefixes[target] = prompt[:best]
        request.fed = best
        self.stats.prefix_hits += 1
        self.stats.prefix_tokens_reused += best
        return target

    def _prefill(self) -> None:
        """Feed prompts into their rows, at most `prefill_chunk` tokens in all (at least one token), the oldest
        requests first (one that fits a whole budget is not cut by the last few tokens of this one: `CUT_WASTE`); a
        row whose prompt is complete samples its first token. Adjacent rows go through one
        forward (right-padded, each row appending its own count), as long as rows x the widest chunk stay within
        the budget. Rows that want their prompt's log-probabilities go in forwards of their own, which keep every
        position's logits: at most PROMPT_LOGPROBS_CHUNK tokens each."""
        if not self._prefill_due:
            return
        budget = self.prefill_chunk
        work: dict[bool, list[tuple[int, int, int]]] = {False: [], True: []}  # prompt logprobs -> (row, take, fed)
        # a prompt that an earlier request is already feeding (the samples of one prompt, `n` in the server) is not fed
        # again: its row becomes a copy of the other's when that one completes (`_prefill_run`)
        feeding: dict[tuple[int, ...], _Request] = {}
        self._copies_of = {}
        for row, request in sorted(((row, r) for row, r in enumerate(self._rows) if r is not None and not r.prefilled),
                                   key=lambda item: item[1].handle.id):
            if not request.prompt_logprobs:
                source = feeding.setdefault(request.prompt, request)
                if source is not request and request.fed == 0:
                    self._copies_of.setdefault(id(source), []).append(request)
                    continue
            if budget <= 0:
                break
            rest = request.prompt_len - request.fed
            whole = min(self.prefill_chunk, PROMPT_LOGPROBS_CHUNK) if request.prompt_logprobs else self.prefill_chunk
            if budget < rest <= whole and budget <= self.prefill_chunk * CUT_WASTE:
                break  # whole in the next iteration, first in line (see CUT_WASTE)
            limit = PROMPT_LOGPROBS_CHUNK if request.prompt_logprobs else budget
            take = min(rest, budget, limit)
            work[request.prompt_logprobs].append((row, take, request.fed))
            budget -= take
        # fresh prompts and continued ones (a chunked prompt's rest, a cached prefix's rest) in runs of their own: a
        # run that holds one continued row attends over the rows' cache, not causally over its own tokens, and so
        # would take every fresh prompt beside it off the fresh path (a captured step, or FlashAttention)
        moved = self._make_adjacent([row for row, _, fed in work[False] if fed == 0])
        work = {kind: [(moved.get(row, row), take, fed) for row, take, fed in items] for kind, items in work.items()}
        groups = [(False, [item for item in work[False] if item[2] == 0]),
                  (False, [item for item in work[False] if item[2] > 0]), (True, work[True])]
        for every_position, items in groups:
            limit = min(self.prefill_chunk, PROMPT_LOGPROBS_CHUNK) if every_position else self.prefill_chunk
            for run in padded_runs(sorted(items), limit, self.max_len):
                self._prefill_run(run, every_position)
        self._prefill_due = any(r is not None and not r.prefilled for r in self._rows)  # a rest, a wait

    def _make_adjacent(self, rows: list[int]) -> dict[int, int]:
        """Swap cache rows so that `rows` form one block of adjacent rows, moving as few as possible: rows freed one
        by one lie scattered, and a forward covers adjacent rows only (`padded_runs`), so that without this every
        admitted prompt would take a prefill forward of its own (hundreds of kernel launches each). Each row outside
        the chosen block swaps with a row inside it that is not in `rows` (decoding, free, or holding a cached prefix:
        all move with their contents, as in a compaction). Returns {old row: new row} of the rows that moved; the
        queued steps' rows are renamed to match."""
        count = len(rows)
        if count < 2 or max(rows) - min(rows) + 1 == count:
            return {}
        wanted = set(rows)
        inside = [0, *itertools.accumulate(r in wanted for r in range(len(self._rows)))]  # wanted rows below each row
        start = max(range(len(self._rows) - count + 1), key=lambda b: (inside[b + count] - inside[b], -b))
        holes = [r for r in range(start, start + count) if r not in wanted]
        movers = sorted(r for r in rows if not start <= r < start + count)
        moved = dict(zip(movers, holes)) | dict(zip(holes, movers))
        source, target = list(moved), list(moved.values())
        device = self.engine.device
        self._cache.copy_rows(_index(source, device), _index(target, device))
        self._next[_index(target, device)] = self._next[_index(source, device)]
        values = [self._rows[r] for r in source]
        for r, value in zip(target, values):
            self._rows[r] = value
        self._prefixes.move(source, target)
        for pending in self._pending:
            pending.rows = [moved.get(r, r) for r in pending.rows]
        self.stats.rows_moved += len(source)
        return moved

    def _prefill_run(self, run: list[tuple[int, int]], every_position: bool) -> None:
        first, last = run[0][0], run[-1][0] + 1
        width = max(take for _, take in run)
        chunks: list = [()] * (last - first)
        counts = [0] * (last - first)
        for row, take in run:
            request = self._rows[row]
            chunks[row - first] = request.prompt_array[request.fed:request.fed + take]
            counts[row - first] = take
        tokens, n_new = padded_rows(chunks, width), long_tensor(counts)  # right-padded
        device = self.engine.device
        self.stats.prefill_calls += 1
        # fresh prompts (each from position 0 of an emptied row) through the engine's fixed-shape step (a CUDA graph)
        fresh = not every_position and not any(self._rows[row].fed for row, _ in run)
        if self.engine.offload is not None:  # the run's ids, padding's 0 too (a set of its tokens: only then)
            self._offload_room(len(set(tokens.flatten().tolist()) | {0}))
        step = self.engine.prefill_step(last - first, width, self.max_len) if fresh else None
        if step is not None:
            self.stats.late_captures += step.use_graph and step.graph is None
            logits = step.prefill(self._cache, first, tokens, n_new, self.engine.reads_token_groups())
            self.stats.prefill_graph_calls += 1
        else:
            ends = to_device_async((n_new - 1).clamp(min=0), device)
            logits = self.engine.model(to_device_async(tokens, device), self._cache.rows(first, last),
                                       n_new=to_device_async(n_new, device), logits_at=None if every_position else ends)
            if every_position:
                for row, take in run:
                    self._record_prompt_logprobs(self._rows[row], logits[row - first, :take])
                logits = logits[torch.arange(last - first, device=device), ends]
            else:
                logits = logits[:, 0]
        complete, sources = [], []
        for row, take in run:
            request = self._rows[row]
            request.fed += take
            self._prefixes[row] = request.prompt[:request.fed]
            if request.prefilled and request.max_new_tokens == 0:  # scored, nothing to generate
                self._retire(row, "length")
            elif request.prefilled:
                complete.append(row)
                sources.append(row - first)
                for copy in self._copies_of.pop(id(request), []):  # same prompt: the row copied, not prefilled
                    target = self._rows.index(copy)
                    self._cache.copy_rows(_index([row], device), _index([target], device))
                    self._prefixes[target] = self._prefixes[row]
                    copy.fed = len(copy.handle.prompt_ids)
                    complete.append(target)
                    sources.append(row - first)
                    self.stats.prefills_shared += 1
        if complete:  # read with the next step's tokens (`step`): no host sync here
            self._queue(self._sample_next(complete, logits[_index(sources, logits.device)]))

    def _record_prompt_logprobs(self, request: "_Request", logits: torch.Tensor) -> None:
        """The log-probabilities of the prompt tokens that `logits` [take, vocab] predict (the chunk's next tokens;
        the last position of the prompt's last chunk predicts the first generated token, recorded with it), and the
        most likely tokens there. The prompt's first token has none."""
        result, prompt, fed = request.sequence.result, request.handle.prompt_ids, request.fed
        if fed == 0:
            result.prompt_logprobs, result.prompt_top_logprobs = [None], [None]
        targets = prompt[fed + 1: fed + len(logits) + 1]
        if not targets:
            return
        logprobs = logits[: len(targets)].float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
        top = logprobs.topk(request.logprobs, dim=-1)
        for logprob, values, ids in zip(chosen, top.values.tolist(), top.indices.tolist()):
            result.prompt_logprobs.append(logprob)
            result.prompt_top_logprobs.append(dict(zip(ids, values)))

    def _compaction_due(self) -> bool:
        """Nothing waits and the occupied rows fit a smaller bucket than the highest of them needs."""
        rows, buckets = self._rows, self.engine.batch_buckets
        count = len(rows) - rows.count(None)
        if not count or self._waiting:
            return False
        top = len(rows) - next(i for i, request in enumerate(reversed(rows)) if request is not None)
        return bucket_for(count, buckets) < bucket_for(top, buckets)

    def _rows_ahead(self) -> list[int]:
        """The rows the next step runs before the queued steps' tokens are read: every row whose prompt is in, except
        those that a queued token ends by length (known on the host: the request's sampled tokens, read or not, reach
        its limit). A row that one ends by an eos or a stop string runs once more, into its own row, and that token is
        dropped (`_process` checks the row's request)."""
        return [row for row, request in enumerate(self._rows)
                if request is not None and request.fed == request.prompt_len and request.sampled < request.limit]

    def _decode(self, rows: list[int]) -> "_Pending | None":
        """One decode step appending each of `rows`' next token (the others append nothing); its sampled tokens,
        not yet read on the host."""
        if not rows:
            return None
        top = rows[-1] + 1
        bucket = bucket_for(top, self.engine.batch_buckets)
        self._offload_room(bucket)  # every row's token is fed, a finished row's too
        step = self.engine.decode_step(self._cache, bucket, self.max_len)
        if step is not self._step:
            self._step, self._step_appending = step, None
            self.stats.late_captures += step.use_graph and step.graph is None
        if step.tokens.data_ptr() != self._next.data_ptr():  # a step of its own buffer (not the engine's kept cache)
            step.tokens[:top, 0].copy_(self._next[:top])
        if rows != self._step_appending:  # the rows that append (1) or not (0) change when a row ends or joins
            decoding = set(rows)
            step.set_n_new([int(row in decoding) for row in range(top)] + [0] * (step.batch - top))
            self._step_appending = rows
            # which of rows [0, top) append, on the device, while the same rows do (`_argmax_appending`)
            self._appending = step.n_new[:top] != 0 if len(rows) < top else None
        logits = step.run()
        self.stats.decode_steps += 1
        if len(rows) == top:
            return self._sample_next(rows, logits[:top])
        return self._sample_next(rows, logits[:top], appending=self._appending)

    def _decoding_index(self, rows: list[int]) -> torch.Tensor:
        """`rows` (not all adjacent) as a device tensor, kept while the same rows come again: a decode step's change
        only when a request ends or joins, and each new tensor is a host-to-device copy (two a step: the logits' rows,
        the next tokens' rows)."""
        if rows != self._indexed_rows:
            self._indexed_rows, self._rows_index = list(rows), _index(rows, self.engine.device)
        return self._rows_index

    def _offload_room(self, new_ids: int) -> None:
        """Under offloaded gate tables, room for up to new_ids more ids before a forward; a shortage evicts the ids no
        cache row holds (a row kept for its prefix included) and, where the row cache had to grow, drops the steps
        whose graphs read the old one."""
        offload = self.engine.offload
        if offload is not None and offload.make_room(new_ids, self._cached_ids):
            self.engine.drop_steps()
            self._step = None

    def _cached_ids(self) -> torch.Tensor:
        """The token ids at every cache row's positions (each row up to its length; beyond it id 0)."""
        cache = self._cache
        positions = torch.arange(cache.max_len, device=cache.lengths.device)
        return torch.where(positions < cache.lengths[:, None], cache.token_ids, 0)

    def _compact(self, occupied: list[int]) -> None:
        """Move the occupied rows to the front of the cache, so a smaller bucket's step covers them: a permutation of
        rows [0, highest occupied], the free rows they pass moved behind them with their contents, so that no cached
        prompt prefix is overwritten (a moving row would otherwise land on the one the hand-out spared)."""
        top = occupied[-1] + 1
        taken = set(occupied)
        order = occupied + [row for row in range(top) if row not in taken]
        moved = _index(order, self.engine.device)
        self._cache.rows(0, top).compact(moved)
        self._next[:top] = self._next[moved]
        self._rows[:top] = [self._rows[row] for row in order]
        self._prefixes.move(order, list(range(top)))
        self.stats.compactions += 1

    def _sample_next(self, rows: list[int], logits: torch.Tensor, appending: torch.Tensor | None = None) -> "_Pending":
        """Sample the next token of each of `rows` from its logits [len(rows), vocab] on the device, keep it as the
        row's next input, and start copying it to the host. With `appending` (a bool mask [top] on the device, true
        for exactly `rows`), logits are every row's of [0, top) instead."""
        requests = [self._rows[row] for row in rows]
        plain = True
        for request in requests:
            request.sampled += 1
            plain = plain and request.plain
        if appending is not None:
            if plain:  # every row's argmax, kept where the row appends: no index of `rows` on the device, no gather
                return self._argmax_appending(rows, requests, logits, appending)
            logits = logits[self._decoding_index(rows)]
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        if contiguous and (plain or all(request.sampling.greedy for request in requests)):
            ids = self._next[rows[0]: rows[0] + len(rows)]  # the argmax written where the next step reads it
            torch.argmax(logits, dim=-1, out=ids)
        else:
            ids = self._sample(logits, requests)
            if contiguous:
                self._next[rows[0]: rows[0] + len(rows)] = ids
            else:
                self._next[self._decoding_index(rows)] = ids
        pending = _Pending(rows, requests, to_host_async(ids))
        wanting = [] if plain else [i for i, request in enumerate(requests) if request.logprobs is not None]
        if wanting:
            every = len(wanting) == len(rows)
            index = None if every else _index(wanting, logits.device)
            scored = token_logprobs(logits if every else logits[index], ids if every else ids[index],
                                    max(requests[i].logprobs for i in wanting))
            pending.logprob_rows = wanting
            pending.read_logprobs = tuple(to_host_async(t) for t in scored)
        return pending

    def _argmax_appending(self, rows: list[int], requests: list[_Request], logits: torch.Tensor,
                          appending: torch.Tensor) -> "_Pending":
        """Greedy rows that are not all adjacent (rows end one by one until a compaction): the argmax of each of the
        [0, top) rows' logits, written into the next-token buffer where the row appended (the others keep theirs),
        and read on the host for `rows` only: two launches a step (the mask is made when the rows change), in place
        of a gather of the rows' logits, a scatter of their tokens and, whenever the rows change, a host-to-device
        copy of their index. (The tests also pass with the argmax written into every row: a row that does not append
        has no next input anyone reads yet, as a prefill that completes it writes its first token after this step;
        the `where` keeps that from being load-bearing.)"""
        ids = torch.argmax(logits, dim=-1)
        kept = self._next[:len(ids)]
        torch.where(appending, ids, kept, out=kept)
        read_every = to_host_async(ids)
        return _Pending(rows, requests, lambda: (lambda every: [every[row] for row in rows])(read_every()))

    def _queue(self, pending: "_Pending | None") -> None:
        if pending is not None:
            self._pending.append(pending)

    def _process_all(self, pending: list["_Pending"]) -> None:
        for step in pending:  # in queue order: a row's first token (its prefill's) before its next ones
            self._process(step)

    def _process(self, pending: "_Pending") -> None:
        """Read `pending`'s tokens on the host (the one sync of a step), stream them, retire the rows that end. A
        row whose request has changed since (retired, cancelled) drops its token."""
        now = time.perf_counter()
        scores = dict(zip(pending.logprob_rows, zip(*(read() for read in pending.read_logprobs))))
        rows, max_len = self._rows, self.max_len  # (per row and step: looked up once; `_retire` edits rows in place)
        for i, (row, request, token_id) in enumerate(zip(pending.rows, pending.requests, pending.read())):
            if rows[row] is not request:
                continue
            handle, sequence = request.handle, request.sequence
            if handle.times.first_token is None:
                handle.times.first_token = now
            text = sequence.add(token_id, request.eos_token_id, request.max_new_tokens, max_len)
            result = sequence.result
            logprob = top = None
            if scores and i in scores:
                logprob, values, ids = scores[i]
                top = dict(zip(ids[: request.logprobs], values[: request.logprobs]))
                result.logprobs.append(logprob)
                result.top_logprobs.append(top)
            if handle.stream:
                handle._push(TokenEvent(handle.id, token_id, text, result.finish_reason, logprob, top))
            if result.finish_reason is not None:
                self._retire(row, None)

    def _sample(self, logits: torch.Tensor, requests: list[_Request]) -> torch.Tensor:
        """Next ids [rows], each row under its request's settings and random stream (`sample_rows`: one argmax where
        all are greedy, else one filter for all, one draw for the rows without a seed, one per seeded row)."""
        return sample_rows(logits, [r.sampling for r in requests], [r.generator for r in requests],
                           self._shared_generator)

    def _retire(self, row: int, reason: str | None) -> None:
        request, self._rows[row] = self._rows[row], None
        self._finish(request, reason)

    def _finish(self, request: _Request, reason: str | None) -> None:
        """Hand the request its result. reason 'cancelled' for a cancelled one, None when its last event said why."""
        result = request.sequence.result
        if reason is not None:
            if result.text is None:
                result.text = request.sequence.text_so_far()
            result.finish_reason = reason
            if request.handle.stream:
                request.handle._push(TokenEvent(request.handle.id, -1, "", reason))
        stats, times, now = self.stats, request.handle.times, time.perf_counter()
        stats.requests_finished += 1
        stats.prompt_tokens += len(result.prompt_ids)
        stats.generated_tokens += len(result.token_ids)
        if times.first_token is not None:
            stats.time_to_first_token.observe(times.first_token - times.submitted)
            if len(result.token_ids) > 1:
                stats.time_per_output_token.observe((now - times.first_token) / (len(result.token_ids) - 1))
        stats.request_latency.observe(now - times.submitted)
        request.handle._finish(result)

    def _fail_all(self, error: BaseException) -> None:
        """The model raised: every running and waiting request ends with the error; the cache is dropped, so the
        next request starts clean."""
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in [r for r in self._rows if r is not None] + waiting:
            request.handle._finish(None, RuntimeError(f"generation failed: {error!r}"))
        self._rows = [None] * len(self._rows)
        self._cache, self._step, self._step_appending, self._pending = None, None, None, []
        self._held_since = None
        self.engine.release()


def _index(rows: list[int], device) -> torch.Tensor:
    """`rows` as an int64 tensor on `device`, without waiting for the stream (`host_to_device`)."""
    return host_to_device(rows, torch.long, device)
