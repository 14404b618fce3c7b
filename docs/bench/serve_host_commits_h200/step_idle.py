"""Where the device waits on the host in a scheduler run, without a profiler: CUDA events around each decode step and
each prefill call, read after the run.

    PYTHONPATH=$PWD python docs/bench/serve_host_commits_h200/step_idle.py bench serve --preset paper-base \\
        --variants mla-kv64 --systems continuous --requests 128 --rate inf --prompt-len 1024 --output-len 256 \\
        --max-batch 128 --set max_seq_len=4096

A profiler trace (trace_gaps.py) slows the host's graph launches ~20× under CUPTI, so its gaps overstate the host's
share. Here each `Scheduler._decode`, `_prefill_run`, `_make_adjacent` and `_compact` of the last scheduler the command
makes (the bench's measured run; the warm-up makes its own) records a timing event on the stream before and after its
work. An event is stamped when the device reaches it, so the time from one item's end event to the next item's start
event is time the device had nothing queued: it waited on the host. The host cost of the events themselves (not
measured here; a few µs a pair) is in the
measurement. Gaps are grouped by what came next (a prefill call, or a decode step of how many rows), with the host's
time between the two items split by the scheduler's phases (`SchedulerStats.host_seconds`: read = wait for a step's
tokens and process them, admit; the rest is the prefill's planning and anything else). An item starts when the host
enters it, so the host's own work at an item's start (a prefill's input building) counts as the item's, not as a
wait: the waits before prefill calls are a lower bound. Without CUDA the events are host clocks, so the script runs
anywhere, but only a GPU's reading means anything.
"""
import collections
import dataclasses
import gc
import statistics
import sys
import time

import torch

from egmla.cli import main
from egmla.infer import scheduler as scheduler_module


class HostEvent:
    """A CPU stand-in for a timing event (the work is done when the call returns)."""

    def record(self) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, later: "HostEvent") -> float:
        return (later.at - self.at) * 1e3


def new_event():
    if torch.cuda.is_available():
        return torch.cuda.Event(enable_timing=True)
    return HostEvent()


@dataclasses.dataclass
class Item:
    """One piece of device work the scheduler queued: its events on the stream, the host clock around the call, and
    the scheduler's per-phase host seconds when it began."""

    kind: str  # decode, prefill, move
    rows: int
    start: object
    end: object
    began: float
    ended: float
    phases: dict


items_of: dict[int, list[Item]] = {}  # id(scheduler) -> its items, in order
order: list[int] = []


def timed(method, kind: str, rows_of, did_work=lambda out: True):
    def wrapper(self, *args):
        if id(self) not in items_of:
            items_of[id(self)] = []
            order.append(id(self))
        rows = rows_of(args)
        if not rows:  # nothing to run (a decode step of no rows)
            return method(self, *args)
        start, end = new_event(), new_event()
        phases, began = dict(self.stats.host_seconds), time.perf_counter()
        start.record()
        out = method(self, *args)
        end.record()
        if did_work(out):  # (else the call launched nothing: its events would split a wait in two)
            items_of[id(self)].append(Item(kind, rows, start, end, began, time.perf_counter(), phases))
        return out
    return wrapper


collections_seconds: dict[int, list[float]] = collections.defaultdict(list)  # Python's gc: generation -> seconds
collection_spans: list[tuple[float, float]] = []  # host clock spans of the collections of generations 1 and 2


def gc_clock(phase: str, info: dict, started: list = [0.0]) -> None:
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        collections_seconds[info["generation"]].append(time.perf_counter() - started[0])
        if info["generation"]:
            collection_spans.append((started[0], time.perf_counter()))


def group(item: Item) -> str:
    if item.kind == "prefill":
        return "before a prefill call"
    if item.kind == "move":
        return "before rows move (make adjacent, compact)"
    for low in (96, 64, 32, 16, 8):
        if item.rows >= low:
            return f"before a decode step of >= {low} rows"
    return "before a decode step of < 8 rows"


def between(a: Item, b: Item) -> dict:
    """The host's µs from a's return to b's start: in all, in the read and admit phases, and the rest."""
    phase = {p: (b.phases.get(p, 0.0) - a.phases.get(p, 0.0)) * 1e6 for p in ("read", "admit")}
    total = (b.began - a.ended) * 1e6
    return {"host": total, **phase, "rest": total - sum(phase.values())}


def report(items: list[Item]) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    gaps, busy, host = collections.defaultdict(list), collections.defaultdict(list), collections.defaultdict(list)
    for a, b in zip(items, items[1:]):
        gaps[group(b)].append(max(0.0, a.end.elapsed_time(b.start)) * 1e3)
        host[group(b)].append(between(a, b))
    for item in items:
        busy[group(item)].append(item.start.elapsed_time(item.end) * 1e3)
    span = items[0].start.elapsed_time(items[-1].end)
    idle = sum(sum(v) for v in gaps.values()) / 1e3
    print(f"{len(items)} device items over {span:.1f} ms: idle between them {idle:.1f} ms ({idle / span:.0%})")
    print(f"{'what came next':<42} {'items':>6} {'idle ms':>8} {'idle µs p50':>12} {'p90':>6} {'its µs p50':>11}"
          f"  host µs between, p50: all / read / admit / rest")
    for name in sorted(busy, key=lambda n: -sum(gaps.get(n, [0]))):
        waits = sorted(gaps.get(name, [0.0]))
        spent = " / ".join(f"{statistics.median(h[k] for h in host[name]):.0f}"
                           for k in ("host", "read", "admit", "rest")) if host.get(name) else "-"
        print(f"{name:<42} {len(busy[name]):6d} {sum(waits) / 1e3:8.1f} {statistics.median(waits):12.0f} "
              f"{waits[int(0.9 * (len(waits) - 1))]:6.0f} {statistics.median(busy[name]):11.0f}  {spent}")
    largest = sorted(((max(0.0, a.end.elapsed_time(b.start)), a, b) for a, b in zip(items, items[1:])),
                     key=lambda g: -g[0])[:6]
    print("largest waits: ms, at ms, after -> before (kind, rows), host µs between (read / admit / rest), gc of "
          "generations 1-2 on the host between them (ms)")
    for wait, a, b in largest:
        collected = sum(max(0.0, min(b.began, stop) - max(a.ended, begin)) for begin, stop in collection_spans)
        spent = between(a, b)
        print(f"  {wait:7.2f} {items[0].start.elapsed_time(b.start):8.1f}  {a.kind} {a.rows} -> {b.kind} {b.rows}  "
              f"{spent['read']:.0f} / {spent['admit']:.0f} / {spent['rest']:.0f}  gc {collected * 1e3:.1f}")
    print("Python gc over the whole command: " + ", ".join(
        f"generation {g}: {len(v)} collections, {sum(v) * 1e3:.1f} ms, longest {max(v) * 1e3:.1f} ms"
        for g, v in sorted(collections_seconds.items())))


def run(argv: list[str]) -> int:
    cls = scheduler_module.Scheduler
    cls._decode = timed(cls._decode, "decode", lambda args: len(args[0]))
    cls._prefill_run = timed(cls._prefill_run, "prefill", lambda args: len(args[0]))
    # rows moved between them (device copies: counted as work, not as waiting)
    cls._make_adjacent = timed(cls._make_adjacent, "move", lambda args: len(args[0]),
                                 did_work=bool)  # {} = the rows were adjacent already
    cls._compact = timed(cls._compact, "move", lambda args: len(args[0]))
    gc.callbacks.append(gc_clock)
    code = main(argv)
    measured = [items_of[i] for i in order if len(items_of[i]) > 1]
    if measured:
        report(measured[-1])
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
