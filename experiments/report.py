"""Tables and plots for docs/RESULTS.md from the group files that `paper_repro.py` writes (issue 7).

    python experiments/report.py experiments/results/cpu-pilot --plots docs/results/cpu-pilot

Reads whichever group files (table1.json, ablations.json, ..., longer.part-RUN.json) the folder holds,
prints Markdown tables (also written to --plots/tables.md) and draws
  kv-vs-loss.png   final validation loss against KV elements per token (the paper's Figure 1c analogue)
  curves-GROUP.png validation loss against training tokens, every run of the group
  de-sweep.png     final validation loss against d_e (the paper's Figure 1b analogue)
Every number comes from the files; nothing is typed in except the paper's own ablation losses, quoted
beside ours and labelled as theirs. experiments/claims.py compares budgets: the gap plot, the paired tests and
the claims' verdicts.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

# The paper's Table 3 (its data and scale: 50B ClimbMix tokens), quoted for comparison only.
PAPER_ABLATION_LOSS = {"egmla-kv64": 3.1609, "egmla-kv64-no-norm": 3.2573, "egmla-kv64-add": 3.1901}
MHA_NAME = "mha"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_repro import GROUPS  # noqa: E402  (the groups' config order)


def load_groups(folder: Path) -> dict[str, dict]:
    """{group: {"rows", "metrics", "command"}}, merging GROUP.json with GROUP.<part>.json files (a group run
    in several calls with --only); a row name seen twice keeps the later file's row."""
    groups = {}
    for name in GROUPS:
        paths = sorted(folder.glob(f"{name}.json")) + sorted(folder.glob(f"{name}.*.json"))
        for path in paths:
            part = json.loads(path.read_text())
            merged = groups.setdefault(name, {"rows": [], "metrics": {}, "commands": []})
            names = {r["name"] for r in part["rows"]}
            merged["rows"] = [r for r in merged["rows"] if r["name"] not in names] + part["rows"]
            merged["metrics"].update(part["metrics"])
            merged["commands"].append(part.get("command", path.name))
    borrow_shared_rows(groups)
    for name, merged in groups.items():  # parts arrive in file-name order: put rows in the group's order
        order = {config: i for i, config in enumerate(GROUPS[name])}
        merged["rows"].sort(key=lambda r: (r.get("seed", 0), order.get(config_of(r), len(order))))
    if not groups:
        raise SystemExit(f"{folder}: no group files (table1.json, ...); run experiments/paper_repro.py first")
    return groups


def shown_command(command: str) -> str:
    """A run's recorded command as a reader would type it: the script's path from the repository root, and
    without --work/--out (where files went, not what was trained) or how calls were cut and skipped."""
    words, shown = command.split(), []
    while words:
        word = words.pop(0)
        if word in ("--work", "--out", "--time-limit-s", "--min-run-s", "--records") and words:
            words.pop(0)
        elif word.endswith("experiments/paper_repro.py"):
            shown.append("experiments/paper_repro.py")
        else:
            shown.append(word)
    return " ".join(shown)


def borrow_shared_rows(groups: dict[str, dict]) -> None:
    """Fill in a config a group lacks from another group's run of the same config, seed 0, token budget and
    validation split.
    The full EG-MLA kv64 belongs to every group; groups run in parts (several calls, or several GPUs through
    on_gpus.sh) train it once, in one group, not again in each. A borrowed row says where it came from."""
    for name, group in groups.items():
        have = {(config_of(r), r.get("seed", 0)) for r in group["rows"]}
        budgets = {(r["tokens"], r.get("split", "chunk")) for r in group["rows"]}
        for config in GROUPS[name]:
            if (config, 0) in have:
                continue
            for other, source in groups.items():
                if other == name:
                    continue
                match = [r for r in source["rows"] if config_of(r) == config and r.get("seed", 0) == 0
                         and (r["tokens"], r.get("split", "chunk")) in budgets and "borrowed_from" not in r]
                if match:
                    group["rows"].append(dict(match[0], borrowed_from=other))
                    group["metrics"][match[0]["name"]] = source["metrics"][match[0]["name"]]
                    break


def config_of(row: dict) -> str:
    """'egmla-kv64-seed0' -> 'egmla-kv64'."""
    return row["name"].rsplit("-seed", 1)[0]


def by_config(rows: list[dict], seed: int = 0) -> dict[str, dict]:
    return {config_of(r): r for r in rows if r.get("seed", 0) == seed}


def fmt_loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def table1(rows: list[dict]) -> str:
    mha = by_config(rows).get(MHA_NAME)
    lines = ["| config | variant | params (M) | without gate tables (M) | KV elements/token | vs MHA | "
             "val loss | Δ vs MHA | tokens/s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kv_ratio = f"{r['kv_elements_per_token'] / mha['kv_elements_per_token']:.1%}" if mha else "-"
        delta = (f"{r['final_val_loss'] - mha['final_val_loss']:+.4f}"
                 if mha and r["final_val_loss"] is not None else "-")
        lines.append(f"| {config_of(r)} | {r['variant']} | {r['params'] / 1e6:.2f} | "
                     f"{r['params_without_gate_tables'] / 1e6:.2f} | {r['kv_elements_per_token']:,} | {kv_ratio} | "
                     f"{fmt_loss(r['final_val_loss'])} | {delta} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def ablations(rows: list[dict]) -> str:
    ours = by_config(rows)
    full = ours.get("egmla-kv64")
    lines = ["| config | ours: val loss | ours: Δ vs full | paper: val loss | paper: Δ vs full |",
             "|---|---:|---:|---:|---:|"]
    for name, paper in PAPER_ABLATION_LOSS.items():
        r = ours.get(name)
        if r is None:
            continue
        delta = f"{r['final_val_loss'] - full['final_val_loss']:+.4f}" if full else "-"
        lines.append(f"| {name} | {fmt_loss(r['final_val_loss'])} | {delta} | {paper:.4f} | "
                     f"{paper - PAPER_ABLATION_LOSS['egmla-kv64']:+.4f} |")
    return "\n".join(lines)


def de_sweep_points(rows: list[dict]) -> list[tuple[int, float, dict]]:
    return sorted((r["gate_dim"], r["final_val_loss"], r) for r in rows if r.get("gate_dim"))


def de_sweep(rows: list[dict]) -> str:
    lines = ["| d_e | gate-table parameters (M) | val loss |", "|---:|---:|---:|"]
    for gate_dim, loss, r in de_sweep_points(rows):
        lines.append(f"| {gate_dim} | {(r['params'] - r['params_without_gate_tables']) / 1e6:.2f} | "
                     f"{fmt_loss(loss)} |")
    return "\n".join(lines)


def latent(rows: list[dict]) -> str:
    paths = {"egmla-kv64": "gate on the up-projected K/V (the paper's); decode rebuilds K/V or uses the "
                           "grouped/fused kernels", "egmla-kv64-latent": "gate on the latent; MLA's absorbed decode"}
    lines = ["| config | placement and decode | params (M) | val loss |", "|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {config_of(r)} | {paths.get(config_of(r), '')} | {r['params'] / 1e6:.2f} | "
                     f"{fmt_loss(r['final_val_loss'])} |")
    return "\n".join(lines)


def finished(row: dict) -> bool:
    """Whether a row has a final validation loss to average (not None, not NaN or infinite: a diverged run's, on
    which statistics.stdev raises AttributeError)."""
    return row["final_val_loss"] is not None and math.isfinite(row["final_val_loss"])


def seed_losses(groups: dict) -> dict[str, dict[int, float]]:
    """{config: {seed: loss}} for the seeds group's configs, seed 0 taken from table1."""
    losses: dict[str, dict[int, float]] = {}
    seeds = groups.get("seeds", {}).get("rows", [])
    configs = {config_of(r) for r in seeds}
    for r in groups.get("table1", {}).get("rows", []) + seeds:
        if config_of(r) in configs and finished(r):
            losses.setdefault(config_of(r), {})[r.get("seed", 0)] = r["final_val_loss"]
    return losses


def seed_table(losses: dict[str, dict[int, float]]) -> list[str]:
    """| config | seed 0 | seed 1 | ... | mean | std (n-1) |, one row per config in the dict's order."""
    all_seeds = sorted({s for per in losses.values() for s in per})
    lines = ["| config | " + " | ".join(f"seed {s}" for s in all_seeds) + " | mean | std (n-1) |",
             "|---|" + "---:|" * (len(all_seeds) + 2)]
    for name, per in losses.items():
        values = list(per.values())
        std = f"{statistics.stdev(values):.4f}" if len(values) > 1 else "-"  # one seed has no spread
        lines.append(f"| {name} | " + " | ".join(fmt_loss(per.get(s)) for s in all_seeds)
                     + f" | {statistics.mean(values):.4f} | {std} |")
    return lines


def seeds_table(groups: dict) -> str:
    losses = seed_losses(groups)
    lines = seed_table(dict(sorted(losses.items())))
    if {"egmla-kv64", "mla-kv256"} <= losses.keys():
        eg, mla = losses["egmla-kv64"], losses["mla-kv256"]
        paired = [eg[s] - mla[s] for s in sorted(eg.keys() & mla.keys())]
        if paired:
            spread = (f", std of the paired differences {statistics.stdev(paired):.4f}" if len(paired) > 1 else "")
            lines.append(f"\nEG-MLA kv64 − MLA kv256, paired by seed: "
                         + ", ".join(f"{d:+.4f}" for d in paired)
                         + f" (mean {statistics.mean(paired):+.4f}{spread}).")
    return "\n".join(lines)


def longer_table(rows: list[dict]) -> str:
    """Issue 18's runs: final validation loss per seed, and how many epochs of the training split a run read."""
    corpora = [r.get("train_split_tokens") for r in rows]
    usual = max(set(corpora), key=corpora.count) if corpora else None
    others = list(dict.fromkeys(c for c in corpora if c != usual))  # in the order the runs came
    marks = {c: "†" * (i + 1) for i, c in enumerate(others)}  # one mark per other build: never one row of two
    losses: dict[str, dict[int, float]] = {}
    for r in rows:  # runs on another build of the corpus (another machine's installed files) get their own line
        if finished(r):
            mark = marks.get(r.get("train_split_tokens"))
            losses.setdefault(config_of(r) + (f" {mark}" if mark else ""), {})[r.get("seed", 0)] = r["final_val_loss"]
    epochs = sorted({r["epochs"] for r in rows if r.get("epochs")})
    shown = list(dict.fromkeys(f"{e:.2f}" for e in epochs))
    read = f"\n\nEach run read {', '.join(shown)} epochs of its training split." if epochs else ""
    if others:
        read += (f"\n\n{', '.join(f'{marks[c]}: {c:,}' for c in others)} training tokens: trained on other builds "
                 f"of the python-source corpus (the others {usual:,}): compare rows of one mark only.")
    return "\n".join(seed_table(losses)) + read + ("\n\nPaired differences, their tests and the verdicts: "
                                                  "`experiments/claims.py` (docs/RESULTS.md, issue 18); runs pair "
                                                  "only on the same corpus.")


def pyplot():
    """matplotlib.pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kv_vs_loss(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    families = {"MLA": ("s", "-"), "EG-MLA": ("o", "-")}
    for family, (marker, style) in families.items():
        points = sorted((r["kv_elements_per_token"], r["final_val_loss"]) for r in rows
                        if r["variant"].startswith(family + " ") and "latent" not in r["variant"])
        if points:
            ax.plot(*zip(*points), marker=marker, linestyle=style, label=family)
    for r in rows:
        if not r["variant"].startswith(("MLA", "EG-MLA")):
            ax.scatter(r["kv_elements_per_token"], r["final_val_loss"], marker="^", s=50, label=r["variant"])
        ax.annotate(config_of(r), (r["kv_elements_per_token"], r["final_val_loss"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("KV-cache elements per token (all layers)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(group: dict, path: Path, title: str) -> None:
    """Validation loss against training tokens, every run of a group. A run validates at its last step, so
    its tokens per step = its tokens / the largest step recorded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    tokens_per_step = {r["name"]: r["tokens"] // max(1, max((m.get("step", 0) for m in group["metrics"][r["name"]]),
                                                            default=1)) for r in group["rows"]}
    seeded = len({r.get("seed", 0) for r in group["rows"]}) > 1
    for r in group["rows"]:
        points = [(m["step"] * tokens_per_step[r["name"]], m["val_loss"]) for m in group["metrics"][r["name"]]
                  if m.get("kind") == "val"]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, label=r["name"] if seeded else config_of(r))
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_de_sweep(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    points = [(d, loss) for d, loss, _ in de_sweep_points(rows) if loss is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(*zip(*points), marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks([d for d, _ in points], [str(d) for d, _ in points])
    ax.set_xlabel("gate embedding size d_e")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tables(groups: dict[str, dict]) -> str:
    """The Markdown of every group's table, with the commands, token budgets and devices behind it."""
    sections = []
    describe = {"table1": ("Table 1 analogue", table1), "ablations": ("Gate ablations at kv64", ablations),
                "de-sweep": ("Embedding size d_e at kv64", de_sweep), "latent": ("Gate placement at kv64", latent),
                "longer": ("Longer budget, whole files held out, controls (issue 18)", longer_table)}
    for name, (heading, render) in describe.items():
        if name in groups:
            group = groups[name]
            tokens = {r["tokens"] for r in group["rows"]}
            commands = "; ".join(dict.fromkeys(f"`{shown_command(c)}`" for c in group["commands"]))
            sources = [f"{config_of(r)} from {r['borrowed_from']}" for r in group["rows"] if "borrowed_from" in r]
            borrowed = (f" (rows from another group's run of the same config, seed and budget: {', '.join(sources)})"
                        if sources else "")
            sections.append(f"### {heading}\n\n{commands}{borrowed} — {', '.join(f'{t:,}' for t in tokens)} "
                            f"training tokens per run, device {group['rows'][0].get('device') or 'unrecorded'}\n\n"
                            + render(group["rows"]))
    if "seeds" in groups:
        sections.append("### Seeds: EG-MLA kv64 vs MLA kv256\n\n" + seeds_table(groups))
    return "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="folder of group files (e.g. experiments/results/cpu-pilot)")
    parser.add_argument("--plots", type=Path, help="write tables.md and the PNGs here (e.g. docs/results/NAME)")
    args = parser.parse_args(argv)
    groups = load_groups(args.results)
    text = tables(groups)
    print(text)
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        (args.plots / "tables.md").write_text(text)
        if "table1" in groups:
            plot_kv_vs_loss(groups["table1"]["rows"], args.plots / "kv-vs-loss.png",
                            "validation loss vs KV cache size")
        for name, group in groups.items():
            plot_curves(group, args.plots / f"curves-{name}.png", f"{name}: validation loss vs training tokens")
        if "de-sweep" in groups:
            plot_de_sweep(groups["de-sweep"]["rows"], args.plots / "de-sweep.png",
                          "EG-MLA kv64: validation loss vs d_e")
        print(f"wrote {args.plots / 'tables.md'} and the plots beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
