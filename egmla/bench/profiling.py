"""A torch.profiler run summarised per step: device time of the kernels (CPU: self time of the aten ops), the
costliest of them, and their time by kind (matmul, attention, fused elementwise, optimizer, ...), for benchmark
reports. The kinds are read from kernel names: a guide to where time goes, not an exact account."""
from __future__ import annotations

import re
from typing import Callable

# (kind, pattern on the kernel name), first match wins. CUDA's foreach kernels (multi_tensor_apply) serve both
# the optimizer and gradient clipping; eager elementwise kernels and CPU ops mostly land in "other".
KINDS = [
    ("foreach (optimizer, clipping)", r"foreach|multi_tensor_apply|adam|LpNorm"),
    ("attention", r"flash|fmha|attention|sdpa|efficient"),
    ("matmul", r"gemm|matmul|cutlass|cublas|xmma|nvjet|\bmm\b|addmm|bmm|linear"),
    ("communication", r"nccl|allreduce|all_reduce|gloo"),
    ("embedding and indexing", r"embedding|index|scatter|gather|nonzero|sort|unique|segment|partials|grad_weight"),
    ("fused elementwise (Triton)", r"^triton_"),
    ("norm", r"layer_norm|rms_norm"),
    ("copy and fill", r"copy|fill|memset|memcpy|cat|pad|zero"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def timed_events(prof, on_cuda: bool) -> tuple[list, Callable]:
    """(events, time_of) of a finished torch.profiler.profile, costliest first: CUDA kernels with their device
    time, or on CPU the aten ops with their self CPU time (µs)."""
    import torch

    if on_cuda:
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        time_of = lambda e: e.self_device_time_total  # noqa: E731
    else:
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    return sorted((e for e in events if time_of(e) > 0), key=time_of, reverse=True), time_of


def summarise(prof, steps: int, on_cuda: bool, top: int = 15) -> dict:
    """{kernel_ms_per_step, launches_per_step, top: [{name, kind, ms_per_step, calls_per_step, share}],
    kinds: {kind: ms_per_step}} from a finished torch.profiler.profile that ran `steps` steps."""
    events, time_of = timed_events(prof, on_cuda)
    total = sum(time_of(e) for e in events) or 1.0
    kinds: dict[str, float] = {}
    for e in events:
        kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + time_of(e) / steps / 1e3
    return {"measure": "CUDA kernel time" if on_cuda else "CPU self time of aten ops",
            "kernel_ms_per_step": total / steps / 1e3,
            "launches_per_step": sum(e.count for e in events) / steps,
            "top": [{"name": e.key, "kind": kind_of(e.key), "ms_per_step": time_of(e) / steps / 1e3,
                     "calls_per_step": e.count / steps, "share": time_of(e) / total} for e in events[:top]],
            "kinds": dict(sorted(kinds.items(), key=lambda item: -item[1]))}


def markdown(title: str, summary: dict, name_width: int = 90) -> str:
    """One profile as Markdown: the time by kind, then the costliest kernels."""
    ms = summary["kernel_ms_per_step"]
    lines = [f"#### {title}", "",
             f"{summary['measure']}: {ms:.2f} ms per step in {summary['launches_per_step']:.0f} launches.", "",
             "| kind | ms/step | share |", "|---|---:|---:|"]
    lines += [f"| {kind} | {value:.3f} | {100 * value / ms:.1f}% |" for kind, value in summary["kinds"].items()]
    lines += ["", "| kernel | kind | ms/step | calls/step | share |", "|---|---|---:|---:|---:|"]
    for k in summary["top"]:
        name = k["name"].replace("|", "\\|")
        name = name if len(name) <= name_width else name[:name_width - 1] + "…"
        lines.append(f"| `{name}` | {k['kind']} | {k['ms_per_step']:.3f} | {k['calls_per_step']:.0f} | "
                     f"{100 * k['share']:.1f}% |")
    return "\n".join(lines) + "\n"


# ---- the training loop's profile (train.profile_steps): where a step's wall time goes on each process ----------
STEP_LABEL = "egmla.step"  # one range per profiled step (StepProfiler)
PHASES = ("data", "forward_backward", "clip", "loss_reduce", "optimizer")  # egmla.train.trainer.phase labels
PHASE_NAMES = {"data": "loading the batch (data loader)", "forward_backward": "forward + backward (GPU: launching it)",
               "clip": "gradient clipping (norm to the host)", "loss_reduce": "loss all-reduce (to the host)",
               "optimizer": "optimizer step", "between": "between steps (logging, checks)"}


def merged(intervals) -> list[tuple[float, float]]:
    """The union of (start, end) intervals, as sorted disjoint intervals."""
    out: list[list[float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def length(intervals) -> float:
    return sum(e - s for s, e in intervals)


def intersection(a, b) -> list[tuple[float, float]]:
    """a ∩ b, both merged (sorted, disjoint)."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if end > start:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def difference(a, b) -> list[tuple[float, float]]:
    """a minus b, both merged."""
    out = []
    for start, end in a:
        for b_start, b_end in b:
            if b_end <= start or b_start >= end:
                continue
            if b_start > start:
                out.append((start, b_start))
            start = max(start, b_end)
        if end > start:
            out.append((start, end))
    return out


def step_timeline(events) -> dict:
    """Per step (ms, means over the profiled steps) of one process, from torch.profiler events (µs time ranges):
    the wall time from the first profiled step's start to the last one's end, the host's time in each phase of
    the step (PHASES, and between steps), and, where there are GPU events, the GPU's busy time (any kernel or
    copy), its idle time split by what the host was doing meanwhile (a host-side stall), the communication
    kernels' (NCCL) time and the part of it that no compute kernel overlapped."""
    import torch

    cuda = torch.autograd.DeviceType.CUDA
    host_names = {e.name for e in events if e.device_type != cuda}
    ranges, device = {}, []
    for e in events:
        span = (e.time_range.start, e.time_range.end)
        if e.device_type == cuda:  # kernels and copies, not the GPU spans of the host's labelled ranges
            if not getattr(e, "is_user_annotation", False) and e.name not in host_names:
                device.append((span, kind_of(e.name) == "communication"))
        elif e.name.startswith("egmla."):
            ranges.setdefault(e.name.removeprefix("egmla."), []).append(span)
    steps = sorted(ranges.pop("step", []))  # one per step (touching ranges are still two steps)
    if not steps:
        return {"steps": 0}
    window = [(steps[0][0], steps[-1][1])]
    per_step = lambda us: us / len(steps) / 1e3  # noqa: E731
    host = {name: merged(intersection(merged(ranges.get(name, [])), window)) for name in PHASES}
    host["between"] = difference(window, merged(steps))
    out = {"steps": len(steps), "wall_ms": per_step(length(window)),
           "host_ms": {name: per_step(length(spans)) for name, spans in host.items()}}
    if not device:
        return out | {"gpu": None}
    compute = intersection(merged(span for span, comm in device if not comm), window)
    comm = intersection(merged(span for span, comm in device if comm), window)
    busy = merged(compute + comm)
    idle = difference(window, busy)
    idle_by_phase = {name: per_step(length(intersection(idle, spans))) for name, spans in host.items()}
    idle_by_phase["other"] = per_step(length(idle)) - sum(idle_by_phase.values())
    return out | {"gpu": {"busy_ms": per_step(length(busy)), "idle_ms": per_step(length(idle)),
                          "idle_ms_while_host_in": idle_by_phase, "compute_ms": per_step(length(compute)),
                          "communication_ms": per_step(length(comm)),
                          "communication_exposed_ms": per_step(length(difference(comm, compute)))}}


def timeline_markdown(ranks: list[dict]) -> str:
    """The per-process step timelines as one table: a column per rank."""
    def cell(value):
        return "-" if value is None else f"{value:.2f}"

    head = ["| per step, ms | " + " | ".join(f"rank {r}" for r in range(len(ranks))) + " |",
            "|---|" + "---:|" * len(ranks)]
    rows = [("wall (first profiled step's start to last one's end)", lambda t: t.get("wall_ms"))]
    if any(t.get("gpu") for t in ranks):
        gpu = lambda key: lambda t: (t.get("gpu") or {}).get(key)  # noqa: E731
        rows += [("GPU busy (any kernel or copy)", gpu("busy_ms")),
                 ("**GPU idle (host-side stall)**", gpu("idle_ms"))]
        rows += [(f"  idle while the host is in: {PHASE_NAMES.get(name, name)}",
                  lambda t, name=name: ((t.get("gpu") or {}).get("idle_ms_while_host_in") or {}).get(name))
                 for name in (*PHASES, "between", "other")]
        rows += [("communication kernels (NCCL)", gpu("communication_ms")),
                 ("**communication not overlapped by compute**", gpu("communication_exposed_ms"))]
    rows += [(f"host: {PHASE_NAMES[name]}", lambda t, name=name: (t.get("host_ms") or {}).get(name))
             for name in (*PHASES, "between")]
    return "\n".join(head + [f"| {label} | " + " | ".join(cell(get(t)) for t in ranks) + " |"
                             for label, get in rows]) + "\n"


class StepProfiler:
    """torch.profiler over the last `train.profile_steps` steps of a training run (nothing when it is 0), driven
    by the training loop: begin(step) before step number `step` (from 1), end(step) after it. After the last
    step every process reads its own step timeline (step_timeline), rank 0 gathers them and writes
    RUN_DIR/profile.json and profile.md: the timeline per rank, then rank 0's kernels by kind and the costliest
    (summarise). Profiled steps run slower than others (the profiler records every op). close() stops a profile
    that an interrupted run left running and writes nothing."""

    def __init__(self, cfg, run_dir, info, log=print):
        self.first, self.last = cfg.steps - cfg.profile_steps + 1, cfg.steps
        self.enabled = cfg.profile_steps > 0
        self.run_dir, self.info, self.log, self.parallel = run_dir, info, log, cfg.parallel
        self.prof = self.step_range = self.started_at = None

    def begin(self, step: int) -> None:
        if not (self.enabled and self.first <= step <= self.last):
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        if self.prof is None:
            on_cuda = self.info.device.type == "cuda"
            self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else []))
            self.prof.start()
            self.started_at = step
        self.step_range = torch.profiler.record_function(STEP_LABEL)
        self.step_range.__enter__()

    def end(self, step: int) -> None:
        if self.step_range is None:
            return
        self.step_range.__exit__(None, None, None)
        self.step_range = None
        if step == self.last:
            self.write(step)

    def close(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    def write(self, step: int) -> None:
        import json
        import time
        from pathlib import Path

        import torch

        from egmla.train.distributed import gather_object

        started = time.perf_counter()
        on_cuda = self.info.device.type == "cuda"
        if on_cuda:
            torch.cuda.synchronize(self.info.device)
        prof, self.prof = self.prof, None
        prof.stop()
        steps = step - self.started_at + 1
        ranks = gather_object(step_timeline(prof.events()), self.info)  # a collective: every process is here
        if not self.info.is_main:
            return
        report = {"first_step": self.started_at, "last_step": step, "steps": steps, "parallel": self.parallel,
                  "world_size": self.info.world_size,
                  "device": torch.cuda.get_device_name(self.info.device) if on_cuda else "cpu",
                  "ranks": ranks, "kernels": summarise(prof, steps, on_cuda)}
        Path(self.run_dir, "profile.json").write_text(json.dumps(report, indent=2) + "\n")
        Path(self.run_dir, "profile.md").write_text(profile_report_markdown(report))
        self.log(f"profile of steps {self.started_at}-{step} in {Path(self.run_dir, 'profile.md')} "
                 f"({time.perf_counter() - started:.1f}s to summarise)")


def profile_report_markdown(report: dict) -> str:
    """profile.json as Markdown: the step timeline per rank, then rank 0's kernels."""
    steps = f"steps {report['first_step']}-{report['last_step']}"
    lines = [f"### Training step profile: {report['device']}, {report['world_size']} process(es), "
             f"{report['parallel'].upper()}, {steps}", "",
             "Per step, means over the profiled steps. GPU idle = the wall time with no kernel or copy running on "
             "the process's GPU, split by the step phase the host was in meanwhile (a stall on the host side); "
             "communication not overlapped = NCCL kernel time with no compute kernel running beside it.", "",
             timeline_markdown(report["ranks"]), markdown(f"Kernels of rank 0, {steps}", report["kernels"])]
    return "\n".join(lines)
