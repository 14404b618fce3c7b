"""Where the device waits on the host in a scheduler run, without a profiler: CUDA events around each decode step and
each prefill call, read after the run.

    PYTHONPATH=$PWD python docs/bench/serve_host_commits_h200/step_idle.py bench serve --preset paper-base \\
        --variants mla-kv64 --systems continuous --requests 128 --rate inf --prompt-len 1024 --output-len 256 \\
        --max-batch 128 --set max_seq_len=4096

A profiler trace (trace_gaps.py) slows the host's graph launches ~20× under CUPTI, so its gaps overstate the host's
share. Here each `Scheduler._decode`, `_prefill_run`, `_make_adjacent` and `_compact` of the last scheduler the command makes (the bench's
measured run; the warm-up makes its own) records a timing event on the stream before and after its work. An event is
stamped when the device reaches it, so the time from one item's end event to the next item's start event is time the
device had nothing queued: it waited on the host. The host cost of the events themselves (~2-4 µs a pair) is in the
measurement. Gaps are grouped by what came next (a prefill call, or a decode step of how many rows). Without CUDA
the events are host clocks, so the script runs anywhere, but only a GPU's reading means anything.
"""
import collections
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


items_of: dict[int, list] = {}  # id(scheduler) -> [(kind, rows, start event, end event)], in order
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
        began = time.perf_counter()
        start.record()
        out = method(self, *args)
        end.record()
        if did_work(out):  # (else the call launched nothing: its events would split a wait in two)
            items_of[id(self)].append((kind, rows, start, end, began, time.perf_counter()))
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


def group(kind: str, rows: int) -> str:
    if kind == "prefill":
        return "before a prefill call"
    if kind == "move":
        return "before rows move (make adjacent, compact)"
    for low in (96, 64, 32, 16, 8):
        if rows >= low:
            return f"before a decode step of >= {low} rows"
    return "before a decode step of < 8 rows"


def report(items: list) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    gaps, busy = collections.defaultdict(list), collections.defaultdict(list)
    for (_, _, _, end, _, _), (kind, rows, start, _, _, _) in zip(items, items[1:]):
        gaps[group(kind, rows)].append(max(0.0, end.elapsed_time(start)) * 1e3)
    for kind, rows, start, end, _, _ in items:
        busy[group(kind, rows)].append(start.elapsed_time(end) * 1e3)
    span = items[0][2].elapsed_time(items[-1][3])
    idle = sum(sum(v) for v in gaps.values()) / 1e3
    print(f"{len(items)} device items over {span:.1f} ms: idle between them {idle:.1f} ms ({idle / span:.0%})")
    print(f"{'what came next':<42} {'items':>6} {'idle ms':>8} {'idle µs p50':>12} {'p90':>6} {'its µs p50':>11}")
    for name in sorted(busy, key=lambda n: -sum(gaps.get(n, [0]))):
        waits = sorted(gaps.get(name, [0.0]))
        print(f"{name:<42} {len(busy[name]):6d} {sum(waits) / 1e3:8.1f} {statistics.median(waits):12.0f} "
              f"{waits[int(0.9 * (len(waits) - 1))]:6.0f} {statistics.median(busy[name]):11.0f}")
    origin = items[0][2]
    largest = sorted(((max(0.0, a[3].elapsed_time(b[2])), a, b) for a, b in zip(items, items[1:])),
                     key=lambda g: -g[0])[:6]
    print("largest waits: ms, at ms, after -> before (kind, rows), gc of generations 1-2 on the host between them (ms)")
    for wait, a, b in largest:
        collected = sum(max(0.0, min(b[4], stop) - max(a[5], begin)) for begin, stop in collection_spans)
        print(f"  {wait:7.2f} {origin.elapsed_time(b[2]):8.1f}  {a[0]} {a[1]} -> {b[0]} {b[1]}  gc {collected * 1e3:.1f}")
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
