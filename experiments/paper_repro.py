"""Reproduce one group of the paper's experiments (issue 7) in one GPU call, from nothing.

Groups (configs/ holds every config; all runs of a group share data order, seed and token budget):
  table1     MHA, GQA-4, MLA kv256/kv64/kv16, EG-MLA kv256/kv64/kv16 (d_e = 512)
  ablations  EG-MLA kv64 without the norm, with `add` instead of `mul` (plus the full model for reference)
  de-sweep   EG-MLA kv64 with d_e in {64, 128, 256, 512, 1024, 2048}
  latent     EG-MLA kv64 with the gate on the latent, beside the paper's placement
  seeds      EG-MLA kv64 and MLA kv256 with seeds 1 and 2 (seed 0 is in table1)

    python experiments/paper_repro.py table1 --steps 800            # on the lent H100
    python experiments/paper_repro.py table1 --only mha,mla-kv256   # part of a group (calls are <= 10 min)
    python experiments/paper_repro.py latent --preset-override model.preset=tiny --steps 4   # CPU smoke test

Writes to --out (default $OUT): <group>.json (the compare rows plus every run's metrics.jsonl records),
<group>.png (validation loss vs KV elements/token) and <group>-curves.png (validation loss vs tokens).
Checkpoints stay in --work. The python-source corpus and its tokenizer are built inside the call.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "table1": ["mha", "gqa4", "mla-kv256", "mla-kv64", "mla-kv16", "egmla-kv256", "egmla-kv64", "egmla-kv16"],
    "ablations": ["egmla-kv64", "egmla-kv64-no-norm", "egmla-kv64-add"],
    "de-sweep": [f"egmla-kv64-de{d}" for d in (64, 128, 256)] + ["egmla-kv64"]
                + [f"egmla-kv64-de{d}" for d in (1024, 2048)],
    "latent": ["egmla-kv64", "egmla-kv64-latent"],
    "seeds": ["egmla-kv64", "mla-kv256"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("group", choices=sorted(GROUPS))
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per run (the token budget)")
    parser.add_argument("--only", default="", help="comma-separated subset of the group's configs")
    parser.add_argument("--seeds", default="1,2", help="seeds for the 'seeds' group")
    parser.add_argument("--out", default=os.environ.get("OUT", "repro_out"))
    parser.add_argument("--work", default="/tmp/egmla-repro")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--preset-override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="like --set, for smoke tests at other shapes")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    from egmla.runs import atomic_write_json
    from egmla.train.compare import format_table, load_runs, plot_comparison
    from egmla.train.trainer import train

    names = GROUPS[args.group]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    configs = [str(ROOT / "configs" / f"{name}.toml") for name in names]
    overrides = [f"train.steps={args.steps}", "train.checkpoint_every=0", "train.keep_checkpoints=1",
                 f"data.cache_dir={Path(args.work) / 'cache'}", *args.preset_override, *args.overrides]
    plan = []
    seeds = [int(s) for s in args.seeds.split(",")] if args.group == "seeds" else [None]
    for seed in seeds:
        extra = [f"train.seed={seed}"] if seed is not None else []
        for label, run in load_runs(configs, "paper-base", overrides + extra):
            plan.append((f"{label}-seed{run.train.seed}", run))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, curves = [], {}
    for label, run in plan:
        print(f"=== {label}: {run.model.variant_name()}, {run.train.steps} steps ===", flush=True)
        run_dir = Path(args.work) / args.group / label
        summary = train(run, run_dir, progress=False)
        row = {k: summary[k] for k in ("name", "variant", "params", "params_without_gate_tables",
                                       "kv_elements_per_token", "final_val_loss", "tokens_per_s", "train_wall_s")}
        row.update(name=label, seed=run.train.seed,
                   tokens=run.train.steps * run.train.batch_size * run.train.seq_len)
        rows.append(row)
        curves[label] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        atomic_write_json(out / f"{args.group}.json", {"group": args.group, "rows": rows, "metrics": curves,
                                                       "wall_s": time.perf_counter() - started})
    print("\n" + format_table(rows))
    plot_comparison(rows, out / f"{args.group}.png", f"{args.group}: validation loss vs KV cache")
    per_step = {row["name"]: row["tokens"] // args.steps for row in rows}
    plot_curves(curves, per_step, out / f"{args.group}-curves.png", args.group)
    return 0


def plot_curves(curves: dict, tokens_per_step: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, records in curves.items():
        points = [(r["step"] * tokens_per_step[label], r["val_loss"]) for r in records if r.get("kind") == "val"]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{title}: validation loss vs tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
