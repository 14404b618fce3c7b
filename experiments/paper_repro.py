"""Reproduce one group of the paper's experiments (issue 7) in one GPU call, from nothing.

Groups (configs/ holds every config; all runs of a group share data order, seed and token budget):
  table1     MHA, GQA-4, MLA kv256/kv64/kv16, EG-MLA kv256/kv64/kv16 (d_e = 512)
  ablations  EG-MLA kv64 without the norm, with `add` instead of `mul` (plus the full model for reference)
  de-sweep   EG-MLA kv64 with d_e in {64, 128, 256, 512, 1024, 2048}
  latent     EG-MLA kv64 with the gate on the latent, beside the paper's placement
  seeds      EG-MLA kv64 and MLA kv256 with seeds 1 and 2 (seed 0 is in table1)
  longer     issue 18: EG-MLA kv64, MLA kv256 and MHA at 2,000 steps (131 M tokens), the controls of
             EG-MLA kv64 (egmla-kv64-bias: the table without a gate; egmla-kv64-identity: the gate started
             at 1; egmla-kv64-bias-v: the table on V alone) and `add`, on whole files held out
             (data.split = "document"); PLANS gives the seeds and order

    python experiments/paper_repro.py table1 --steps 800            # on one H100
    python experiments/paper_repro.py table1 --only mha,mla-kv256   # part of a group (calls are <= 10 min)
    python experiments/paper_repro.py table1 --scale cpu-pilot      # tiny shapes on a 2-core CPU (~3-4 min a run)
    python experiments/paper_repro.py latent --scale cpu-pilot --steps 4   # CPU smoke test
    python experiments/paper_repro.py longer --time-limit-s 550 --records experiments/results/longer-budget

Scales: `paper-base` runs the configs as written (paper-base shapes, bf16, torch.compile: a GPU);
`cpu-pilot` runs the same configs at the `tiny` preset's shapes with a CPU-sized budget (SCALES below), with
d_e = 512 wherever a config does not set gate_dim. A pilot is a check of the pipeline and a first, small-scale
look at the trends, not the paper-base reproduction.

A run whose full config (model, train, data) equals one already finished in --work is not trained again:
its row and metrics are reused (the full EG-MLA kv64 model appears in every group); with --records, neither is
one already recorded in that folder's group files (committed results: a fresh machine skips them too).
The python-source corpus is the machine's installed Python files, so two machines can build different
corpora: every record keeps what identifies its data (training and validation tokens, `corpus_id`), and
experiments/claims.py pairs runs only on the same corpus; --retrain-other-corpora trains a run recorded on
another corpus again on this machine's, as RUN-c<corpus id>.

Runs longer than a call: --time-limit-s bounds this invocation. A run that would go past it stops at a
checkpoint in --work, and the same command with the same --work resumes it (exactly: the data position and
random state are in the checkpoint); the command exits with status 3 while runs are left, 0 when none are.
Several processes may share one --work (experiments/on_gpus.sh, one per GPU): each takes the next run of
the plan that no other holds, so the same command on every GPU splits the plan between them.

Writes to --out (default repro_out/): <group>.json (the compare rows, every run's config and its validation
records from metrics.jsonl: what experiments/report.py reads; the per-step log stays in --work), <group>.png (validation loss vs KV elements/token) and <group>-curves.png (validation loss vs tokens); with
--only, <group>.part-<names>.json etc., which experiments/report.py merges with the other parts. A group of
PLANS writes one file per finished run, <group>.part-<run>.json, and no plots (report.py draws them).
Checkpoints stay in --work. The python-source corpus and its tokenizer are built inside the call.
"""
from __future__ import annotations

import argparse
import contextlib
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
    "longer": ["egmla-kv64", "mla-kv256", "mha", "egmla-kv64-bias", "egmla-kv64-identity", "egmla-kv64-bias-v",
               "egmla-kv64-add"],
}
# A group's runs as (config, seed) in the order they are trained; a group not here trains its configs at seed 0
# (`seeds`: at --seeds). `longer`: first what issue 18's three claims need (the key pair, the same-table control
# and MHA at seeds 0 and 1), then the identity start (seeds 0 and 1), then what it would like (`add` beside the
# identity start, a third seed of the pair). The first seven ran in this order except MHA: seed 0 came after the
# others' seed 1; MHA seed 1 now comes before the identity start, which no claim of the issue needs. After the
# identity start: the table on V alone (egmla-kv64-bias-v), beside the same-table control; last, the third seed of
# that pair (added 2026-12-06: `--only egmla-kv64-bias-v,egmla-kv64-bias --seeds 2` trained nothing before), then
# `add` at seed 2, beside EG-MLA kv64 seed 2 on the same corpus (the H100 image's corpus holds that pair's seed 2),
# and the identity start's seed 2 on that corpus (against `add` and a third seed against EG-MLA kv64); last, MHA
# seed 2 (added 2026-12-06 like the rest: MLA kv256 and MHA at seed 2 on that corpus give the first two claims a
# third seed; MLA kv256 seed 2 was already in the plan). Seed 3 (added 2026-12-06): the paper's pair first, then
# MHA and the V table. A seed named by --seeds that the plan lacks is trained too, after the plan's runs.
PLANS = {
    "longer": [("egmla-kv64", 0), ("mla-kv256", 0), ("egmla-kv64-bias", 0), ("mha", 0),
               ("egmla-kv64", 1), ("mla-kv256", 1), ("egmla-kv64-bias", 1), ("mha", 1),
               ("egmla-kv64-identity", 0), ("egmla-kv64-identity", 1),
               ("egmla-kv64-bias-v", 0), ("egmla-kv64-bias-v", 1),
               ("egmla-kv64-add", 0), ("egmla-kv64", 2), ("mla-kv256", 2), ("egmla-kv64-add", 1),
               ("egmla-kv64-bias-v", 2), ("egmla-kv64-bias", 2), ("egmla-kv64-add", 2),
               ("egmla-kv64-identity", 2), ("mha", 2),
               ("egmla-kv64", 3), ("mla-kv256", 3), ("mha", 3), ("egmla-kv64-bias-v", 3), ("egmla-kv64-bias", 3),
               ("egmla-kv64-identity", 3), ("egmla-kv64-add", 3)],
}
# Settings of every run of a group, before the scale's and --set. `longer` holds out whole files, reads the
# whole installation (the H200 image has ~397 MB of .py: 600 MB is no cap there, the old 300 MB was) and
# validates every 100 steps (6.6 M tokens at paper-base).
GROUP_SETTINGS = {"longer": ["data.split=document", "data.max_bytes=600_000_000", "train.eval_every=100"]}
DEFAULT_STEPS = {"paper-base": {"longer": 2000}}  # else 800 at paper-base, 400 at cpu-pilot
STOP_MARGIN_S = 60  # of a time-limited call, kept for building the model, the last validation, the checkpoint
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("group", choices=sorted(GROUPS))
    parser.add_argument("--scale", choices=sorted(SCALES), default="paper-base",
                        help="paper-base: configs as written (GPU); cpu-pilot: tiny shapes, CPU budget")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run, the token budget (default: 800 at paper-base, 2,000 for "
                             "longer; 400 at cpu-pilot)")
    parser.add_argument("--only", default="", help="comma-separated subset of the group's configs")
    parser.add_argument("--seeds", default=None, help="seeds for the 'seeds' group (default 1,2); for a group of "
                                                      "PLANS, the plan's runs of these seeds only")
    parser.add_argument("--out", default="repro_out", help="results folder (the group files)")
    parser.add_argument("--work", default="/tmp/egmla-repro",
                        help="working folder: the corpus's tokenizer and token shards, every run's directory and "
                             "checkpoints (the same --work resumes a run a time limit stopped)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field of every run, after the group's and the scale's settings, "
                             "e.g. --set train.compile_mode=default (repeatable)")
    parser.add_argument("--preset-override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="like --set, for smoke tests at other shapes")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build the tokenizer and token shards in --work and stop (several processes, one "
                             "per GPU, can then share them: experiments/on_gpus.sh)")
    parser.add_argument("--time-limit-s", type=float, default=0,
                        help="wall-clock budget of this call (0 = none): a run that would outlast it stops at a "
                             "checkpoint that the same command resumes; exit status 3 while runs are left")
    parser.add_argument("--min-run-s", type=float, default=120,
                        help="with --time-limit-s: start or resume no run with less than this left")
    parser.add_argument("--records", type=Path, default=None,
                        help="skip the runs already recorded in this folder's group files "
                             "(e.g. experiments/results/longer-budget)")
    parser.add_argument("--retrain-other-corpora", action="store_true",
                        help="with --records: train a recorded run again when this machine's corpus differs from "
                             "the one it was recorded on (python-source is the machine's installed Python files); "
                             "the new record gets the suffix -c<corpus id> and pairs only with runs of its corpus. "
                             "Without it such a run is skipped with a warning")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]

    from egmla.runs import atomic_write_json
    from egmla.train.compare import format_table, plot_comparison
    from report import plot_curves

    plan = runs_of(args)
    if args.prepare_only:
        from egmla.data import prepare_data

        corpora = {(json.dumps(dataclasses.asdict(run.data), sort_keys=True, default=str), run.model.vocab_size): run
                   for _, run in plan}
        for run in corpora.values():  # cached: the runs that follow find them ready
            prepare_data(run.data, run.model.vocab_size)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = started + args.time_limit_s if args.time_limit_s else None
    recorded = recorded_runs(args.records) if args.records else {}
    files: dict[str, dict] = {}  # stem -> what goes into out/STEM.json
    busy, stopped = [], None
    for label, run in plan:
        key = run_key(dataclasses.asdict(run))
        if (label, key) in recorded:
            here, there = corpus_of(run), recorded[label, key]
            if any(same_corpus(here, corpus) for corpus in there):
                print(f"=== {label}: already recorded in {args.records}; skipped ===", flush=True)
                continue
            if not args.retrain_other_corpora:
                print(f"=== {label}: recorded in {args.records} on another corpus than this machine's "
                      f"({here['train_split_tokens']} training tokens here); skipped: --retrain-other-corpora "
                      f"trains it again on this one ===", flush=True)
                continue
            # recorded on other builds of the corpus only (python-source is the machine's installed files): trained
            # again on this one under its own name, so that runs pair only with runs of the same data
            print(f"=== {label}: recorded on other corpora only ("
                  f"{', '.join(str(c.get('train_split_tokens', '?')) for c in there)} training tokens, here "
                  f"{here['train_split_tokens']}); trained again as {label}-c{here['corpus_id'][:6]} ===", flush=True)
            label = f"{label}-c{here['corpus_id'][:6]}"
        finished = train_or_reuse(label, run, args, deadline)
        if finished == "busy":
            busy.append(label)
            continue
        if finished == "stopped":
            stopped = label
            break
        stem = file_stem(args, label)
        part = files.setdefault(stem, {"group": args.group, "scale": args.scale, "rows": [], "metrics": {},
                                       "configs": {}})
        part["rows"].append(finished["row"])
        part["metrics"][label] = validation_records(finished["metrics"])
        part["configs"][label] = finished["config"]
        atomic_write_json(out / f"{stem}.json", {**part, "wall_s": time.monotonic() - started,
                                                 "command": " ".join(sys.argv)})
    rows = [row for part in files.values() for row in part["rows"]]
    if rows:
        print("\n" + format_table(rows))
    if rows and args.group not in PLANS:
        stem, = files
        plot_comparison(rows, out / f"{stem}.png", f"{args.group}: validation loss vs KV cache")
        plot_curves(files[stem], out / f"{stem}-curves.png", f"{args.group}: validation loss vs tokens")
    if busy:
        print(f"left to the other processes sharing {args.work}: {', '.join(busy)}", flush=True)
    if stopped:
        print(f"time limit: runs from {stopped} on are not finished; the same command with --work {args.work} "
              f"continues them", flush=True)
        return 3
    return 0


def runs_of(args) -> list[tuple[str, object]]:
    """(label, RunConfig) of every run the arguments name, in the order they are trained."""
    from egmla.train.compare import load_runs

    if args.steps is None:
        args.steps = DEFAULT_STEPS.get(args.scale, {}).get(args.group, 400 if args.scale == "cpu-pilot" else 800)
    overrides = [f"train.steps={args.steps}", "train.checkpoint_every=0", "train.keep_checkpoints=1",
                 f"data.cache_dir={Path(args.work) / 'cache'}", *GROUP_SETTINGS.get(args.group, []),
                 *SCALES[args.scale], *args.preset_override, *args.overrides]
    only = set(args.only.split(",")) if args.only else set(GROUPS[args.group])
    if args.group in PLANS:
        seeds = {int(s) for s in args.seeds.split(",")} if args.seeds else None
        wanted = [(name, seed) for name, seed in PLANS[args.group] if name in only and (seeds is None or seed in seeds)]
        # seeds asked for by name that the plan does not hold yet (e.g. what `claims.py --missing` asks for next):
        # trained after the planned ones, in the group's order (before 2026-12-06 they trained nothing, silently)
        wanted += [(name, seed) for seed in sorted(seeds or ()) for name in GROUPS[args.group]
                   if name in only and (name, seed) not in wanted]
    else:
        seeds = [int(s) for s in (args.seeds or "1,2").split(",")] if args.group == "seeds" else [None]
        wanted = [(name, seed) for seed in seeds for name in GROUPS[args.group] if name in only]
    plan = []
    for name, seed in wanted:
        path = str(ROOT / "configs" / f"{name}.toml")
        extra = [f"train.seed={seed}"] if seed is not None else []
        (label, run), = load_runs([path], "paper-base", overrides + extra)
        run = with_scale_model(run, path, SCALE_MODEL.get(args.scale, {}))
        plan.append((f"{label}-seed{run.train.seed}", run))
    return plan


def file_stem(args, label: str) -> str:
    """The --out file a run's record goes to: the group's (GROUP.json), a part of it (GROUP.part-NAME_NAME.json,
    with --only: names that tell the parts apart when several calls write them), or for a group of PLANS its own
    (GROUP.part-RUN.json, so that processes sharing the plan never write one file). experiments/report.py merges
    the parts."""
    if args.group in PLANS:
        return f"{args.group}.part-{label}"
    names = [n for n in GROUPS[args.group] if n in args.only.split(",")] if args.only else []
    return args.group + (f".part-{'_'.join(names)}" if names else "")


def run_key(config: dict) -> str:
    """What identifies a run: its whole config (new fields at their defaults, so an older record keys the
    same) but its name, where its caches go, the time limit of the call that trained it and its compile mode
    (how fast the same math runs: records from before the CUDA-graph default key as the runs planned now)."""
    from egmla.train.config import RunConfig

    values = RunConfig.from_dict(json.loads(json.dumps(config, default=str))).to_dict()
    values["name"], values["data"]["cache_dir"], values["train"]["time_limit_s"] = "", "", 0.0
    values["train"]["compile_mode"] = ""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def recorded_runs(folder: Path) -> dict[tuple[str, str], list[dict]]:
    """{(label, run_key): the corpora it was recorded on} for every run whose config a group file in `folder`
    records (a corpus: `corpus_fields` of the record's row; older rows have the training tokens or nothing)."""
    found: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(Path(folder).glob("*.json")):
        group = json.loads(path.read_text())
        rows = {row["name"]: row for row in group.get("rows", [])}
        for label, config in group.get("configs", {}).items():
            found.setdefault((run_name(label), run_key(config)), []).append(corpus_fields(rows.get(label, {})))
    return found


def run_name(label: str) -> str:
    """A run's label without the corpus suffix a rerun on another corpus gets ('mha-seed1-c0a1b2c' -> 'mha-seed1')."""
    head, _, tail = label.rpartition("-c")
    return head if head and "-seed" in head and len(tail) == 6 and all(ch in "0123456789abcdef" for ch in tail) \
        else label


def corpus_fields(row: dict) -> dict:
    """What identifies the data a record's run read: training and validation tokens and the corpus id (a hash
    of those and the tokenizer), where the record has them."""
    return {k: row[k] for k in ("train_split_tokens", "val_split_tokens", "corpus_id") if row.get(k) is not None}


def same_corpus(a: dict, b: dict) -> bool:
    """Whether two runs read the same data, by what both records say. Records that say nothing (the older groups,
    each run in one or few calls) are assumed to share a corpus with each other, but never with one that says what
    it read: a run on another image would otherwise pair with them silently."""
    keys = ("train_split_tokens", "val_split_tokens", "corpus_id")
    if any(k in a for k in keys) != any(k in b for k in keys):
        return False
    shared = [k for k in keys if k in a and k in b]
    if any(k in a for k in keys) and not shared:  # both say what they read, in fields the other lacks: unknown
        return False
    return all(a[k] == b[k] for k in shared)


_CORPORA: dict[str, dict] = {}


def corpus_of(run) -> dict:
    """corpus_fields of the data `run` reads on this machine (prepared once per data config; cached on disk)."""
    from egmla.data import prepare_data

    key = json.dumps(dataclasses.asdict(run.data), sort_keys=True, default=str) + str(run.model.vocab_size)
    if key not in _CORPORA:
        _, shards = prepare_data(run.data, run.model.vocab_size, progress=False)
        _CORPORA[key] = corpus_identity(shards.meta)
    return _CORPORA[key]


def corpus_identity(meta: dict) -> dict:
    """corpus_fields from a token-shard folder's meta.json."""
    fields = {"train_split_tokens": meta["train_tokens"], "val_split_tokens": meta["val_tokens"]}
    text = json.dumps({**fields, "tokenizer": meta.get("tokenizer_sha256", "")}, sort_keys=True)
    return {**fields, "corpus_id": hashlib.sha256(text.encode()).hexdigest()[:12]}


def train_or_reuse(label: str, run, args, deadline: float | None) -> dict | str:
    """One run's record {"row", "metrics", "config"}: reused from --work if that config finished there, else
    trained (resumed from its checkpoint when an earlier call stopped it). 'busy' when another process holds
    the run, 'stopped' when the time limit came first (its checkpoint waits in --work)."""
    from egmla.data import prepare_data
    from egmla.runs import atomic_write_json, list_checkpoints
    from egmla.train.runlock import RunLock, RunLocked
    from egmla.train.trainer import train

    work, key = Path(args.work), run_key(dataclasses.asdict(run))
    done = work / "done" / f"{label}-{key}.json"
    with contextlib.ExitStack() as held:
        try:  # one process per run: the others move on to the next run of the plan
            held.enter_context(RunLock(work / "claims" / f"{label}-{key}"))
        except RunLocked:
            print(f"=== {label}: being trained by another process sharing {args.work}; next run ===", flush=True)
            return "busy"
        if done.is_file():
            print(f"=== {label}: same config already trained in {args.work}; reusing its results ===", flush=True)
            return json.loads(done.read_text())
        _, shards = prepare_data(run.data, run.model.vocab_size, progress=False)  # cached after the first run
        timed = run
        if deadline is not None:
            budget = deadline - time.monotonic() - STOP_MARGIN_S
            if budget < args.min_run_s:
                print(f"=== {label}: {max(0, budget):.0f} s left of --time-limit-s, under --min-run-s; not started ===",
                      flush=True)
                return "stopped"
            timed = dataclasses.replace(run, train=dataclasses.replace(run.train, time_limit_s=budget))
        run_dir = work / "runs" / f"{label}-{key}"
        resume = bool(list_checkpoints(run_dir))
        print(f"=== {label}: {run.model.variant_name()}, {run.train.steps} steps"
              + (" (resuming its checkpoint)" if resume else "") + " ===", flush=True)
        summary = train(timed, run_dir, resume=resume, progress=False)
        calls = json.loads((run_dir / "calls.json").read_text()) if (run_dir / "calls.json").is_file() else []
        calls.append({"steps": summary["steps"], "train_wall_s": summary["train_wall_s"]})
        atomic_write_json(run_dir / "calls.json", calls)
        if summary["steps"] < run.train.steps:
            print(f"=== {label}: stopped at step {summary['steps']} of {run.train.steps} ({summary['stop_reason']}); "
                  f"the same command resumes it ===", flush=True)
            return "stopped"
        finished = {"row": summary_row(label, run, args, summary, calls, corpus_identity(shards.meta)),
                    "metrics": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
                    "config": dataclasses.asdict(run)}
        atomic_write_json(done, finished)
        return finished


def summary_row(label: str, run, args, summary: dict, calls: list[dict], corpus: dict) -> dict:
    """A finished run's row in the group file: the trainer's summary, what it was, and what it read."""
    split_tokens = corpus["train_split_tokens"]
    row = {k: summary[k] for k in ("name", "variant", "params", "params_without_gate_tables",
                                   "kv_elements_per_token", "final_val_loss", "tokens_per_s")}
    tokens = run.train.steps * run.train.batch_size * run.train.seq_len
    row.update(name=label, seed=run.train.seed, scale=args.scale, device=summary.get("device", ""),
               gate_dim=run.model.gate_dim if run.model.attention == "eg-mla" else None, tokens=tokens,
               train_wall_s=sum(c["train_wall_s"] or 0 for c in calls), calls=len(calls), split=run.data.split,
               epochs=round(tokens / split_tokens, 3), **corpus)
    return row


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
