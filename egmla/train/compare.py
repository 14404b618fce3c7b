"""`egmla compare CONFIG...`: train several attention variants on the same data, seed(s) and token budget,
then print a table (parameters with and without gate tables, KV elements/token, final validation loss,
tokens/s) and plot validation loss against KV-cache size and against tokens trained.

A CONFIG is a TOML file (configs/*.toml) or a variant name (mha, gqa4, mla-kv64, egmla-kv64, ...;
see egmla.variants) applied to --preset. The [train] and [data] sections of the first config
(plus --set) are used for every run, so the comparison is fair by construction.

--seeds 0,1,2 trains every config once per seed (train.seed: initialisation and data order) and reports the mean
and spread of the final validation loss, and each config's paired difference to the first (same seed, same data
order) with a paired t-test: one seed cannot tell a difference from noise at small budgets.

The comparison resumes: run the same command with the same --out again after a crash or Ctrl-C (which stops the
whole comparison, with a checkpoint) and finished runs are reused, an interrupted one continues from its checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from egmla.variants import VARIANTS

    parser.add_argument("configs", nargs="+", metavar="CONFIG",
                        help=f"TOML files or variant names ({', '.join(VARIANTS)})")
    parser.add_argument("--preset", default="tiny", help="model preset for variant names (tiny, paper-base, paper-1b)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override applied to every run, e.g. --set train.steps=200 (model.* keys too)")
    parser.add_argument("--seeds", metavar="N,...",
                        help="train every config once per seed (train.seed), e.g. 0,1,2: the table gives the mean "
                             "and sd of the final validation loss and a paired t-test against the first config "
                             "(default: the config's one seed)")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default runs/compare-<timestamp>); run the same command with the same "
                             "--out again to resume an interrupted comparison: finished runs are reused")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_runs(configs: list[str], base_preset: str, overrides: list[str]):
    """[(label, RunConfig)]: each config's model, the first one's train and data sections."""
    from egmla.configfile import load_toml, merge, parse_overrides
    from egmla.train.config import RunConfig
    from egmla.variants import VARIANTS, variant_config

    extra = parse_overrides(overrides)
    runs, shared = [], None
    for spec in configs:
        if spec.endswith(".toml"):
            if not Path(spec).is_file():  # load_toml's message names --config, an option compare does not have
                raise ValueError(f"CONFIG {spec!r}: no such file; see configs/ for examples")
            values = load_toml(spec, overrides)
            label = Path(spec).stem
        elif spec in VARIANTS:
            model = variant_config(spec, base_preset, **extra.get("model", {})).to_dict()
            values = merge({"model": model}, {k: v for k, v in extra.items() if k != "model"})
            label = spec
        else:
            raise ValueError(f"CONFIG {spec!r}: neither a .toml file nor a variant name; variants: "
                             f"{', '.join(VARIANTS)}")
        if shared is None:
            shared = {"train": values.get("train", {}), "data": values.get("data", {})}
        values = {**values, **shared, "name": label}
        runs.append((label, RunConfig.from_dict(values)))
    labels = [label for label, _ in runs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"CONFIG {repeated[0]!r} is given twice: each config trains into --out/{repeated[0]}; "
                         f"give it once (--seeds repeats a config over seeds)")
    vocab = {run.model.vocab_size for _, run in runs}
    if len(vocab) > 1:
        raise ValueError(f"model.vocab_size differs between configs ({sorted(vocab)}): a fair comparison needs "
                         f"one tokenizer; set --set model.vocab_size=N")
    return runs


def run_folder(out: Path, label: str, seed: int, several_seeds: bool) -> Path:
    return out / label / f"seed-{seed}" if several_seeds else out / label


# train.* settings that change how a run runs (memory, speed, logging), not what it computes beyond rounding: a
# comparison resumes under other values of them (e.g. with activation checkpointing after running out of memory)
HOW_IT_RUNS = {"activation_checkpointing", "loss_chunk_tokens", "compile", "compile_mode", "log_every", "tensorboard",
               "checkpoint_every", "keep_checkpoints", "profile_steps"}


def finished_summary(run_dir: Path, run) -> dict | None:
    """The summary of a finished run of exactly this config in run_dir, None if there is none to reuse yet (nothing
    there, or a run that stopped early: the caller resumes it). A run of another config there is an error."""
    if not (run_dir / "config.json").is_file():
        return None
    stored, wanted = stored_config(run_dir), json.loads(json.dumps(run.to_dict()))  # tuples as JSON lists
    differs = [f"{section}.{key}" for section in ("model", "train", "data")
               for key in sorted(set(stored.get(section, {})) | set(wanted[section]))
               if stored.get(section, {}).get(key) != wanted[section].get(key)
               and not (section == "train" and key in HOW_IT_RUNS)]
    if differs:
        raise ValueError(f"--out: {run_dir} holds a run of another config ({', '.join(differs[:4])} differ"
                         f"{' ...' if len(differs) > 4 else ''}); give a new --out for a new comparison")
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("stop_reason") != "interrupted":  # finished, or ended by its train.time_limit_s
            return summary
    return None


def stored_config(run_dir: Path) -> dict:
    """The run's config.json as this egmla reads it: a field added since the run was written takes its default (which
    keeps the older behaviour), as `egmla train --resume` takes it, so that an upgrade does not make every comparison
    folder "another config"."""
    from egmla.runs import read_run_config
    from egmla.train.config import RunConfig

    try:
        return json.loads(json.dumps(RunConfig.from_dict(read_run_config(run_dir)).to_dict()))
    except ValueError as err:  # a field this egmla lacks: written by a newer (or much older) egmla
        raise ValueError(f"--out: {run_dir / 'config.json'} does not fit this egmla ({err}); resume it with the egmla "
                         f"version that wrote it, or give a new --out") from None


def train_or_reuse(run, run_dir: Path, progress: bool) -> tuple[dict, str]:
    """(summary, what happened: 'reused' | 'resumed' | 'trained')."""
    from egmla.runs import list_checkpoints
    from egmla.train.trainer import train

    summary = finished_summary(run_dir, run)
    if summary is not None:
        return summary, "reused"
    resume = bool(list_checkpoints(run_dir)) if run_dir.is_dir() else False
    return train(run, run_dir, resume=resume, progress=progress), "resumed" if resume else "trained"


def no_final_loss(run_dir: Path, summary: dict, out: Path) -> str:
    """The error for a run without a final validation loss (a run its time limit stopped, by an egmla that did not
    validate there): the table has nothing to show for it."""
    return (f"{run_dir / 'summary.json'}: no final validation loss (the run stopped at step {summary.get('steps')}: "
            f"{summary.get('stop_reason') or 'finished'}; an older egmla did not validate where the time limit "
            f"stopped a run); remove {run_dir} and run the same command with --out {out} again to train it anew, or "
            f"give a new --out")


def validation_curve(run_dir: Path, tokens_per_step: int) -> list[tuple[float, float]]:
    """[(tokens trained, validation loss)] from a run's metrics.jsonl."""
    from egmla.train.metrics import read_metrics

    return [(record["step"] * tokens_per_step, record["val_loss"])
            for record in read_metrics(run_dir / "metrics.jsonl") if record.get("kind") == "val"]


def summarise(label: str, summaries: dict[int, dict], first: dict[int, dict] | None) -> dict:
    """One config's row: its first summary's fields, the final validation loss per seed, their mean and sd, and
    the paired difference to the first config over the seeds both have."""
    from egmla.stats import paired_t_test, sample_sd

    any_summary = next(iter(summaries.values()))
    losses = {seed: s["final_val_loss"] for seed, s in summaries.items()}
    speeds = [s["tokens_per_s"] for s in summaries.values() if s.get("tokens_per_s")]
    row = {key: any_summary[key] for key in ("variant", "params", "params_without_gate_tables",
                                             "kv_elements_per_token")}
    row.update(name=label, seeds=sorted(losses), final_val_losses=[losses[s] for s in sorted(losses)],
               final_val_loss=statistics.mean(losses.values()),
               final_val_loss_sd=sample_sd(losses.values()) if len(losses) > 1 else None,
               tokens_per_s=statistics.median(speeds) if speeds else None)
    if first is not None:
        shared = sorted(set(losses) & set(first))
        row["vs_first"] = paired_t_test([losses[s] - first[s]["final_val_loss"] for s in shared]) if shared else None
    return row


def format_table(rows: list[dict]) -> str:
    """The comparison's table; rows of one run each (a run's summary, as experiments/paper_repro.py passes) too."""
    several = any(len(r.get("seeds", ())) > 1 for r in rows)
    header = (f"{'config':<22} {'variant':<26} {'params (M)':>10} {'w/o gate (M)':>12} {'KV elem/token':>13} "
              f"{'val loss':>{17 if several else 9}}" + (f" {'vs first':>9} {'p':>6}" if several else "")
              + f" {'tokens/s':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        loss = f"{r['final_val_loss']:.4f}"
        if several:
            loss += f" ± {r['final_val_loss_sd']:.4f}" if r.get("final_val_loss_sd") is not None else " (1 seed)"
        line = (f"{r['name']:<22} {r['variant']:<26} {r['params'] / 1e6:>10.2f} "
                f"{r['params_without_gate_tables'] / 1e6:>12.2f} {r['kv_elements_per_token']:>13,} "
                f"{loss:>{17 if several else 9}}")
        if several:
            test = r.get("vs_first")
            difference = f"{test['mean']:+.4f}" if test else "-"
            p = f"{test['p']:.3f}" if test and test["p"] is not None else "-"
            line += f" {difference:>9} {p:>6}"
        speed = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        lines.append(line + f" {speed:>10}")
    if several:
        lines.append(f"val loss: mean ± sd over seeds; vs first: mean paired difference to {rows[0]['name']} (same "
                     f"seed, same data order), p: two-sided paired t-test")
    return "\n".join(lines)


def plot_comparison(rows: list[dict], path: Path, title: str,
                    curves: dict[str, dict[int, list]] | None = None) -> Path | None:
    """Final validation loss against KV-cache size (± sd over seeds) and, given each row's validation curves per seed,
    a second panel of validation loss against tokens trained (each seed thin, the mean over seeds thick)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if curves:
        fig, (by_cache, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    else:
        fig, by_cache = plt.subplots(figsize=(7, 4.5), dpi=120)
    for index, r in enumerate(rows):
        color = f"C{index % 10}"
        if r["final_val_loss"] is not None:
            marker = "o" if "EG-MLA" in r["variant"] else ("s" if "MLA" in r["variant"] else "^")
            by_cache.errorbar(r["kv_elements_per_token"], r["final_val_loss"], yerr=r.get("final_val_loss_sd") or 0,
                              marker=marker, color=color, capsize=3, markersize=6)
            by_cache.annotate(r["name"], (r["kv_elements_per_token"], r["final_val_loss"]), fontsize=8,
                              xytext=(4, 4), textcoords="offset points")
        if curves:
            plot_curves(by_tokens, curves.get(r["name"], {}), color, r["name"])
    by_cache.set_xscale("log")
    by_cache.set_xlabel("KV-cache elements per token (all layers)")
    by_cache.set_ylabel("final validation loss (nats/token)")
    by_cache.grid(alpha=0.3, which="both")
    if curves:
        by_tokens.set_xlabel("tokens trained")
        by_tokens.set_ylabel("validation loss (nats/token)")
        by_tokens.legend(fontsize=8)
        by_tokens.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(ax, seeds: dict[int, list[tuple[float, float]]], color: str, label: str) -> None:
    """One config's validation curves: each seed thin, the mean over seeds (at the points all share) thick."""
    for curve in seeds.values():
        if curve:
            ax.plot(*zip(*curve), color=color, alpha=0.3, linewidth=0.8)
    common = min((len(c) for c in seeds.values()), default=0)
    if common:
        tokens = [point[0] for point in next(iter(seeds.values()))[:common]]
        mean = [statistics.mean(c[i][1] for c in seeds.values()) for i in range(common)]
        # a marker per evaluation: a short run has one, which a line alone does not draw
        ax.plot(tokens, mean, color=color, linewidth=2, marker="o", markersize=3, label=label)


def main(args) -> int:
    from egmla.runs import atomic_write_json

    runs = load_runs(args.configs, args.preset, args.overrides)
    from egmla.configfile import int_list

    first = runs[0][1]
    seeds = int_list(args.seeds, "--seeds", 0, True, "0,1,2") if args.seeds is not None else [first.train.seed]
    several = len(seeds) > 1
    out = Path(args.out) if args.out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():  # else the first run reports it as its --run-dir
        raise ValueError(f"--out {str(out)!r}: a file; give a folder (new, or a comparison's to resume it)")
    tokens_per_step = first.train.batch_size * first.train.seq_len
    budget = first.train.steps * tokens_per_step
    print(f"comparing {len(runs)} configs on corpus {first.data.corpus!r}, seed{'s' if several else ''} "
          f"{','.join(map(str, seeds))}, {budget:,} training tokens each; output in {out}")
    summaries: dict[str, dict[int, dict]] = {}
    curves: dict[str, dict[int, list]] = {}
    for seed in seeds:  # seed-major: a comparison stopped early has every config at the seeds it reached
        for label, run in runs:
            run = dataclasses.replace(run, train=dataclasses.replace(run.train, seed=seed))
            run_dir = run_folder(out, label, seed, several)
            print(f"\n=== {label}: {run.model.variant_name()}, seed {seed} ===")
            summary, how = train_or_reuse(run, run_dir, progress=not args.no_progress)
            if summary.get("stop_reason") != "interrupted" and summary.get("final_val_loss") is None:
                raise ValueError(no_final_loss(run_dir, summary, out))
            if how == "reused":
                print(f"reused the finished run in {run_dir} (validation loss {summary['final_val_loss']:.4f})")
            if summary.get("stop_reason") == "interrupted":  # Ctrl-C / SIGTERM: stop the comparison, not one run
                print(f"\nstopped in {run_dir}; run the same command with --out {out} to continue: finished runs are "
                      f"reused, this one resumes from its checkpoint")
                return 130
            summaries.setdefault(label, {})[seed] = summary
            curves.setdefault(label, {})[seed] = validation_curve(run_dir, tokens_per_step)
    rows = [summarise(label, summaries[label], summaries[runs[0][0]] if index else None)
            for index, (label, _) in enumerate(runs)]
    table = format_table(rows)
    print("\n" + table)
    atomic_write_json(out / "compare.json", {"rows": rows, "tokens_per_run": budget, "corpus": first.data.corpus,
                                             "seeds": seeds})
    (out / "compare.md").write_text("```\n" + table + "\n```\n")
    plot = plot_comparison(rows, out / "compare.png",
                           f"{budget:,} tokens per run" + (f", seeds {','.join(map(str, seeds))}" if several else ""),
                           curves)
    print(f"\nwrote {out / 'compare.json'}" + (f" and {plot}" if plot else ""))
    return 0
