"""Where the device idles in a Chrome trace of `docs/bench/serve_max_len_h100/profile.py` (PROFILE_TRACE=FILE):

    python docs/bench/serve_host_commits_h200/trace_gaps.py trace.json.gz [--from-ms A --to-ms B]

Prints the device's busy share per 20 ms (to find the measured run: the bench runs a warm-up first), then, within
[A, B] ms of the first device event, the idle gaps between device events by size and the device events that end the
largest gaps (the first thing the device did once the host gave it work). Kernels launched early under programmatic
dependent launch count from their launch, so busy time is the union of events, not their sum.

Read the gaps against the profiler's own cost: under CUPTI a CUDA graph's launch takes far longer on the host than
without it (a decode step's: ~170-250 µs here against 5-12 µs unprofiled, docs/bench/serve_host_path_h100/
diagnostics/graph_launch.py). The script prints how much of the gaps the host spent inside `cudaGraphLaunch`: that
part is the profiler's, not the scheduler's.
"""
import argparse
import collections
import gzip
import json
import statistics


def read_events(path: str) -> tuple[list[dict], list[dict]]:
    """The device's events and the host's `cudaGraphLaunch` calls, each by start time."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace) if e.get("ph") == "X"]
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    launches = [e for e in events if e.get("name") == "cudaGraphLaunch"]
    return sorted(device, key=lambda e: e["ts"]), sorted(launches, key=lambda e: e["ts"])


def inside(start: float, end: float, spans: list[dict]) -> float:
    """How much of [start, end) the host events `spans` (non-overlapping: one thread's calls) cover."""
    return sum(max(0.0, min(end, s["ts"] + s["dur"]) - max(start, s["ts"])) for s in spans
               if s["ts"] < end and s["ts"] + s["dur"] > start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--from-ms", type=float, default=0.0)
    parser.add_argument("--to-ms", type=float, default=float("inf"))
    args = parser.parse_args()
    events, launches = read_events(args.trace)
    origin = events[0]["ts"]
    busy = collections.defaultdict(float)
    for e in events:
        busy[int((e["ts"] - origin) // 20_000)] += e["dur"]
    print("device busy % per 20 ms:", " ".join(f"{k * 20}:{min(v / 200, 100):.0f}" for k, v in sorted(busy.items())))
    window = [e for e in events if args.from_ms * 1e3 <= e["ts"] - origin <= args.to_ms * 1e3]
    gaps, end, covered = [], window[0]["ts"], 0.0
    for e in window:
        if e["ts"] > end:
            gaps.append((e["ts"] - end, e["name"], end))
        covered += max(0.0, e["ts"] + e["dur"] - max(e["ts"], end))
        end = max(end, e["ts"] + e["dur"])
    span = end - window[0]["ts"]
    print(f"window {args.from_ms:g}-{args.to_ms:g} ms: span {span / 1e3:.1f} ms, device busy {covered / 1e3:.1f} ms "
          f"({covered / span:.0%}), idle {(span - covered) / 1e3:.1f} ms in {len(gaps)} gaps")
    sizes = [(10, "< 10 µs"), (50, "10-50 µs"), (200, "50-200 µs"), (1000, "0.2-1 ms"), (float("inf"), ">= 1 ms")]
    for limit, label in sizes:
        low = max([s for s, _ in sizes if s < limit], default=0)
        chosen = [g for g, _, _ in gaps if low <= g < limit]
        print(f"  gaps {label:>10}: {len(chosen):6d}, {sum(chosen) / 1e3:7.1f} ms")
    after = collections.Counter()
    for gap, name, _ in gaps:
        if gap >= 50:
            after[name[:70]] += gap
    print("gaps of >= 50 µs, by the device event that ends them (ms):")
    for name, total in after.most_common(8):
        print(f"  {total / 1e3:7.1f}  {name}")
    low, high = window[0]["ts"], end
    spans = [s for s in launches if low <= s["ts"] <= high]
    if spans:
        large = [(gap, start) for gap, _, start in gaps if gap >= 50]
        in_launch = sum(inside(start, start + gap, spans) for gap, start in large)
        print(f"cudaGraphLaunch on the host: {len(spans)} calls, median {statistics.median(s['dur'] for s in spans):.0f}"
              f" µs (unprofiled 5-12 µs); of the gaps of >= 50 µs ({sum(g for g, _ in large) / 1e3:.1f} ms), "
              f"{in_launch / 1e3:.1f} ms were spent inside it")


if __name__ == "__main__":
    main()
