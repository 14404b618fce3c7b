"""`egmla bench train-run`: a paper-base EG-MLA kv64 training run of several minutes, from nothing, in one
GPU call.

It collects the python-source corpus (the machine's own *.py files, no download), trains the 32K
byte-level BPE, tokenizes, then trains configs/egmla-kv64.toml (bf16, torch.compile) for a fixed time
budget: `train.steps = 0` sets the run's length after 20 steps so that the cosine schedule ends inside the
budget. Everything worth keeping goes to --out: metrics.jsonl, summary.json, loss.png, TensorBoard events,
config.json, tokenizer.json and gpu_train_run.json with timings, tokens/s and MFU. Checkpoints (GBs) stay in
--work.

    egmla bench train-run                                      # one H100: ~9 minutes in all
    egmla bench train-run --train-s 60 --max-bytes 20000000    # a quick smoke run
    egmla bench train-run --report OUT1 OUT2                   # compare finished runs: loss, steps, speed

The dense vs row-sparse gate-table comparison of issue 19 is two such runs with the same seed and budget,
one with `--set train.gate_table_update=row-sparse` (docs/training.md#speed has the commands).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (configs/)
KEEP = ("metrics.jsonl", "summary.json", "loss.png", "config.json", "tokenizer.json", "tensorboard")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(ROOT / "configs" / "egmla-kv64.toml"),
                        help="training config (default: the repository's configs/egmla-kv64.toml)")
    parser.add_argument("--out", default="bench-out/train-run", help="results folder")
    parser.add_argument("--work", default="/tmp/egmla-gpu-run", help="cache and checkpoints (large)")
    parser.add_argument("--call-budget-s", type=float, default=570, help="the whole call must end within this")
    parser.add_argument("--train-s", type=float, default=420, help="training time (shortened to fit the budget)")
    parser.add_argument("--max-bytes", type=int, default=300_000_000, help="python-source text to use")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, e.g. --set train.lr=1e-3")
    parser.add_argument("--steps", type=int, default=0,
                        help="train exactly this many steps (another run's count, for an equal-steps comparison; "
                             "--train-s still caps the time); 0 = as many as fit --train-s")
    parser.add_argument("--report", nargs="+", metavar="OUT",
                        help="instead of training: compare finished runs' --out folders (steps, tokens/s, "
                             "final validation loss and its difference to the first, loss at common steps)")


def main(args) -> int:
    if args.report:
        print(compare_runs(args.report))
        return 0
    if args.steps < 0:
        raise ValueError(f"--steps {args.steps}: must be >= 0 (0 = fit the time budget)")
    started = time.perf_counter()
    import torch

    from egmla.configfile import load_toml
    from egmla.data import prepare_data
    from egmla.train.config import RunConfig
    from egmla.train.trainer import train

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA device!)"
    print(f"device {device}, torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    values = load_toml(args.config, [f"data.max_bytes={args.max_bytes}", f"data.cache_dir={work / 'cache'}",
                                     "train.checkpoint_every=0", "train.keep_checkpoints=1", *args.overrides])
    run = RunConfig.from_dict(values)

    prep_start = time.perf_counter()
    _, shards = prepare_data(run.data, run.model.vocab_size, progress=False)
    prep_s = time.perf_counter() - prep_start
    print(f"data ready in {prep_s:.0f}s: {shards.meta['train_tokens']:,} training tokens", flush=True)

    # compilation, the final validation and the final checkpoint come on top of the training time
    train_s = min(args.train_s, args.call_budget_s - (time.perf_counter() - started) - 100)
    values["train"].update(steps=args.steps, time_limit_s=train_s)  # steps 0: set after 20 steps to fit
    run = RunConfig.from_dict(values)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = train(run, run_dir, progress=False)

    for name in KEEP:
        source = run_dir / name
        if source.is_dir():
            shutil.copytree(source, out / name, dirs_exist_ok=True)
        elif source.is_file():
            shutil.copy2(source, out / name)
    report = {"device": device, "torch": torch.__version__, "config": args.config, "data_prep_s": prep_s,
              "train_budget_s": train_s, "call_s": time.perf_counter() - started, "data": shards.meta,
              "summary": summary}
    (out / "gpu_train_run.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("steps", "final_val_loss", "tokens_per_s", "mfu", "train_wall_s")}))
    return 0



def compare_runs(folders: list[str]) -> str:
    """Markdown: one row per finished run folder (gate-table update, seed, steps, tokens/s, MFU, final validation
    loss, its difference to the first run's), then the validation loss at the steps every run evaluated."""
    runs, corpora = [], []
    for folder in map(Path, folders):
        record = folder / "summary.json"  # the trainer's summary (also inside gpu_train_run.json)
        if not record.is_file():
            raise ValueError(f"--report {str(folder)!r}: no summary.json there; pass --out folders of "
                             f"finished `egmla bench train-run` calls (or finished run directories)")
        summary = json.loads(record.read_text())
        train = json.loads((folder / "config.json").read_text())["train"]
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        val = {r["step"]: r["val_loss"] for r in map(json.loads, lines) if r["kind"] == "val"}
        runs.append((folder.name, summary, train, val))
        call = folder / "gpu_train_run.json"
        data = json.loads(call.read_text()).get("data", {}) if call.is_file() else {}
        corpora.append(tuple(data.get(k) for k in ("train_tokens", "val_tokens", "tokenizer_sha256")) if data else None)
    first = runs[0][1]["final_val_loss"]  # None: a run stopped before it validated
    rows = ["| run | gate tables | seed | steps | tokens/s | MFU | final val loss | vs first |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, summary, train, _ in runs:
        mfu = f"{100 * summary['mfu']:.1f}%" if summary.get("mfu") else "-"
        loss = summary["final_val_loss"]
        versus = f"{loss - first:+.4f}" if loss is not None and first is not None else "-"
        rows.append(f"| {name} | {train.get('gate_table_update', 'dense')} | {train['seed']} | {summary['steps']} | "
                    f"{summary['tokens_per_s']:,.0f} | {mfu} | {'-' if loss is None else f'{loss:.4f}'} | {versus} |")
    common = sorted(set.intersection(*(set(val) for *_, val in runs)))
    if common:
        rows += ["", "| step | " + " | ".join(name for name, *_ in runs) + " |",
                 "|---:|" + "---:|" * len(runs)]
        rows += [f"| {step} | " + " | ".join(f"{val[step]:.4f}" for *_, val in runs) + " |" for step in common]
    known = list(dict.fromkeys(c for c in corpora if c))
    if len(known) > 1:  # python-source is the machine's installed files: two machines can build two corpora
        rows += ["", "**The runs read different corpora** (another corpus, tokenizer or validation set; python-source "
                 "is the installed Python files of the machine that trained): compare runs of one corpus only. "
                 + "; ".join(f"{', '.join(name for (name, *_), c in zip(runs, corpora) if c == corpus)}: "
                             f"{corpus[0]:,} training tokens" for corpus in known) + "."]
    return "\n".join(rows)
