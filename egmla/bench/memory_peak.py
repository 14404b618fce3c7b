"""What was live when allocated CUDA memory peaked: a replay of the allocator's trace in a memory snapshot.

`torch.cuda.memory._record_memory_history` logs every allocation and free with its stack;
`torch.cuda.memory._snapshot()` returns that trace and the segments (cudaMalloc'd blocks, each owned by a pool:
(0, 0) is the default pool, any other id a private pool such as a CUDA graph's). Replaying the trace gives the
running total of allocated bytes; at its maximum we group the live blocks by the code that allocated them (the
innermost frame outside torch's own files: our model code, or Inductor's generated code), by pool, and by the
step they were allocated in. Steps are told apart by `mark`, a tiny allocation made between steps.

Blocks allocated before recording began (the model's weights) are not in the trace: they are counted once as
`before_trace_gb`, the allocated total at the end minus the trace's net change.
"""
from __future__ import annotations

MARK = "memory_mark"  # the function name that identifies a step boundary in a trace's stacks


def memory_mark(device) -> None:
    """A step boundary in the memory trace: one 512-byte allocation, freed at once, whose stack names this function."""
    import torch

    torch.empty(512, dtype=torch.uint8, device=device)  # freed at once: only its record in the trace matters



def _where(frames: list[dict]) -> str:
    """The innermost frame of the code that asked: not torch's own Python or C++ (Inductor's generated files,
    under a torchinductor cache folder, count as the asker)."""
    for frame in frames:
        filename = frame.get("filename", "")
        if "torchinductor" in filename:
            return f"inductor {filename.rsplit('/', 1)[-1]}:{frame.get('line')} {frame.get('name')}"
        if filename.endswith(".py") and "/torch/" not in filename and "/triton/" not in filename:
            return f"{filename.rsplit('/', 1)[-1]}:{frame.get('line')} {frame.get('name')}"
    python = [f for f in frames if f.get("filename", "").endswith(".py")]
    frame = python[0] if python else (frames[0] if frames else {})
    return f"{frame.get('filename', '?').rsplit('/', 1)[-1]}:{frame.get('line')} {frame.get('name', '?')}"


def _is_mark(entry: dict) -> bool:
    return any(frame.get("name") == MARK for frame in entry.get("frames", ()))


def _pool_of(addr: int, segments: list[dict]) -> str:
    for segment in segments:
        if segment["address"] <= addr < segment["address"] + segment["total_size"]:
            return "default" if tuple(segment.get("segment_pool_id", (0, 0))) == (0, 0) else "private"
    return "freed segment"


def peak_breakdown(snapshot: dict, phases: list[str] | None = None, device: int = 0, top: int = 8) -> dict:
    """The trace's allocated peak and what was live then.

    phases names the spans between marks in order (span 0 is before the first mark); unnamed spans are numbered.
    Returns peak_gb, before_trace_gb, the span the peak fell in (peak_in), what the default and the private pools
    hold from the GPU at the end (reserved_at_end_gb), and `live`: the top groups of live bytes at the peak by
    (where, pool, span allocated in), largest first, each with gb and blocks."""
    traces = snapshot.get("device_traces") or []
    trace = traces[device] if device < len(traces) else []
    segments = [s for s in snapshot.get("segments", []) if s.get("device", device) == device]
    names = list(phases or [])

    def span_name(index: int) -> str:
        return names[index] if index < len(names) else f"span {index}"

    live: dict[int, tuple[int, int, list]] = {}  # addr -> (size, span, frames)
    total = peak = 0
    peak_at, peak_live, span = 0, {}, 0
    for entry in trace:
        action = entry.get("action")
        if action == "alloc":
            if _is_mark(entry):
                span += 1
                continue
            live[entry["addr"]] = (entry["size"], span, entry.get("frames", []))
            total += entry["size"]
            if total > peak:
                peak, peak_at, peak_live = total, span, dict(live)
        elif action == "free_completed" and entry["addr"] in live:
            total -= live.pop(entry["addr"])[0]
    allocated_now = sum(s.get("allocated_size", 0) for s in segments)
    before = max(allocated_now - total, 0)
    groups: dict[tuple, list[int]] = {}
    for addr, (size, born, frames) in peak_live.items():
        key = (_where(frames), _pool_of(addr, segments), span_name(born))
        group = groups.setdefault(key, [0, 0])
        group[0] += size
        group[1] += 1
    ordered = sorted(groups.items(), key=lambda item: -item[1][0])
    reserved = {"default": 0, "private": 0}  # what each kind of pool holds from the GPU when the snapshot is taken
    for segment in segments:
        reserved["default" if tuple(segment.get("segment_pool_id", (0, 0))) == (0, 0) else "private"] += \
            segment["total_size"]
    return {"peak_gb": (before + peak) / 1e9, "before_trace_gb": before / 1e9,
            "reserved_at_end_gb": {pool: size / 1e9 for pool, size in reserved.items()},
            "peak_in": span_name(peak_at) if trace else None,
            "live": [{"where": where, "pool": pool, "allocated_in": born, "gb": size / 1e9, "blocks": count}
                     for (where, pool, born), (size, count) in ordered[:top]],
            "live_other_gb": sum(size for _, (size, _) in ordered[top:]) / 1e9}


def format_breakdown(name: str, breakdown: dict) -> str:
    lines = [f"{name}: allocated peak {breakdown['peak_gb']:.2f} GB in {breakdown['peak_in']} "
             f"({breakdown['before_trace_gb']:.2f} GB allocated before the trace); reserved at the end: "
             f"{breakdown['reserved_at_end_gb']['default']:.2f} GB default pool, "
             f"{breakdown['reserved_at_end_gb']['private']:.2f} GB private pools (CUDA graphs)"]
    for group in breakdown["live"]:
        lines.append(f"  {group['gb']:7.2f} GB {group['blocks']:6d} blocks  {group['pool']:<8} "
                     f"{group['allocated_in']:<14} {group['where']}")
    if breakdown["live_other_gb"]:
        lines.append(f"  {breakdown['live_other_gb']:7.2f} GB in other places")
    return "\n".join(lines)
