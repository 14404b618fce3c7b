"""`egmla train`: train a model from a TOML config plus --set overrides; `--resume` continues a run.

With no arguments it trains the `tiny` EG-MLA preset on the embedded English corpus (a few minutes
on a laptop CPU). Several GPUs: `torchrun --nproc_per_node=N -m egmla train --config ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EPILOG = """examples:
  egmla train                                       tiny EG-MLA on the embedded English corpus (CPU, minutes)
  egmla train --config configs/egmla-kv64.toml      a Table 1 row at paper-base (GPU)
  egmla train --set model.attention=mla --set train.steps=200
  egmla train --set data.corpus='books/*.txt'       local .txt/.jsonl/.parquet files
  egmla train --resume runs/latest                  continue after a crash or Ctrl-C
  torchrun --nproc_per_node=8 -m egmla train --config configs/egmla-kv64.toml --set train.parallel=fsdp
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from egmla.train.config import config_help

    parser.epilog = (EPILOG + "\n[train] and [data] keys (defaults; [model] takes preset = NAME and any "
                     "ModelConfig field, see `egmla kv-report --help`):\n" + config_help())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", metavar="FILE.toml",
                        help="experiment config with [model] (preset = ... plus ModelConfig fields), [train] and "
                             "[data] sections; default: the tiny EG-MLA preset on the embedded corpus")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.steps=100 --set model.kv_lora_rank=16 "
                             "(repeatable; with --resume only train.* keys)")
    parser.add_argument("--run-dir", metavar="DIR",
                        help="where checkpoints, metrics and plots go (default: runs/<name>-<timestamp>, "
                             "with runs/latest pointing at it)")
    parser.add_argument("--resume", nargs="?", const="runs/latest", metavar="RUN",
                        help="continue the run in RUN (default runs/latest) from its newest good checkpoint, "
                             "with its saved config and tokenizer")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")


def resolve_config(args):
    """(RunConfig, run_dir or None, resume flag) from the command line."""
    from egmla.configfile import load_toml, parse_overrides
    from egmla.runs import read_run_config
    from egmla.train.config import RunConfig, TrainConfig
    from egmla.config import check_keys

    if args.resume:
        if args.config:
            raise ValueError("--config: a resumed run keeps its own config; drop --config (use --set train.KEY=...)")
        if args.run_dir:
            raise ValueError(f"--run-dir {args.run_dir!r}: a resumed run continues in its own folder ({args.resume}); "
                             f"drop --run-dir")
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file():
            raise ValueError(f"--resume {args.resume!r}: no run there (no config.json); pass a directory "
                             f"written by `egmla train`")
        meta = read_run_config(run_dir)
        overrides = parse_overrides(args.overrides)
        for section in overrides:
            if section != "train":
                raise ValueError(f"--set {section}.*: a resumed run keeps its model and data; only train.* "
                                 f"(e.g. train.steps) may change")
        check_keys(TrainConfig, overrides.get("train", {}), where="train")
        meta["train"] = {**meta["train"], **overrides.get("train", {})}
        return RunConfig.from_dict(meta), run_dir.resolve(), True
    run = RunConfig.from_dict(load_toml(args.config, args.overrides))
    return run, Path(args.run_dir) if args.run_dir else None, False


def default_run_dir(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{name}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path("runs") / f"{name}-{stamp}-{suffix}"
    return path


def point_latest(run_dir: Path) -> None:
    """runs/latest -> this run (a relative symlink), when the run lives in ./runs. Called after each checkpoint:
    a run that failed before its first one never takes runs/latest."""
    runs = Path("runs").resolve()
    if run_dir.resolve().parent != runs:
        return
    link = runs / "latest"
    tmp = runs / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def main(args) -> int:
    from egmla.train.distributed import broadcast_object, init_distributed, shutdown_distributed
    from egmla.train.trainer import train

    run, run_dir, resume = resolve_config(args)
    if args.dry_run:
        print(json.dumps(run.to_dict(), indent=2))
        return 0
    info = init_distributed(run.train.device)
    ended = False  # normally: every process then waits for the others before leaving the group
    try:
        if run_dir is None:
            run_dir = broadcast_object(default_run_dir(run.name) if info.is_main else None, info)
        if info.is_main:
            print(f"run directory: {run_dir}")
        started = time.perf_counter()
        try:
            summary = train(run, run_dir, resume=resume, progress=not args.no_progress, on_checkpoint=point_latest)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, no new checkpoint
            print(f"\naborted; the checkpoints already in {run_dir} are intact (resume with --resume)",
                  file=sys.stderr)
            return 130
        if info.is_main:
            print(f"done in {time.perf_counter() - started:.1f}s" +
                  (" (interrupted; resume with --resume)" if summary["interrupted"] else ""))
        ended = True
    finally:
        shutdown_distributed(wait=ended)
    return 0
