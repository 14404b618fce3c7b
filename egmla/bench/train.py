"""`egmla bench train`: training step time, tokens/s and MFU per attention variant, side by side.

Every variant trains on the same batch of real-text token ids (egmla.bench.token_ids), from the same
seed, with the trainer's own loss, optimizer and gradient clipping; one step = forward, backward, clip,
optimizer step. The first --warmup steps (torch.compile, allocator) are not timed; the rest are timed
one by one with CUDA events (wall clock on CPU), phase by phase, and reported as medians. MFU uses the
FLOPs of egmla.train.metrics.flops_per_token against the device's dense bf16 peak. EG-MLA variants get
one row per --gate-table-update (train.gate_table_update: dense AdamW or row-sparse lazy Adam), and every
variant one row per --compile-mode (train.compile_mode: reduce-overhead replays each block's forward and
backward from CUDA graphs, for a host that cannot launch kernels as fast as the GPU runs them).
--activation-checkpointing and --loss-chunk-tokens (train.activation_checkpointing, train.loss_chunk_tokens) give
rows that keep less for the backward. Three memory columns: CUDA's max_memory_allocated over every step, warm-up
included (compilation, autotuning and CUDA-graph recording run there), the timed steps' own (the steady state that
the settings act on; a CUDA graph's replay allocates nothing, so its pool does not count there), and
max_memory_reserved over every step (what the process holds from the GPU, graph pools included: what must fit).
--memory-snapshot DIR records every allocation of each row (GPU) for PyTorch's memory viewer, and prints what was
live at the allocated peak, by the code that allocated it, its pool and its step (egmla.bench.memory_peak).
--profile then runs a few more steps of each row under torch.profiler: the kernels' time by kind and the
costliest kernels go into each row of --out NAME.json and, as Markdown, into NAME_profile.md beside it.

    egmla bench train --gate-table-update dense,row-sparse --profile --out bench_train.json  # the GPU table
    egmla bench train --device cpu --preset tiny --batch 2 --seq-len 64 --steps 2 --warmup 1 --no-compile
    egmla bench train --activation-checkpointing 0,1 --loss-chunk-tokens 0,4096 --batch 32   # memory vs time (GPU)
    egmla bench train --summary --report eager.json compiled.json   # those runs' memory table, as in docs/training.md
"""
from __future__ import annotations

import argparse
import gc
import re
import statistics
import time
from pathlib import Path

DEFAULT_VARIANTS = "mha,mla-kv64,egmla-kv64"
PHASES = ("forward_backward", "clip", "optimizer")  # one step, in order


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="paper-base", help="model shapes (tiny, paper-base, paper-1b)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="comma-separated variant names from egmla.variants (e.g. mha,gqa4,mla-kv64), or 'all'")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model field for every variant, e.g. --set vocab_size=512")
    parser.add_argument("--batch", type=int, default=16, help="sequences per optimizer step (same for every variant)")
    parser.add_argument("--micro-batch", type=int, default=0, help="sequences per forward (0 = --batch)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile each block (as train.compile does)")
    parser.add_argument("--compile-mode", default="auto", metavar="MODES",
                        help="the blocks' torch.compile mode (train.compile_mode), comma-separated for one row "
                             "each: auto (as the trainer: reduce-overhead on a GPU, default on the CPU), default, "
                             "reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs, max-autotune")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto = bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="where to train: auto = cuda if available (on the CPU, MFU only with --peak-tflops)")
    parser.add_argument("--text", default="embedded", choices=["embedded", "python-source"],
                        help="real text the token ids come from")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="device peak for MFU (0 = look up the device name; unknown: no MFU)")
    parser.add_argument("--gate-table-update", default="dense", metavar="MODES",
                        help="EG-MLA's gate-table update (train.gate_table_update), comma-separated: dense, "
                             "row-sparse; EG-MLA variants get one row each, others one row")
    parser.add_argument("--activation-checkpointing", default="0", metavar="N,...",
                        help="train.activation_checkpointing per row: recompute every Nth block in backward (0 = off, "
                             "1 = every block); several values, comma-separated, give a row each (e.g. 0,1)")
    parser.add_argument("--loss-chunk-tokens", default="0", metavar="N,...",
                        help="train.loss_chunk_tokens per row: output head + cross-entropy N tokens at a time (0 = "
                             "whole logits); comma-separated values give a row each. The peak GB columns compare them")
    parser.add_argument("--memory-snapshot", metavar="DIR",
                        help="CUDA only: record every allocation of each row's warm-up and timed steps and write it "
                             "as DIR/<row>.pickle (torch.cuda.memory._dump_snapshot; drag it onto "
                             "https://pytorch.org/memory_viz to see what sets the peak and when)")
    parser.add_argument("--summary", action="store_true",
                        help="run nothing: print (or --markdown) the memory settings' table of the --report files, "
                             "one row per variant and compile mode, one column per memory setting, as in "
                             "docs/training.md (`python -m egmla.bench.summary docs/training.md` refreshes it)")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="with --summary: `--out` files of earlier runs")
    parser.add_argument("--plot", metavar="PNG", help="with --summary: also plot peak GB against step ms as a PNG")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each row (torch.profiler, --profile-steps steps after the timed ones): "
                             "kernel time by kind and the costliest kernels, printed and written beside --out")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps per profile")
    parser.add_argument("--out", metavar="JSON", help="write the rows and settings here")
    parser.add_argument("--markdown", metavar="MD", help="write the table as Markdown here (for docs/benchmarks.md; "
                                                         "with --summary, the memory table)")


def build_step(variant, args, device, ids, autocast, gate_table_update: str, compile_mode: str = "default",
               memory: tuple[int, int] = (0, 0)):
    """(config, model, step) for one row: a fresh model and optimizer, and step(timer) running one training
    step as the trainer does, calling timer.mark(phase) at the end of each phase of PHASES. memory:
    (train.activation_checkpointing, train.loss_chunk_tokens)."""
    import torch

    from egmla.configfile import model_overrides
    from egmla.model import Transformer
    from egmla.train.config import TrainConfig, uses_cuda_graphs
    from egmla.train.distributed import clip_grad_norm
    from egmla.train.optim import build_optimizer
    from egmla.train.loss import token_loss
    from egmla.train.recompute import recompute_blocks
    from egmla.train.trainer import graph_step_begin, own_gradients

    config = variant.config(args.preset, **model_overrides(args.overrides))
    if args.seq_len > config.max_seq_len:
        config = config.replace(max_seq_len=args.seq_len)
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    model.check_inputs = False
    recompute_every, chunk_tokens = memory
    recompute_blocks(model, recompute_every)
    if args.compile:
        for block in model.layers:
            block.compile(mode=compile_mode)
    graphs = uses_cuda_graphs(compile_mode)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, warmup_steps=0, gate_table_update=gate_table_update))
    if graphs:  # as the trainer: autograd adds into gradients of our own, zeroed in place
        own_gradients(model)
    micro = args.micro_batch or args.batch
    inputs, targets = ids[:, :-1].to(device), ids[:, 1:].to(device)

    def step(timer):
        for start in range(0, args.batch, micro):
            graph_step_begin(graphs)
            with autocast():
                loss = token_loss(model, inputs[start:start + micro], targets[start:start + micro],
                                  compiled=args.compile, chunk_tokens=chunk_tokens)
            (loss * micro / args.batch).backward()
        timer.mark("forward_backward")
        clip_grad_norm(model, 1.0)
        timer.mark("clip")
        optimizer.step()
        optimizer.zero_grad(set_to_none=not graphs)
        timer.mark("optimizer")

    return config, model, step


class PhaseTimer:
    """Seconds per phase of one step: CUDA events on a GPU (read after the step), the wall clock on a CPU."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.event = (lambda: torch.cuda.Event(enable_timing=True)) if self.cuda else None
        self.marks = [("start", self.event() if self.cuda else time.perf_counter())]
        if self.cuda:
            self.marks[0][1].record()

    def mark(self, phase: str) -> None:
        if self.cuda:
            self.marks.append((phase, self.event()))
            self.marks[-1][1].record()
        else:
            self.marks.append((phase, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()
        spans = {}
        for (_, begin), (phase, end) in zip(self.marks, self.marks[1:]):
            spans[phase] = begin.elapsed_time(end) / 1e3 if self.cuda else end - begin
        return spans


class NoTimer:
    def mark(self, phase: str) -> None:
        pass


def time_variant(variant, label: str, args, device, ids, autocast, gate_table_update: str,
                 compile_mode: str = "default", memory: tuple[int, int] = (0, 0)) -> dict:
    """Median step and phase times of one row (fresh model and optimizer); with --profile, its profile."""
    import torch

    from egmla.bench.memory_peak import format_breakdown, memory_mark, peak_breakdown
    from egmla.train.metrics import flops_per_token, peak_flops

    # the previous row's model first: recomputing blocks hold their own forward (a partial of the bound method), a
    # reference cycle that only the collector frees, and torch.compile's caches and CUDA graph trees hold compiled
    # blocks and their static inputs (on an H100 each reduce-overhead row left ~2.5 GB in the next rows' peaks)
    if args.compile:
        torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":  # and the allocator's cache, else the reserved column carries the rows before
        torch.cuda.empty_cache()
    config, model, step = build_step(variant, args, device, ids, autocast, gate_table_update, compile_mode, memory)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    snapshot = getattr(args, "memory_snapshot", None)
    if snapshot:  # from the first warm-up step: compilation and CUDA-graph recording happen there
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    for _ in range(args.warmup):
        if snapshot:
            memory_mark(device)
        step(NoTimer())
    first_peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    first_reserved = torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None
    if device.type == "cuda":  # the timed steps' own peak: compilation, autotuning and graph recording are done
        torch.cuda.reset_peak_memory_stats(device)
    phases = []
    for _ in range(args.steps):
        if snapshot:
            memory_mark(device)
        timer = PhaseTimer(device)
        step(timer)
        phases.append(timer.seconds())
    if snapshot:
        snapshot_path = Path(snapshot) / (re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower() + ".pickle")
        snapshot_path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(snapshot_path))
        spans = (["setup"] + [f"warm-up {i + 1}" for i in range(args.warmup)]
                 + [f"step {i + 1}" for i in range(args.steps)])
        breakdown = peak_breakdown(torch.cuda.memory._snapshot(), spans, device=device.index or 0)
        torch.cuda.memory._record_memory_history(enabled=None)
        print(format_breakdown(label, breakdown), flush=True)
    times = [sum(p.values()) for p in phases]
    seconds = statistics.median(times)
    tokens = args.batch * args.seq_len
    flops = flops_per_token(config, args.seq_len) * tokens
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, args.peak_tflops) if device.type == "cuda" or args.peak_tflops else None
    row = {"variant": variant.name, "name": label,
           "gate_table_update": gate_table_update if config.is_gated else None,
           "compile_mode": compile_mode if args.compile else None,
           "activation_checkpointing": memory[0], "loss_chunk_tokens": memory[1],
           "params": model.num_params(), "params_without_gate_tables": model.num_params(False),
           "step_ms": 1e3 * seconds, "step_ms_min": 1e3 * min(times),
           "phase_ms": {phase: 1e3 * statistics.median(p[phase] for p in phases) for phase in PHASES},
           "tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12,
           "mfu": flops / seconds / peak if peak else None,
           "steady_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
           "peak_memory_gb": (max(first_peak, torch.cuda.max_memory_allocated(device) / 1e9)
                              if device.type == "cuda" else None),
           "peak_reserved_gb": (max(first_reserved, torch.cuda.max_memory_reserved(device) / 1e9)
                                if device.type == "cuda" else None)}
    if snapshot:
        row["memory_snapshot"] = str(snapshot_path)
        row["memory_peak"] = breakdown
    if args.profile:
        row["profile"] = profile_steps(step, device, args.profile_steps)
    return row


def profile_steps(step, device, steps: int) -> dict:
    """`steps` more training steps under torch.profiler, summarised (egmla.bench.profiling)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from egmla.bench.profiling import summarise

    on_cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if on_cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(NoTimer())
        if on_cuda:
            torch.cuda.synchronize(device)
    return summarise(prof, steps, on_cuda)


def mla_base(rows: list[dict], row: dict) -> float | None:
    """MLA kv64's step time under row's compile mode and memory settings, what row's 'vs MLA kv64' column divides
    by."""
    same = ("compile_mode", "activation_checkpointing", "loss_chunk_tokens")
    return next((r["step_ms"] for r in rows if r["variant"] == "mla-kv64"
                 and all(r.get(key) == row.get(key) for key in same)), None)


def format_rows(rows: list[dict]) -> str:
    header = (f"{'variant':<34} {'step ms':>9} {'fwd+bwd':>8} {'clip':>6} {'optim':>6} {'tokens/s':>11} "
              f"{'TFLOP/s':>8} {'MFU':>6} {'vs MLA kv64':>11} {'peak GB':>7} {'steps GB':>8} {'reserved':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        base = mla_base(rows, r)
        ratio = f"{r['step_ms'] / base:.3f}x" if base else "-"
        memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        steady = f"{r['steady_memory_gb']:.1f}" if r.get("steady_memory_gb") is not None else "-"
        reserved = f"{r['peak_reserved_gb']:.1f}" if r.get("peak_reserved_gb") is not None else "-"
        phase = r["phase_ms"]
        lines.append(f"{r['name']:<34} {r['step_ms']:>9.1f} {phase['forward_backward']:>8.1f} {phase['clip']:>6.1f} "
                     f"{phase['optimizer']:>6.1f} {r['tokens_per_s']:>11,.0f} {r['tflops']:>8.1f} {mfu:>6} "
                     f"{ratio:>11} {memory:>7} {steady:>8} {reserved:>8}")
    return "\n".join(lines)


def markdown(rows: list[dict], device_name: str, settings: str) -> str:
    lines = [f"### Training step: {device_name}", "", settings, "",
             "| variant | params (M) | w/o gate tables (M) | step ms | fwd+bwd ms | clip ms | optimizer ms | "
             "tokens/s | TFLOP/s | MFU | vs MLA kv64 | peak GB | steps' peak GB | reserved GB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        base = mla_base(rows, r)
        ratio = f"{r['step_ms'] / base:.3f}x" if base else "-"
        memory = f"{r['peak_memory_gb']:.1f}" if r.get("peak_memory_gb") is not None else "-"
        steady = f"{r['steady_memory_gb']:.1f}" if r.get("steady_memory_gb") is not None else "-"
        reserved = f"{r['peak_reserved_gb']:.1f}" if r.get("peak_reserved_gb") is not None else "-"
        phase = r["phase_ms"]
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f} | {r['params_without_gate_tables'] / 1e6:.1f} | "
                     f"{r['step_ms']:.1f} | {phase['forward_backward']:.1f} | {phase['clip']:.1f} | "
                     f"{phase['optimizer']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} | {ratio} | "
                     f"{memory} | {steady} | {reserved} |")
    return "\n".join(lines) + "\n"


def profile_markdown(rows: list[dict], device_name: str, settings: str) -> str:
    from egmla.bench.profiling import markdown as profile_table

    parts = [f"### Training step profile: {device_name}", "", settings, ""]
    parts += [profile_table(f"{r['name']}: {r['step_ms']:.1f} ms/step timed", r["profile"]) for r in rows]
    return "\n".join(parts)


def rows_to_run(variants, preset: str, overrides: list[str], modes: list[str],
                compile_modes: tuple[str, ...] = ("default",),
                memories: tuple[tuple[int, int], ...] = ((0, 0),)) -> list[tuple]:
    """(variant, label, gate_table_update, compile_mode, memory) per row: every variant once per compile mode and
    memory setting ((activation_checkpointing, loss_chunk_tokens)), EG-MLA variants once per gate-table update in
    each."""
    from egmla.configfile import model_overrides
    from egmla.variants import labels

    names = labels(variants, preset)
    rows = []
    for compile_mode in compile_modes:
        for memory in memories:
            for variant in variants:
                gated = variant.config(preset, **model_overrides(overrides)).is_gated
                for mode in modes if gated else modes[:1]:
                    told = [mode] if gated and len(modes) > 1 else []
                    told += [compile_mode] if len(compile_modes) > 1 else []
                    told += [memory_label(memory)] if len(memories) > 1 else []
                    rows.append((variant, names[variant.name] + (f" ({', '.join(told)})" if told else ""), mode,
                                 compile_mode, memory))
    return rows


def memory_label(memory: tuple[int, int]) -> str:
    recompute, chunk = memory
    parts = ([f"recompute 1/{recompute}"] if recompute else []) + ([f"loss chunks {chunk}"] if chunk else [])
    return ", ".join(parts) or "plain"


def parse_modes(text: str, option: str, allowed: tuple[str, ...]) -> list[str]:
    """The comma-separated values of `option`, each one of `allowed`, at most once."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in allowed]
    if not modes or bad or len(set(modes)) < len(modes):
        raise ValueError(f"{option} {text!r}: give each of {', '.join(allowed)} at most once, comma-separated")
    return modes


def compile_label(row: dict) -> str:
    mode = row.get("compile_mode")
    if mode is None:
        return "eager"
    return {"reduce-overhead": "compiled, CUDA graphs", "default": "compiled, no graphs"}.get(mode, f"compiled, {mode}")


def rows_of(metas: list[dict]) -> list[dict]:
    """Every row of the files, each with its compile mode (files from before rows carried it: their run's)."""
    rows = []
    for meta in metas:
        settings = meta.get("settings", {})
        mode = settings.get("compile_mode", "default") if settings.get("compile", True) else None
        rows += [row if "compile_mode" in row else {**row, "compile_mode": mode} for row in meta["rows"]]
    return rows


def memory_of(row: dict) -> tuple[int, int]:
    """A row's (activation_checkpointing, loss_chunk_tokens); files from before those settings ran without them."""
    return row.get("activation_checkpointing", 0), row.get("loss_chunk_tokens", 0)


def memory_summary(metas: list[dict]) -> str:
    """The memory settings' table for docs/training.md: one row per (variant, compile mode), one column per memory
    setting, each cell `allocated peak / reserved GB (step ms)` from `egmla bench train --out` files of one GPU."""
    devices = {meta["device"] for meta in metas}
    if len(devices) != 1:
        raise ValueError(f"--summary --report: the files come from {', '.join(sorted(devices))}; give files of one GPU")
    rows = rows_of(metas)
    settings = list(dict.fromkeys(memory_of(r) for r in rows))
    lines = ["| allocated peak / reserved GB (step ms) | " + " | ".join(memory_label(m) for m in settings) + " |",
             "|---|" + "---:|" * len(settings)]
    series = list(dict.fromkeys((r["variant"], compile_label(r)) for r in rows))
    names = {r["variant"]: r["name"].split(" (")[0] for r in rows}
    for variant, compiled in series:
        cells = []
        for memory in settings:
            row = next((r for r in rows if (r["variant"], compile_label(r)) == (variant, compiled)
                        and memory_of(r) == memory), None)
            if row is None:
                cells.append("")
                continue
            peak, reserved = (f"{row[key]:.1f}" if row.get(key) is not None else "-"
                              for key in ("peak_memory_gb", "peak_reserved_gb"))
            cells.append(f"{peak} / {reserved} ({row['step_ms']:.1f})")
        lines.append(f"| {names[variant]}, {compiled} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def memory_plot(metas: list[dict], path: str) -> None:
    """Allocated peak GB against step ms, one line per (variant, compile mode) through its memory settings (plain
    first), each point labelled with its setting: which setting buys how much memory for how much time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_of(metas)
    series = list(dict.fromkeys((r["variant"], compile_label(r)) for r in rows))
    variants = list(dict.fromkeys(variant for variant, _ in series))
    modes = list(dict.fromkeys(mode for _, mode in series))
    fig, ax = plt.subplots(figsize=(9, 6))
    for variant, mode in series:
        points = [r for r in rows if (r["variant"], compile_label(r)) == (variant, mode)]
        points = [r for r in points if r.get("peak_memory_gb") is not None]  # CPU rows, older files: no peak
        if not points:
            continue
        points.sort(key=lambda r: tuple(value > 0 for value in memory_of(r)))
        name = points[0]["name"].split(" (")[0]
        ax.plot([r["step_ms"] for r in points], [r["peak_memory_gb"] for r in points], ["-", "--", ":"][
            modes.index(mode) % 3], marker="osD^"[modes.index(mode) % 4], color=plt.cm.tab10(variants.index(variant)),
            label=f"{name}, {mode}")
        for r in points:
            ax.annotate(memory_label(memory_of(r)),
                        (r["step_ms"], r["peak_memory_gb"]), fontsize=6, alpha=0.7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set(xlabel="step ms (median)", ylabel="allocated peak GB (warm-up included)", ylim=(0, None),
           title=f"egmla bench train: memory settings, {metas[0]['device']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    import contextlib

    import torch

    if args.summary:
        if not args.report:
            raise ValueError("--summary: name the runs' JSON files with --report A.json [B.json ...]")
        from egmla.bench.generate import write_table
        from egmla.bench.options import read_result

        metas = [read_result(p, "--report") for p in args.report]
        write_table(memory_summary(metas), args.markdown)
        if args.plot:
            memory_plot(metas, args.plot)
            print(f"wrote {args.plot}")
        return 0

    from egmla.bench.token_ids import text_token_ids
    from egmla.configfile import int_list, model_overrides
    from egmla.runs import atomic_write_json
    from egmla.train.config import COMPILE_MODES, GATE_TABLE_UPDATES, resolve_compile_mode
    from egmla.train.distributed import pick_device
    from egmla.variants import select

    if min(args.batch, args.seq_len, args.steps, args.profile_steps) <= 0 or args.warmup < 0:
        raise ValueError("--batch, --seq-len, --steps and --profile-steps must be positive, --warmup >= 0")
    if args.micro_batch and args.batch % args.micro_batch:
        raise ValueError(f"--micro-batch {args.micro_batch}: must divide --batch {args.batch}")
    modes = parse_modes(args.gate_table_update, "--gate-table-update", GATE_TABLE_UPDATES)
    compile_modes = parse_modes(args.compile_mode, "--compile-mode", COMPILE_MODES)
    memories = tuple((recompute, chunk)
                     for recompute in int_list(args.activation_checkpointing, "--activation-checkpointing", 0, True,
                                               "0,1")
                     for chunk in int_list(args.loss_chunk_tokens, "--loss-chunk-tokens", 0, True, "0,4096"))
    if not args.compile and set(compile_modes) - {"auto", "default"}:
        raise ValueError(f"--compile-mode {args.compile_mode}: needs --compile (drop --no-compile)")
    device = pick_device(args.device)
    if args.memory_snapshot and device.type != "cuda":
        raise ValueError(f"--memory-snapshot {args.memory_snapshot}: records CUDA allocations, and this run is on the "
                         f"CPU; run it on a GPU or drop the option")
    compile_modes = list(dict.fromkeys(resolve_compile_mode(mode, args.compile, device.type, 1)
                                       for mode in compile_modes))  # 'auto' as the trainer resolves it
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    variants = select(args.variants)
    vocab = variants[0].config(args.preset, **model_overrides(args.overrides)).vocab_size
    ids, note = text_token_ids(args.batch, args.seq_len + 1, vocab, args.text)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    settings = (f"torch {torch.__version__}, {'bf16' if use_bf16 else 'fp32'}, compile={args.compile} "
                f"({','.join(compile_modes)}), preset {args.preset}, batch {args.batch}x{args.seq_len} tokens "
                f"(micro-batch {args.micro_batch or args.batch}), "
                f"median of {args.steps} steps after {args.warmup} warm-up, ids from {note['source']} text")
    print(f"egmla bench train: {device_name}, {settings}")
    rows = []
    for variant, label, mode, compile_mode, memory in rows_to_run(variants, args.preset, args.overrides, modes,
                                                                  tuple(compile_modes), memories):
        rows.append(time_variant(variant, label, args, device, ids.long(), autocast, mode, compile_mode, memory))
        print(f"  {label}: {rows[-1]['step_ms']:.1f} ms/step", flush=True)
    print(format_rows(rows))
    described = (f"batch {args.batch} x {args.seq_len} tokens, {'bf16' if use_bf16 else 'fp32'}, "
                 f"torch.compile {'on, mode ' + ','.join(compile_modes) if args.compile else 'off'}, median of "
                 f"{args.steps} steps after {args.warmup} warm-up steps, torch {torch.__version__}")
    if args.profile:
        profiled = profile_markdown(rows, device_name, described + f"; profile of {args.profile_steps} more steps")
        print("\n" + profiled)
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    if args.out:
        atomic_write_json(args.out, {"device": device_name, "torch": torch.__version__, "settings": settings,
                                     "dtype": "bf16" if use_bf16 else "fp32", "rows": rows})
        print(f"wrote {args.out}")
        if args.profile:  # the JSON rows hold the profiles too
            profile_md = Path(args.out).with_suffix("").with_name(Path(args.out).stem + "_profile.md")
            profile_md.write_text(profiled)
            print(f"wrote {profile_md}")
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, device_name, described))
        print(f"wrote {args.markdown}")
    return 0
