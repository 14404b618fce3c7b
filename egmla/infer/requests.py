"""What the continuous-batching scheduler hands out (egmla/infer/scheduler.py): a request's handle, which streams its
tokens to another thread and holds its times, and the scheduler's counters and latency histograms."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from egmla.infer.engine import Generation, TokenEvent


@dataclass
class RequestTimes:
    """Wall-clock times (time.perf_counter) of one request's life, for latency metrics."""

    submitted: float
    admitted: float | None = None  # its prompt went into a row
    first_token: float | None = None
    finished: float | None = None


class RequestHandle:
    """What `Scheduler.submit` returns: the request's tokens as they come (`events()`, unless submitted with
    stream=False), its result (`result()`), and `cancel()`. Thread-safe; read `events()` from one thread."""

    def __init__(self, request_id: int, prompt_ids: list[int], stream: bool = True):
        self.id, self.prompt_ids = request_id, prompt_ids
        # False: nobody reads events(), so the scheduler makes none (an event object and a queue put per token and
        # row are about half of its per-row host work in a step); result() is the same either way
        self.stream = stream
        self.times = RequestTimes(time.perf_counter())
        # The scheduler's thread pushes every row's token every step: a C queue and an Event, not a Condition, whose
        # Python-level notify cost ~2.5 µs per push (0.34 ms a step at 128 rows) and woke every result() waiter
        # per token. The queue ends with _END once the request has ended.
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = threading.Event()
        self._result: Generation | None = None
        self._error: BaseException | None = None
        self.cancelled = False
        self._on_cancel: Callable[[], None] | None = None  # the scheduler's note that a row may need freeing

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self._ended.is_set()

    def cancel(self) -> None:
        """Stop generating for this request (a client went away): its row is freed before the next step and its
        result ends with finish_reason 'cancelled'. No effect once it has finished."""
        self.cancelled = True
        if self._on_cancel is not None:  # after the flag: a scheduler that sees the note sees the flag
            self._on_cancel()

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Every TokenEvent of this request in order, blocking until the next one; ends after the last (its
        finish_reason set). Raises the scheduler's error if generation failed, TimeoutError after `timeout` seconds
        without an event."""
        if not self.stream:
            raise ValueError(f"request {self.id} was submitted with stream=False: it makes no token events; read "
                             f"result(), or submit with stream=True")
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no token for {timeout} s") from None
            if event is _END:
                self._events.put(_END)  # a later events() call ends at once too
                if self._error is not None:
                    raise self._error
                return
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Generation:
        """The finished Generation (token ids, text, finish_reason), blocking until it is done."""
        if not self._ended.wait(timeout):
            raise TimeoutError(f"request {self.id}: not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def pending_events(self) -> int:
        """Events pushed and not read by events() yet (the end marker not counted)."""
        return self._events.qsize() - self.done

    # ---- called by the scheduler's thread ----------------------------------------------------
    def _push(self, event: TokenEvent) -> None:
        self._events.put(event)

    def _finish(self, result: Generation | None, error: BaseException | None = None) -> None:
        self.times.finished = time.perf_counter()
        self._result, self._error = result, error
        self._ended.set()  # after the fields: a woken result() reads them
        self._events.put(_END)


_END = object()  # the last item of a handle's event queue


# the scheduler's thread observes while a server's threads read (/metrics, /stats): one lock for every histogram,
# so that a reader never sees a bucket counted ahead of its count (not a field: `asdict` deep-copies fields)
_HISTOGRAMS = threading.Lock()


@dataclass
class Histogram:
    """Observations counted below each bound (cumulative, as Prometheus keeps them), their sum and count. Read them
    from another thread through `snapshot()`."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # counts[i]: observations <= bounds[i]
    total: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = self.counts or [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        with _HISTOGRAMS:
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self.counts[i] += 1
            self.total += value
            self.count += 1

    def snapshot(self) -> "Histogram":
        """A consistent copy (bucket counts, sum and count of the same observations)."""
        with _HISTOGRAMS:
            return Histogram(self.bounds, list(self.counts), self.total, self.count)


SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # latencies
STEP_SECONDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # time per output token


@dataclass
class SchedulerStats:
    """Counters since the scheduler was made (read them from any thread; they only grow), and latency histograms of
    the finished requests (from submission)."""

    requests_finished: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_calls: int = 0
    prefill_graph_calls: int = 0  # of which fixed-shape steps (replayed from CUDA graphs on a GPU)
    # CUDA graphs captured when a step was first met while serving, not at the start (`capture_graphs`,
    # `capture_prefill_graphs`): tens of milliseconds each, during which every running request waits
    late_captures: int = 0
    compactions: int = 0  # live rows moved to the front for a smaller bucket
    rows_moved: int = 0  # rows swapped so that the prompts admitted together are prefilled in one forward
    prefills_shared: int = 0  # prompts not prefilled because an earlier request's identical prompt was: rows copied
    prefix_hits: int = 0  # requests started from a cached prefix of their prompt (prefix caching)
    prefix_tokens_reused: int = 0  # prompt tokens those did not prefill
    busy_seconds: float = 0.0  # time inside step()
    # of which, host time per phase: 'decode' (queue a step, sample, start the tokens' copy), 'read' (wait for a step's
    # tokens, stream them, retire the rows that end), 'admit' (rows for waiting requests, prefix matching), 'prefill'
    # (prompt forwards: eager, so host-bound for short prompts)
    host_seconds: dict = field(default_factory=lambda: dict.fromkeys(("decode", "read", "admit", "prefill"), 0.0))
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(SECONDS))
    time_per_output_token: Histogram = field(default_factory=lambda: Histogram(STEP_SECONDS))  # after the first
    request_latency: Histogram = field(default_factory=lambda: Histogram(SECONDS))  # submitted to finished

    def as_dict(self) -> dict:
        """Every counter and histogram as plain values, the histograms consistent (read from any thread)."""
        with _HISTOGRAMS:
            return asdict(self)
