"""Does EG-MLA kv64's lead survive a longer budget, and is it the gate or the table? (issue 18)

    python experiments/claims.py --plots docs/results/claims --results-md docs/RESULTS.md

Reads the group files of result folders (default: BUDGET_FOLDERS, those that exist: 41.9 M, 78.6 M and
131 M tokens per run) and writes to --plots:
  gap-vs-tokens.png  EG-MLA kv64 − MLA kv256, − MHA and − the same table without a gate (bias) in validation loss against tokens:
                     each seed (thin), the mean over seeds (thick) and ±1 sd across seeds (band), per budget
  claims.md          the claims table, with verdicts computed at >= 131 M tokens, and every paired difference
                     (per seed, mean, sd, paired t-test) at every budget
--results-md rewrites the block between BEGIN and END in that file with claims.md and the plot. Every number
comes from the records; a comparison without them says "not yet run".

    python experiments/claims.py --missing 3

prints, for each corpus the records read, the runs that would give every claim three paired seeds there (runs pair
only on one corpus), fewest first, with a paper_repro.py command each.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_repro import corpus_fields, same_corpus  # noqa: E402
from report import config_of, load_groups, pyplot  # noqa: E402

from egmla.stats import paired_t_test, t_two_sided_p  # noqa: E402,F401 (t_two_sided_p: its test reads it here)

BUDGET_FOLDERS = [ROOT / "experiments" / "results" / name for name in ("paper-base", "paper-base-long", "longer-budget")]
ISSUE_TOKENS = 2000 * 64 * 1024  # the claims are judged at this budget or more (issue 18)
SIGNIFICANT = 0.05  # two-sided p of the paired t-test
BEGIN, END = "<!-- experiments/claims.py: begin -->", "<!-- experiments/claims.py: end -->"
NAMES = {"egmla-kv64": "EG-MLA kv64", "mla-kv256": "MLA kv256", "mha": "MHA",
         "egmla-kv64-bias": "the table without a gate (bias)", "egmla-kv64-add": "`add`",
         "egmla-kv64-identity": "the gate started at 1 (identity)",
         "egmla-kv64-bias-v": "the table on V alone (bias-v)"}


@dataclass(frozen=True)
class Claim:
    text: str
    a: str  # config: a - b in validation loss, paired by seed (negative: a is better)
    b: str
    kind: str  # "matches": a is as good as b or better; "beats": a is better than b


CLAIMS = [
    Claim("EG-MLA kv64 matches MLA kv256 (a 4× smaller latent)", "egmla-kv64", "mla-kv256", "matches"),
    Claim("EG-MLA kv64 matches MHA at 8.3% of its cache", "egmla-kv64", "mha", "matches"),
    Claim("the gate, not the table's size, helps", "egmla-kv64", "egmla-kv64-bias", "beats"),
    Claim("multiplying by the gate beats adding it", "egmla-kv64", "egmla-kv64-add", "beats"),
    Claim("(ours) a gate started at 1 beats the N(0, 1) start", "egmla-kv64-identity", "egmla-kv64", "beats"),
    Claim("(ours) a gate started at 1 beats adding it", "egmla-kv64-identity", "egmla-kv64-add", "beats"),
    Claim("(ours) the table on V alone matches it on K and V", "egmla-kv64-bias-v", "egmla-kv64-bias", "matches"),
    # the best config found, against the baselines the paper's claims name (it caches what MLA kv64 caches)
    Claim("(ours) the table on V alone matches MLA kv256", "egmla-kv64-bias-v", "mla-kv256", "matches"),
    Claim("(ours) the table on V alone matches MHA at 8.3% of its cache", "egmla-kv64-bias-v", "mha", "matches"),
]
VERDICTS = {  # (kind, direction over the seeds, significant) -> verdict; {a}, {b}: the two sides
    ("matches", "ahead", True): "**supported**: {a} ahead on every seed",
    ("matches", "ahead", False): "**supported**: {a} ahead on every seed, not significantly",
    ("matches", "mixed", False): "**a tie**: the seeds disagree; {a} no longer leads",
    ("matches", "behind", False): "**lead gone**: {a} behind on every seed, not significantly",
    ("matches", "behind", True): "**not supported**: {b} ahead on every seed",
    ("beats", "ahead", True): "**supported**",
    ("beats", "ahead", False): "**suggested**: ahead on every seed, not significantly",
    ("beats", "mixed", False): "**not supported**: the seeds disagree",
    ("beats", "behind", False): "**not supported**: behind on every seed, not significantly",
    ("beats", "behind", True): "**contradicted**: {b} ahead on every seed",
    # seeds of both signs whose mean still differs significantly (possible from four seeds on)
    ("matches", "mixed ahead", True): "**supported on average**: {a} ahead on average, not on every seed",
    ("matches", "mixed behind", True): "**not supported on average**: {b} ahead on average, not on every seed",
    ("beats", "mixed ahead", True): "**supported on average**: ahead on average, not on every seed",
    ("beats", "mixed behind", True): "**contradicted on average**: {b} ahead on average, not on every seed",
}


PLOTTED = [(claim.a, claim.b) for claim in CLAIMS[:3]]  # the gap-vs-tokens panels
PLOT_ALT = "EG-MLA kv64 minus MLA kv256, MHA and the same table without a gate, against training tokens"


@dataclass(frozen=True, order=True)
class Budget:
    tokens: int
    split: str  # data.split: chunk (every run before issue 18) or document (whole files held out)

    def label(self) -> str:
        return f"{self.tokens / 1e6:.1f} M tokens, held out by {'file' if self.split == 'document' else 'chunk'}"


@dataclass
class Run:
    loss: float
    curve: dict[int, float]  # step -> validation loss
    tokens_per_step: int
    corpus: dict  # what identifies its data (paper_repro.corpus_fields): runs pair only on the same corpus
    tokens: int = 0
    tokens_per_s: float | None = None  # the training speed the record measured, and where
    device: str | None = None


def load_runs(folders: list[Path]) -> dict[Budget, dict[tuple[str, int], list[Run]]]:
    """{budget: {(config, seed): [runs]}} of every finished run in the folders' group files (a run that several
    groups share counts once; a config and seed has several runs when they read different corpora)."""
    runs: dict[Budget, dict[tuple[str, int], list[Run]]] = {}
    for folder in folders:
        if not any(Path(folder).glob("*.json")):
            continue
        for group in load_groups(Path(folder)).values():
            for row in group["rows"]:
                if row.get("final_val_loss") is None or not math.isfinite(row["final_val_loss"]):
                    continue  # not finished, or diverged: never a side of a pair
                curve = {m["step"]: m["val_loss"] for m in group["metrics"][row["name"]] if m.get("kind") == "val"}
                run = Run(row["final_val_loss"], curve, row["tokens"] // max(curve), corpus_fields(row), row["tokens"],
                          row.get("tokens_per_s"), row.get("device"))
                found = runs.setdefault(Budget(row["tokens"], row.get("split", "chunk")), {}).setdefault(
                    (config_of(row), row.get("seed", 0)), [])
                if not any(r.corpus == run.corpus and r.loss == run.loss for r in found):
                    found.append(run)
    return runs


# ---- paired differences and the test -------------------------------------------------------------------
def pairs(runs: dict[tuple[str, int], list[Run]], a: str, b: str) -> tuple[dict[int, list[tuple[Run, Run]]], list[int]]:
    """({seed: [(run of a, run of b) on one corpus and schedule, one per corpus]}, [seeds both configs ran, but on
    different corpora or schedules only]). A budget's token count does not fix its steps (steps x batch x sequence):
    runs of other tokens per step are other schedules, and their curves meet at other steps. A seed paired on several
    corpora keeps every pair: its difference is their mean (`paired`), so a run added on another corpus never
    replaces the pair a verdict already read."""
    matched, apart = {}, []
    for seed in sorted({s for c, s in runs if c == a} & {s for c, s in runs if c == b}):
        candidates = [(x, y) for x in runs[a, seed] for y in runs[b, seed]
                      if same_corpus(x.corpus, y.corpus) and x.tokens_per_step == y.tokens_per_step]
        if candidates:
            matched[seed] = sorted(candidates, key=lambda pair: corpus_label(pair[0].corpus))
        else:
            apart.append(seed)
    return matched, apart


def paired(runs: dict[tuple[str, int], list[Run]], a: str, b: str) -> dict[int, float]:
    """{seed: loss(a) - loss(b)} over the seeds both configs ran on one corpus; the mean of a seed's corpora."""
    return {seed: statistics.mean(x.loss - y.loss for x, y in found) for seed, found in pairs(runs, a, b)[0].items()}


def per_corpus(runs: dict[tuple[str, int], list[Run]], a: str, b: str) -> dict[int, list[tuple[str, float]]]:
    """{seed: [(corpus, loss(a) - loss(b) on it)]} for the seeds paired on more than one corpus."""
    return {seed: [(corpus_label(x.corpus), x.loss - y.loss) for x, y in found]
            for seed, found in pairs(runs, a, b)[0].items() if len(found) > 1}


def verdict(claim: Claim, differences: dict[int, float], apart: list[int] = (),
            ran: tuple[list[int], list[int]] = ([], [])) -> str:
    """ran: the seeds each side has at the budget (both ran, but never at one seed: no pair yet)."""
    if not differences:
        if apart:
            return "no pair on one corpus yet"
        if ran[0] and ran[1]:
            return (f"no seed run by both yet ({claim.a}: seed {', '.join(map(str, ran[0]))}; {claim.b}: seed "
                    f"{', '.join(map(str, ran[1]))})")
        return "not yet run"
    if len(differences) == 1:
        return "one seed only: a second is needed for a verdict"
    values = list(differences.values())
    direction = "ahead" if max(values) < 0 else "behind" if min(values) > 0 else "mixed"
    test = paired_t_test(values)
    significant = test["p"] < SIGNIFICANT
    if direction == "mixed" and significant:
        direction = "mixed ahead" if test["mean"] < 0 else "mixed behind"
    return VERDICTS[claim.kind, direction, significant].format(a=NAMES[claim.a], b=NAMES[claim.b])


# ---- tables ------------------------------------------------------------------------------------------------
def describe(differences: dict[int, float], apart: list[int] = (),
             corpora: dict[int, list[tuple[str, float]]] | None = None) -> tuple[str, str, str]:
    """(per seed, mean ± sd (n), paired t-test) cells; `apart`: seeds whose runs read different corpora or ran
    other schedules; `corpora`: each corpus's difference for the seeds paired on several (their cell is the mean)."""
    unpaired = "".join(f", seed {s}: runs on different corpora or schedules, not paired" for s in apart)
    if not differences:
        return (unpaired[2:] or "-"), "-", "-"
    test = paired_t_test(list(differences.values()))
    corpora = corpora or {}

    def seed_cell(seed: int, difference: float) -> str:
        if seed not in corpora:
            return f"{difference:+.4f} (seed {seed})"
        each = " and ".join(f"{d:+.4f} on {corpus}" for corpus, d in corpora[seed])
        return f"{difference:+.4f} (seed {seed}: mean of {each})"

    seeds = ", ".join(seed_cell(s, d) for s, d in differences.items()) + unpaired
    spread = f" ± {test['sd']:.4f}" if test["sd"] is not None else ""
    t_test = f"t({test['n'] - 1}) = {test['t']:.2f}, p = {test['p']:.3f}" if test["p"] is not None else "n = 1: none"
    return seeds, f"{test['mean']:+.4f}{spread} (n = {test['n']})", t_test


def claims_table(runs: dict[Budget, dict]) -> str:
    """Each claim judged at the budget of at least ISSUE_TOKENS that pairs the most seeds of its two configs."""
    lines = [f"| claim | difference (lower is better) | at >= {ISSUE_TOKENS / 1e6:.0f} M tokens, per seed | "
             f"mean ± sd (n) | paired t-test | verdict |", "|---|---|---|---|---|---|"]
    for claim in CLAIMS:
        candidates = [(len(paired(r, claim.a, claim.b)), budget) for budget, r in runs.items()
                      if budget.tokens >= ISSUE_TOKENS]
        _, budget = max(candidates, default=(0, None))
        differences = paired(runs[budget], claim.a, claim.b) if budget else {}
        apart = pairs(runs[budget], claim.a, claim.b)[1] if budget else []
        cells = describe(differences, apart, per_corpus(runs[budget], claim.a, claim.b) if budget else {})
        where = f" ({budget.label()})" if differences else ""
        ran = tuple(sorted({s for c, s in runs[budget] if c == side}) if budget else [] for side in (claim.a, claim.b))
        lines.append(f"| {claim.text} | {claim.a} − {claim.b}{where} | {' | '.join(cells)} | "
                     f"{verdict(claim, differences, apart, ran)} |")
    return "\n".join(lines)


def differences_table(runs: dict[Budget, dict]) -> str:
    lines = ["| difference | budget | per seed | mean ± sd (n) | paired t-test |", "|---|---|---|---|---|"]
    compared = list(dict.fromkeys((c.a, c.b) for c in CLAIMS))
    for a, b in compared:
        for budget in sorted(runs):
            differences, apart = paired(runs[budget], a, b), pairs(runs[budget], a, b)[1]
            if differences or apart:
                cells = describe(differences, apart, per_corpus(runs[budget], a, b))
                lines.append(f"| {a} − {b} | {budget.label()} | {' | '.join(cells)} |")
    return "\n".join(lines)


def report(runs: dict[Budget, dict], plot_path: str | None = None) -> str:
    """claims.md: the claims table, the paired differences and (if drawn) the plot."""
    text = ("### Claims at the longer budget\n\n" + claims_table(runs)
            + f"\n\nVerdicts: the sign of the difference on every seed and a two-sided paired t-test over seeds "
              f"(significant: p < {SIGNIFICANT}); one seed gives no verdict. Runs pair only when they read the same "
              f"corpus (the records' training and validation tokens and corpus id: the python-source corpus is the "
              f"installed Python files of the machine that trained the run, and machines differ). A seed paired on "
              f"several corpora counts once, with the mean of its corpora's differences.\n\n"
            + "### Paired differences at every budget\n\n" + differences_table(runs) + "\n")
    if plot_path:
        text += f"\n![{PLOT_ALT}]({plot_path})\n"
    return text


# ---- what is left to run ------------------------------------------------------------------------------------
def corpus_label(corpus: dict) -> str:
    return corpus.get("corpus_id") or (f"{corpus['train_split_tokens']:,} training tokens"
                                       if "train_split_tokens" in corpus else "unrecorded")


def missing_runs(runs: dict[Budget, dict], seeds: int) -> list[tuple[dict, list[tuple[str, int]], dict]]:
    """For every corpus that runs of the claims' budget read: (corpus, the runs (config, seed) to train on it so that
    every claim has `seeds` paired seeds, {claim text: seeds it gains}), fewest runs first. A claim's new seeds are the
    lowest it has no pair for yet (on any corpus); both of their runs must read one corpus."""
    budget = max((b for b in runs if b.tokens >= ISSUE_TOKENS), key=lambda b: len(runs[b]), default=None)
    if budget is None:
        return []
    found = runs[budget]
    corpora: list[dict] = []  # one entry per corpus, the record that says most about it (older ones lack the id)
    for listed in found.values():
        for run in listed:
            same = [i for i, c in enumerate(corpora) if same_corpus(run.corpus, c)]
            if not same:
                corpora.append(run.corpus)
            elif len(run.corpus) > len(corpora[same[0]]):
                corpora[same[0]] = run.corpus
    plans = []
    for corpus in corpora:
        needed, gains = [], {}
        for claim in CLAIMS:
            have = set(paired(found, claim.a, claim.b))
            new = [seed for seed in range(seeds + len(have)) if seed not in have][:max(0, seeds - len(have))]
            for seed in new:
                for config in (claim.a, claim.b):
                    there = any(same_corpus(r.corpus, corpus) for r in found.get((config, seed), []))
                    if not there and (config, seed) not in needed:
                        needed.append((config, seed))
            if new:
                gains[claim.text] = new
        plans.append((corpus, sorted(needed, key=lambda run: (run[1], run[0])), gains))
    return sorted(plans, key=lambda plan: len(plan[1]))


def corpus_devices(runs: dict[Budget, dict], corpus: dict) -> list[str]:
    """The devices whose runs read `corpus`: a machine of the same kind and image likely builds it again."""
    return sorted({run.device for found in runs.values() for listed in found.values() for run in listed
                   if run.device and same_corpus(run.corpus, corpus)})


def missing_text(runs: dict[Budget, dict], seeds: int) -> str:
    plans = missing_runs(runs, seeds)
    if not plans:
        return "no record at the claims' budget yet: every claim needs its runs (paper_repro.py longer)"
    if all(not needed for _, needed, _ in plans):
        return f"every claim has {seeds} paired seed{'s' if seeds != 1 else ''}: no run is missing"
    lines = [f"To give every claim {seeds} paired seeds, train on one corpus (runs pair only on the corpus they read; "
             f"the python-source corpus is the training machine's installed files):"]
    for corpus, needed, gains in plans:
        devices = corpus_devices(runs, corpus)
        lines.append(f"- corpus {corpus_label(corpus)}"
                     + (f" (its runs trained on {', '.join(devices)})" if devices else "")
                     + f": {len(needed)} run{'s' if len(needed) != 1 else ''}"
                     + (": " + ", ".join(f"{config} seed {seed}" for config, seed in needed) if needed else ""))
    corpus, needed, gains = plans[0]
    if needed:
        lines.append(f"Fewest runs: corpus {corpus_label(corpus)}, if a machine still builds it (paper_repro.py "
                     f"names the corpus it reads when a run is recorded on another). Claims and the seeds they gain:")
        lines += [f"  - {claim}: seed {', '.join(map(str, new))}" for claim, new in gains.items()]
        lines.append("One command per run (it retrains a config and seed recorded on another corpus as "
                     "RUN-c<corpus id>):")
        lines += [f"  python3 experiments/paper_repro.py longer --only {config} --seeds {seed} --retrain-other-corpora "
                  f"--records experiments/results/longer-budget" for config, seed in needed]
        lines += step_minutes(runs, needed)
    return "\n".join(lines)


def step_minutes(runs: dict[Budget, dict], needed: list[tuple[str, int]]) -> list[str]:
    """Minutes of training steps the runs would take on each device that recorded all their configs, at the median
    speed recorded there (start-up, compilation and validation come on top)."""
    speeds: dict[tuple[str, str], list[float]] = {}
    for budget, found in runs.items():
        if budget.tokens < ISSUE_TOKENS:
            continue
        for (config, _), listed in found.items():
            for run in listed:
                if run.tokens_per_s and run.device:
                    speeds.setdefault((run.device, config), []).append(run.tokens / run.tokens_per_s / 60)
    lines = []
    for device in sorted({d for d, _ in speeds}):
        if all((device, config) in speeds for config, _ in needed):
            total = sum(statistics.median(speeds[device, config]) for config, _ in needed)
            lines.append(f"On {device}: {total:.0f} min of training steps at the recorded speeds "
                         f"(start-up, compilation and validation come on top: ~1-2 min a run).")
    return lines


# ---- the plot ----------------------------------------------------------------------------------------------
def gap_curves(runs: dict[tuple[str, int], Run], a: str, b: str) -> dict[int, list[tuple[float, float]]]:
    """{seed: [(tokens, loss(a) - loss(b))]} at the evaluations both runs made (a seed paired on several corpora:
    the mean of its pairs at the evaluations all of them made, as its difference in the tables)."""
    curves = {}
    for seed, found in pairs(runs, a, b)[0].items():
        tokens_per_step = found[0][0].tokens_per_step
        found = [(x, y) for x, y in found if x.tokens_per_step == tokens_per_step]  # one schedule's steps
        steps = sorted(set.intersection(*(set(x.curve) & set(y.curve) for x, y in found)))
        curves[seed] = [(step * tokens_per_step, statistics.mean(x.curve[step] - y.curve[step] for x, y in found))
                        for step in steps]
    return curves


def plot_gaps(runs: dict[Budget, dict], path: Path, floor: float = -0.2) -> None:
    """The gaps of the first three claims against tokens; the y axis stops at `floor` (the first evaluations'
    gaps, down to -0.5, would squeeze the late ones, which decide the claims, into a line)."""
    plt = pyplot()
    pairs = PLOTTED
    shown = [b for b in sorted(runs) if any(gap_curves(runs[b], a, c) for a, c in pairs)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4.5), dpi=120, sharey=True)
    lowest = 0.0
    for ax, (a, b) in zip(axes, pairs):
        for index, budget in enumerate(shown):
            curves, colour = gap_curves(runs[budget], a, b), f"C{index}"
            if not curves:
                continue
            for points in curves.values():
                ax.plot([t / 1e6 for t, _ in points], [d for _, d in points], color=colour, lw=0.8, alpha=0.6,
                        ls="--")
                lowest = min([lowest] + [d for _, d in points])
            steps = sorted(set.intersection(*({t for t, _ in points} for points in curves.values())))
            at = [[dict(points)[t] for points in curves.values()] for t in steps]
            mean = [statistics.mean(values) for values in at]
            label = f"{budget.label()}: mean of {len(curves)} seed{'s' if len(curves) > 1 else ''}"
            ax.plot([t / 1e6 for t in steps], mean, color=colour, lw=2, marker="o", ms=3, label=label)
            if len(curves) > 1:
                sd = [statistics.stdev(values) for values in at]
                ax.fill_between([t / 1e6 for t in steps], [m - s for m, s in zip(mean, sd)],
                                [m + s for m, s in zip(mean, sd)], color=colour, alpha=0.2, lw=0)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(f"{NAMES[a]} − {NAMES[b]}")
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylim(bottom=max(floor, lowest - 0.01))
    axes[0].set_ylabel("Δ validation loss (nats/token; < 0: EG-MLA better)")
    below = f"; earlier gaps, down to {lowest:.2f}, lie below the frame" if lowest < floor else ""
    fig.suptitle(f"Each budget is its own runs (the cosine schedule spans the run). Dashed: one seed; band: ±1 sd "
                 f"over seeds{below}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def update_results_md(path: Path, block: str) -> None:
    """Replace what lies between BEGIN and END in `path` with `block`."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block to rewrite; add the two lines where the claims go")
    head, rest = text.split(BEGIN, 1)
    path.write_text(head + BEGIN + "\n" + block + END + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, default=BUDGET_FOLDERS,
                        help="result folders of group files (default: the paper-base budgets in experiments/results)")
    parser.add_argument("--plots", type=Path, help="write claims.md and gap-vs-tokens.png here")
    parser.add_argument("--results-md", type=Path, help="rewrite the claims block of this file (docs/RESULTS.md)")
    parser.add_argument("--missing", type=int, metavar="SEEDS",
                        help="print nothing else: for each corpus the records read, the runs (config, seed) that would "
                             "give every claim this many paired seeds there, fewest first, with their commands")
    args = parser.parse_args(argv)
    runs = load_runs(args.folders)
    if args.missing is not None:
        if args.missing < 1:
            parser.error(f"--missing {args.missing}: give the number of paired seeds each claim should have, >= 1")
        print(missing_text(runs, args.missing))
        return 0
    plot_path = None
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        plot_gaps(runs, args.plots / "gap-vs-tokens.png")
        plot_path = (args.plots / "gap-vs-tokens.png").resolve()
    text = report(runs)
    print(text)
    if args.plots:
        (args.plots / "claims.md").write_text(text)
    if args.results_md:  # the plot linked from where the Markdown file is
        shown = os.path.relpath(plot_path, args.results_md.resolve().parent) if plot_path else None
        update_results_md(args.results_md, report(runs, shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
