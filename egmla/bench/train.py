"""`egmla bench train`: training step time, tokens/s and MFU per attention variant, side by side.

Every variant trains on the same batch of real-text token ids (egmla.bench.token_ids), from the same
seed, with the trainer's own loss, AdamW and gradient clipping; one step = forward, backward, clip,
optimizer step. The first --warmup steps (torch.compile, allocator) are not timed; the rest are timed
one by one with CUDA events (wall clock on CPU) and reported as the median. MFU uses the FLOPs of
egmla.train.metrics.flops_per_token against the device's dense bf16 peak.

    egmla bench train --out bench_train.json                         # paper-base, GPU, bf16 + compile
    egmla bench train --device cpu --preset tiny --batch 2 --seq-len 64 --steps 2 --warmup 1 --no-compile
"""
from __future__ import annotations

import argparse
import statistics
import time

DEFAULT_VARIANTS = "mha,mla-kv64,egmla-kv64"


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
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto = bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--text", default="embedded", choices=["embedded", "python-source"],
                        help="real text the token ids come from")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="device peak for MFU (0 = look up the device name; unknown: no MFU)")
    parser.add_argument("--out", metavar="JSON", help="write the rows and settings here")
    parser.add_argument("--markdown", metavar="MD", help="write the table as Markdown here (for docs/benchmarks.md)")


def time_variant(variant, label: str, args, device, ids, autocast) -> dict:
    """Median step time of one variant (fresh model and optimizer)."""
    import torch

    from egmla.configfile import parse_overrides
    from egmla.model import Transformer
    from egmla.train.config import TrainConfig
    from egmla.train.distributed import clip_grad_norm
    from egmla.train.metrics import flops_per_token, peak_flops
    from egmla.train.optim import build_optimizer
    from egmla.train.trainer import token_loss

    config = variant.config(args.preset, **parse_overrides(args.overrides, section="model"))
    if args.seq_len > config.max_seq_len:
        config = config.replace(max_seq_len=args.seq_len)
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    model.check_inputs = False
    if args.compile:
        for block in model.layers:
            block.compile()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, warmup_steps=0))
    micro = args.micro_batch or args.batch
    inputs, targets = ids[:, :-1].to(device), ids[:, 1:].to(device)

    def step():
        for start in range(0, args.batch, micro):
            with autocast():
                loss = token_loss(model, inputs[start:start + micro], targets[start:start + micro])
            (loss * micro / args.batch).backward()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    tokens = args.batch * args.seq_len
    flops = flops_per_token(config, args.seq_len) * tokens
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, args.peak_tflops) if device.type == "cuda" or args.peak_tflops else None
    return {"variant": variant.name, "name": label, "params": model.num_params(),
            "params_without_gate_tables": model.num_params(False), "step_ms": 1e3 * seconds,
            "step_ms_min": 1e3 * min(times), "tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / peak if peak else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}


def format_rows(rows: list[dict]) -> str:
    reference = {r["variant"]: r["step_ms"] for r in rows}
    base = reference.get("mla-kv64")
    header = (f"{'variant':<22} {'step ms':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'vs MLA kv64':>11} "
              f"{'mem GB':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        ratio = f"{r['step_ms'] / base:.3f}x" if base else "-"
        memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        lines.append(f"{r['name']:<22} {r['step_ms']:>9.1f} {r['tokens_per_s']:>11,.0f} {r['tflops']:>8.1f} "
                     f"{mfu:>6} {ratio:>11} {memory:>7}")
    return "\n".join(lines)


def markdown(rows: list[dict], device_name: str, settings: str) -> str:
    base = {r["variant"]: r["step_ms"] for r in rows}.get("mla-kv64")
    lines = [f"### Training step: {device_name}", "", settings, "",
             "| variant | params (M) | w/o gate tables (M) | step ms | tokens/s | TFLOP/s | MFU | vs MLA kv64 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        ratio = f"{r['step_ms'] / base:.3f}x" if base else "-"
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f} | {r['params_without_gate_tables'] / 1e6:.1f} | "
                     f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    import contextlib

    import torch

    from egmla.bench.token_ids import text_token_ids
    from egmla.configfile import parse_overrides
    from egmla.train.distributed import pick_device
    from egmla.variants import labels, select

    if min(args.batch, args.seq_len, args.steps) <= 0 or args.warmup < 0:
        raise ValueError("--batch, --seq-len and --steps must be positive, --warmup >= 0")
    if args.micro_batch and args.batch % args.micro_batch:
        raise ValueError(f"--micro-batch {args.micro_batch}: must divide --batch {args.batch}")
    device = pick_device(args.device)
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    variants = select(args.variants)
    vocab = variants[0].config(args.preset, **parse_overrides(args.overrides, section="model")).vocab_size
    ids, note = text_token_ids(args.batch, args.seq_len + 1, vocab, args.text)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    settings = (f"torch {torch.__version__}, {'bf16' if use_bf16 else 'fp32'}, compile={args.compile}, preset "
                f"{args.preset}, batch {args.batch}x{args.seq_len} tokens "
                f"(micro-batch {args.micro_batch or args.batch}), "
                f"median of {args.steps} steps after {args.warmup} warm-up, ids from {note['source']} text")
    print(f"egmla bench train: {device_name}, {settings}")
    rows = []
    names = labels(variants, args.preset)
    for variant in variants:
        rows.append(time_variant(variant, names[variant.name], args, device, ids.long(), autocast))
        print(f"  {rows[-1]['name']}: {rows[-1]['step_ms']:.1f} ms/step", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(format_rows(rows))
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    if args.out:
        from egmla.runs import atomic_write_json

        atomic_write_json(args.out, {"device": device_name, "torch": torch.__version__, "settings": settings,
                                     "dtype": "bf16" if use_bf16 else "fp32", "rows": rows})
        print(f"wrote {args.out}")
    if args.markdown:
        from pathlib import Path

        described = (f"batch {args.batch} x {args.seq_len} tokens, {'bf16' if use_bf16 else 'fp32'}, "
                     f"torch.compile {'on' if args.compile else 'off'}, median of {args.steps} steps after "
                     f"{args.warmup} warm-up steps, torch {torch.__version__}")
        Path(args.markdown).write_text(markdown(rows, device_name, described))
        print(f"wrote {args.markdown}")
    return 0
