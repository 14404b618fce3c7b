"""Where the device idles in a Chrome trace of `docs/bench/serve_max_len_h100/profile.py` (PROFILE_TRACE=FILE):

    python docs/bench/serve_host_commits_h200/trace_gaps.py trace.json.gz [--from-ms A --to-ms B]

Prints the device's busy share per 20 ms (to find the measured run: the bench runs a warm-up first), then, within
[A, B] ms of the first device event, the idle gaps between device events by size and the device events that end the
largest gaps (the first thing the device did once the host gave it work). Kernels launched early under programmatic
dependent launch count from their launch, so busy time is the union of events, not their sum.
"""
import argparse
import collections
import gzip
import json


def device_events(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                  key=lambda e: e["ts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--from-ms", type=float, default=0.0)
    parser.add_argument("--to-ms", type=float, default=float("inf"))
    args = parser.parse_args()
    events = device_events(args.trace)
    origin = events[0]["ts"]
    busy = collections.defaultdict(float)
    for e in events:
        busy[int((e["ts"] - origin) // 20_000)] += e["dur"]
    print("device busy % per 20 ms:", " ".join(f"{k * 20}:{min(v / 200, 100):.0f}" for k, v in sorted(busy.items())))
    window = [e for e in events if args.from_ms * 1e3 <= e["ts"] - origin <= args.to_ms * 1e3]
    gaps, end, covered = [], window[0]["ts"], 0.0
    for e in window:
        if e["ts"] > end:
            gaps.append((e["ts"] - end, e["name"]))
        covered += max(0.0, e["ts"] + e["dur"] - max(e["ts"], end))
        end = max(end, e["ts"] + e["dur"])
    span = end - window[0]["ts"]
    print(f"window {args.from_ms:g}-{args.to_ms:g} ms: span {span / 1e3:.1f} ms, device busy {covered / 1e3:.1f} ms "
          f"({covered / span:.0%}), idle {(span - covered) / 1e3:.1f} ms in {len(gaps)} gaps")
    sizes = [(10, "< 10 µs"), (50, "10-50 µs"), (200, "50-200 µs"), (1000, "0.2-1 ms"), (float("inf"), ">= 1 ms")]
    for limit, label in sizes:
        low = max([s for s, _ in sizes if s < limit], default=0)
        chosen = [g for g, _ in gaps if low <= g < limit]
        print(f"  gaps {label:>10}: {len(chosen):6d}, {sum(chosen) / 1e3:7.1f} ms")
    after = collections.Counter()
    for gap, name in gaps:
        if gap >= 50:
            after[name[:70]] += gap
    print("gaps of >= 50 µs, by the device event that ends them (ms):")
    for name, total in after.most_common(8):
        print(f"  {total / 1e3:7.1f}  {name}")


if __name__ == "__main__":
    main()
