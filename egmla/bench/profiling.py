"""A torch.profiler run summarised per step: device time of the kernels (CPU: self time of the aten ops), the
costliest of them, and their time by kind (matmul, attention, fused elementwise, optimizer, ...), for benchmark
reports. The kinds are read from kernel names: a guide to where time goes, not an exact account."""
from __future__ import annotations

import re

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


def summarise(prof, steps: int, on_cuda: bool, top: int = 15) -> dict:
    """{kernel_ms_per_step, launches_per_step, top: [{name, kind, ms_per_step, calls_per_step, share}],
    kinds: {kind: ms_per_step}} from a finished torch.profiler.profile that ran `steps` steps."""
    import torch

    if on_cuda:
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        time_of = lambda e: e.self_device_time_total  # noqa: E731
    else:
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    events = sorted((e for e in events if time_of(e) > 0), key=time_of, reverse=True)
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
