"""`egmla compare CONFIG...`: train several attention variants on the same data, seed and token budget,
then print a table (parameters with and without gate tables, KV elements/token, final validation loss,
tokens/s) and plot validation loss against KV-cache size.

A CONFIG is a TOML file (configs/*.toml) or a variant name (mha, gqa4, mla-kv64, egmla-kv64, ...;
see egmla.variants) applied to --preset. The [train] and [data] sections of the first config
(plus --set) are used for every run, so the comparison is fair by construction.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from egmla.variants import VARIANTS

    parser.add_argument("configs", nargs="+", metavar="CONFIG",
                        help=f"TOML files or variant names ({', '.join(VARIANTS)})")
    parser.add_argument("--preset", default="tiny", help="model preset for variant names (tiny, paper-base, paper-1b)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override applied to every run, e.g. --set train.steps=200 (model.* keys too)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default runs/compare-<timestamp>)")
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
    vocab = {run.model.vocab_size for _, run in runs}
    if len(vocab) > 1:
        raise ValueError(f"model.vocab_size differs between configs ({sorted(vocab)}): a fair comparison needs "
                         f"one tokenizer; set --set model.vocab_size=N")
    return runs


def format_table(rows: list[dict]) -> str:
    header = (f"{'config':<22} {'variant':<26} {'params (M)':>10} {'w/o gate (M)':>12} {'KV elem/token':>13} "
              f"{'val loss':>9} {'tokens/s':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        loss = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "-"
        lines.append(f"{r['name']:<22} {r['variant']:<26} {r['params'] / 1e6:>10.2f} "
                     f"{r['params_without_gate_tables'] / 1e6:>12.2f} {r['kv_elements_per_token']:>13,} "
                     f"{loss:>9} {r['tokens_per_s']:>10,.0f}")
    return "\n".join(lines)


def plot_comparison(rows: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in rows:
        if r["final_val_loss"] is None:
            continue
        marker = "o" if "EG-MLA" in r["variant"] else ("s" if "MLA" in r["variant"] else "^")
        ax.scatter(r["kv_elements_per_token"], r["final_val_loss"], marker=marker, s=50)
        ax.annotate(r["name"], (r["kv_elements_per_token"], r["final_val_loss"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("KV-cache elements per token (all layers)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(args) -> int:
    from egmla.runs import atomic_write_json
    from egmla.train.trainer import train

    runs = load_runs(args.configs, args.preset, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    first = runs[0][1]
    budget = first.train.steps * first.train.batch_size * first.train.seq_len
    print(f"comparing {len(runs)} configs on corpus {first.data.corpus!r}, seed {first.train.seed}, "
          f"{budget:,} training tokens each; output in {out}")
    rows = []
    for label, run in runs:
        print(f"\n=== {label}: {run.model.variant_name()} ===")
        summary = train(run, out / label, progress=not args.no_progress)
        rows.append({key: summary[key] for key in ("name", "variant", "params", "params_without_gate_tables",
                                                   "kv_elements_per_token", "final_val_loss", "tokens_per_s")})
    table = format_table(rows)
    print("\n" + table)
    atomic_write_json(out / "compare.json", {"rows": rows, "tokens_per_run": budget, "corpus": first.data.corpus})
    (out / "compare.md").write_text("```\n" + table + "\n```\n")
    plot = plot_comparison(rows, out / "compare.png", f"validation loss vs KV cache ({budget:,} tokens each)")
    print(f"\nwrote {out / 'compare.json'}" + (f" and {plot}" if plot else ""))
    return 0
