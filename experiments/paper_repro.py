"""Reproduce one group of the paper's experiments (issue 7) in one GPU call, from nothing.

Groups (configs/ holds every config; all runs of a group share data order, seed and token budget):
  table1     MHA, GQA-4, MLA kv256/kv64/kv16, EG-MLA kv256/kv64/kv16 (d_e = 512)
  ablations  EG-MLA kv64 without the norm, with `add` instead of `mul` (plus the full model for reference)
  de-sweep   EG-MLA kv64 with d_e in {64, 128, 256, 512, 1024, 2048}
  latent     EG-MLA kv64 with the gate on the latent, beside the paper's placement
  seeds      EG-MLA kv64 and MLA kv256 with seeds 1 and 2 (seed 0 is in table1)

    python experiments/paper_repro.py table1 --steps 800            # on the lent H100
    python experiments/paper_repro.py table1 --only mha,mla-kv256   # part of a group (calls are <= 10 min)
    python experiments/paper_repro.py table1 --scale cpu-pilot      # tiny shapes on a 2-core CPU (~3-4 min a run)
    python experiments/paper_repro.py latent --scale cpu-pilot --steps 4   # CPU smoke test

Scales: `paper-base` runs the configs as written (paper-base shapes, bf16, torch.compile: a GPU);
`cpu-pilot` runs the same configs at the `tiny` preset's shapes with a CPU-sized budget (SCALES below), with
d_e = 512 wherever a config does not set gate_dim. A pilot is a check of the pipeline and a first, small-scale
look at the trends, not the paper-base reproduction.

A run whose full config (model, train, data) equals one already finished in --work is not trained again:
its row and metrics are reused (the full EG-MLA kv64 model appears in every group).

Writes to --out (default repro_out/): <group>.json (the compare rows, every run's config and its validation
records from metrics.jsonl: what experiments/report.py reads; the per-step log stays in --work), <group>.png (validation loss vs KV elements/token) and <group>-curves.png (validation loss vs tokens); with
--only, <group>.part-<names>.json etc., which experiments/report.py merges with the other parts.
Checkpoints stay in --work. The python-source corpus and its tokenizer are built inside the call.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
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
SCALES = {
    "paper-base": [],
    # tiny shapes (4 layers, d_model 256, 4 heads, vocab 8192), 1,024-token batches (fp32 on a CPU: ~0.5 s a step)
    "cpu-pilot": ["model.preset=tiny", "train.batch_size=8", "train.micro_batch_size=8", "train.seq_len=128",
                  "train.compile=false", "train.lr=2e-3", "train.warmup_steps=30",
                  "train.eval_every=100", "train.eval_sequences=128", "train.log_every=20",
                  "data.max_bytes=24_000_000", "data.tokenizer_sample_bytes=8_000_000"],
}
# Model fields a scale changes where the config file leaves them to the preset (or would not fit the
# scale's shape): the tiny preset's own d_e is 256 (Table 1 uses 512), and tiny has 4 heads, so GQA-4 would
# be MHA there: the pilot keeps GQA a KV-head reduction with 2 KV heads.
SCALE_MODEL = {"cpu-pilot": {"gate_dim": 512, "gqa4.n_kv_heads": 2}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("group", choices=sorted(GROUPS))
    parser.add_argument("--scale", choices=sorted(SCALES), default="paper-base",
                        help="paper-base: configs as written (GPU); cpu-pilot: tiny shapes, CPU budget")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run, the token budget (default: 800 at paper-base, 400 cpu-pilot)")
    parser.add_argument("--only", default="", help="comma-separated subset of the group's configs")
    parser.add_argument("--seeds", default="1,2", help="seeds for the 'seeds' group")
    parser.add_argument("--out", default="repro_out", help="results folder (the group files)")
    parser.add_argument("--work", default="/tmp/egmla-repro")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--preset-override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="like --set, for smoke tests at other shapes")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build the tokenizer and token shards in --work and stop (several processes, one "
                             "per GPU, can then share them: experiments/on_gpus.sh)")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]

    from egmla.runs import atomic_write_json
    from egmla.train.compare import format_table, load_runs, plot_comparison
    from egmla.train.trainer import train
    from report import plot_curves

    names = GROUPS[args.group]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    configs = [str(ROOT / "configs" / f"{name}.toml") for name in names]
    if args.steps is None:
        args.steps = 400 if args.scale == "cpu-pilot" else 800
    overrides = [f"train.steps={args.steps}", "train.checkpoint_every=0", "train.keep_checkpoints=1",
                 f"data.cache_dir={Path(args.work) / 'cache'}", *SCALES[args.scale], *args.preset_override,
                 *args.overrides]
    plan = []
    seeds = [int(s) for s in args.seeds.split(",")] if args.group == "seeds" else [None]
    for seed in seeds:
        extra = [f"train.seed={seed}"] if seed is not None else []
        for (label, run), path in zip(load_runs(configs, "paper-base", overrides + extra), configs):
            run = with_scale_model(run, path, SCALE_MODEL.get(args.scale, {}))
            plan.append((f"{label}-seed{run.train.seed}", run))
    if args.prepare_only:
        from egmla.data import prepare_data

        corpora = {(json.dumps(dataclasses.asdict(run.data), sort_keys=True, default=str), run.model.vocab_size): run
                   for _, run in plan}
        for run in corpora.values():  # cached: the runs that follow find them ready
            prepare_data(run.data, run.model.vocab_size)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # a part of a group gets its own file (GROUP.part-NAME_NAME.json: names the device tool brings back); experiments/report.py merges the parts
    stem = args.group + (f".part-{'_'.join(names)}" if args.only else "")
    started = time.perf_counter()
    rows, curves, configs = [], {}, {}
    for label, run in plan:
        key = hashlib.sha256(json.dumps(dataclasses.asdict(run) | {"name": ""}, sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
        done = Path(args.work) / "done" / f"{label}-{key}.json"
        if done.is_file():
            print(f"=== {label}: same config already trained in {args.work}; reusing its results ===", flush=True)
            finished = json.loads(done.read_text())
        else:
            print(f"=== {label}: {run.model.variant_name()}, {run.train.steps} steps ===", flush=True)
            run_dir = Path(args.work) / "runs" / f"{label}-{key}"
            summary = train(run, run_dir, progress=False)
            row = {k: summary[k] for k in ("name", "variant", "params", "params_without_gate_tables",
                                           "kv_elements_per_token", "final_val_loss", "tokens_per_s",
                                           "train_wall_s")}
            row.update(name=label, seed=run.train.seed, scale=args.scale, device=summary.get("device", ""),
                       gate_dim=run.model.gate_dim if run.model.attention == "eg-mla" else None,
                       tokens=run.train.steps * run.train.batch_size * run.train.seq_len)
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            finished = {"row": row, "metrics": metrics, "config": dataclasses.asdict(run)}
            atomic_write_json(done, finished)
        rows.append(finished["row"])
        curves[label] = validation_records(finished["metrics"])
        configs[label] = finished["config"]
        atomic_write_json(out / f"{stem}.json", {"group": args.group, "scale": args.scale, "rows": rows,
                                                 "metrics": curves, "configs": configs,
                                                 "wall_s": time.perf_counter() - started, "command": " ".join(sys.argv)})
    print("\n" + format_table(rows))
    plot_comparison(rows, out / f"{stem}.png", f"{args.group}: validation loss vs KV cache")
    plot_curves({"rows": rows, "metrics": curves}, out / f"{stem}-curves.png",
                f"{args.group}: validation loss vs tokens")
    return 0


def validation_records(records: list[dict]) -> list[dict]:
    """What a group file keeps of a run's metrics.jsonl: the validation records (the loss curve; the last one
    is the run's last step). The per-step training log, 50-100x larger, stays in the run directory."""
    return [r for r in records if r.get("kind") == "val"]


def with_scale_model(run, config_path: str, changes: dict):
    """Apply a scale's model changes: 'field' for every config whose variant (egmla.variants) leaves the field
    to the preset (gate_dim for EG-MLA only), 'config.field' for that config alone."""
    from egmla.variants import variant

    name, values = Path(config_path).stem, {}
    written = variant(name).overrides
    for key, value in changes.items():
        if "." in key:
            config, field = key.split(".", 1)
            if config == name:
                values[field] = value
        elif key not in written and (key != "gate_dim" or run.model.attention == "eg-mla"):
            values[key] = value
    if not values:
        return run
    return dataclasses.replace(run, model=dataclasses.replace(run.model, **values))


if __name__ == "__main__":
    sys.exit(main())
