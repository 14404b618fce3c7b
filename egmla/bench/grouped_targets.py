"""Issue 17's targets read from `egmla bench grouped` result files, as one Markdown table (a column per run, newest
first), so that docs/benchmarks.md §1 links to figures generated from the JSON instead of typing them:

    egmla bench grouped --targets docs/bench/grouped_h200_targets.md docs/bench/grouped_h200_gluon.json \
        docs/bench/grouped_h200_gatedot.json

Each target names the rows it reads; a run without them shows "-". The status column judges the first run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from egmla.bench.grouped_study import IN_STEP
from egmla.bench.options import read_result


@dataclass(frozen=True)
class Target:
    label: str
    goal: float
    read: Callable[[dict], tuple[float, str] | None]  # result file -> (value, cell text) or None
    at_most: bool = False  # the goal is an upper bound (a time ratio), not a lower one


def _row(data: dict, variant: str, paths: tuple[str, ...], text: str, batch: int, context: int) -> dict | None:
    """The first of `paths` measured at (text, batch, context) with equal lengths."""
    for path in paths:
        for r in data["rows"]:
            if (r["variant"], r["path"], r["text"], r["batch"], r["context"]) == (variant, path, text, batch, context) \
                    and r.get("lengths", "equal") == "equal" and "median_us" in r:
                return r
    return None


def _grouped(data: dict, text: str, batch: int, context: int) -> dict | None:
    """EG-MLA kv64 grouped as generation runs it: `grouped-graph` (graph-replayed plan) where the run has it."""
    return _row(data, "EG-MLA kv64", ("grouped-graph", "grouped"), text, batch, context)


def _mla(data: dict, batch: int, context: int) -> dict | None:
    """MLA kv64's decode as the model runs it (`kernel-core`, absorption folded) where the run has it."""
    return _row(data, "MLA kv64", ("kernel-core", "kernel"), "python-source", batch, context)


def _grouped_vs_mha(text: str, batch: int, context: int, step: str = ""):
    """step " in-step": the rows timed as the layers of a step (`egmla bench grouped --in-step N`)."""
    def read(data):
        r = (_row(data, "EG-MLA kv64", ("grouped-graph" + step,), text, batch, context) if step
             else _grouped(data, text, batch, context))
        if r is None or "x_mha_with_plan" not in r:
            return None
        mha = _row(data, "MHA", ("sdpa" + step,), "python-source", batch, context)
        vs = f" vs {mha['median_us']:,.1f}" if mha else ""
        return r["x_mha_with_plan"], f"{r['x_mha_with_plan']:.2f}× ({r['median_us_with_plan']:,.1f}{vs} µs)"
    return read


def _grouped_vs_mla(data):
    r, mla = _grouped(data, "python-source", 32, 4096), _mla(data, 32, 4096)
    if r is None or mla is None or "median_us_with_plan" not in r:
        return None
    ratio = r["median_us_with_plan"] / mla["median_us"]
    return ratio, f"{ratio:.1f}× MLA's {mla['median_us']:.1f} µs"


def _mla_vs_mha(step: str = ""):
    def read(data):
        r = _row(data, "MLA kv64", ("kernel-core" + step,), "python-source", 32, 4096) if step else _mla(data, 32, 4096)
        if r is None or "x_mha" not in r:
            return None
        return r["x_mha"], f"{r['x_mha']:.2f}× ({r['median_us']:.1f} µs, `{r['path']}`)"
    return read


def _mla_bandwidth(data):
    r, copy = _mla(data, 128, 16384), data["meta"].get("copy_gbs")
    if r is None or not copy:
        return None
    share = r["gbytes_per_s"] / copy
    return share, f"{100 * share:.1f}% ({r['gbytes_per_s'] / 1000:.2f} of {copy / 1000:.2f} TB/s, {r['median_us']:.1f} µs)"


TARGETS = (
    Target("EG-MLA kv64 grouped, plan included, ≥ 3× MHA SDPA (code, B = 32, T = 4,096)", 3.0,
           _grouped_vs_mha("python-source", 32, 4096)),
    Target("… ≥ 2× MHA SDPA on English ids", 2.0, _grouped_vs_mha("embedded", 32, 4096)),
    Target("… ≥ 5× MHA SDPA at B = 128, T = 16,384 (code)", 5.0, _grouped_vs_mha("python-source", 128, 16384)),
    Target("… within 2× of MLA kv64's time (code, B = 32, T = 4,096)", 2.0, _grouped_vs_mla, at_most=True),
    Target("MLA kv64 ≥ 5× MHA SDPA (B = 32, T = 4,096)", 5.0, _mla_vs_mha()),
    Target("MLA kv64 ≥ 85% of the run's copy bandwidth (B = 128, T = 16,384)", 0.85, _mla_bandwidth),
    # the same two ratios per layer inside a step: 12 layers, each over its own cache, in one graph (--in-step), where
    # a graph replay's fixed cost is paid once per step as in generation, not once per layer
    Target("*in a step:* EG-MLA kv64 grouped, plan included, ≥ 3× MHA SDPA (code, B = 32, T = 4,096)", 3.0,
           _grouped_vs_mha("python-source", 32, 4096, IN_STEP)),
    Target("*in a step:* MLA kv64 ≥ 5× MHA SDPA (B = 32, T = 4,096)", 5.0, _mla_vs_mha(IN_STEP)),
)


def status(target: Target, value: float | None) -> str:
    if value is None:
        return "not in the run"
    met = value <= target.goal if target.at_most else value >= target.goal
    if met:
        return "**met**"
    gap = value / target.goal if target.at_most else target.goal / value
    return f"**missed** by {gap:.2f}×"


def write_targets(md_path: str, json_paths: list[str]) -> None:
    runs = [read_result(p, "--targets") for p in json_paths]
    where = Path(md_path).resolve().parent  # links relative to the table
    names = [f"{run['meta'].get('time', '?')[:16]} ([JSON]({os.path.relpath(Path(p).resolve(), where)}))"
             for run, p in zip(runs, json_paths)]
    device = runs[0]["meta"].get("device", "?")
    lines = [f"<!-- generated by `egmla bench grouped --targets {md_path} {' '.join(json_paths)}`: edit the runs, "
             f"not this table -->",
             f"Issue 17's targets on {device}, paper-base, bf16, one layer, CUDA-graph replays, equal lengths; one "
             f"column per run, the status judges the first. Grouped: `grouped-graph` plus its graph-replayed plan's "
             f"share per layer (`grouped` plus the eager plan where a run has no graph row); MLA kv64: `kernel-core` "
             f"(absorption folded into the projections) where the run has it, else `kernel`. Rows *in a step*: the "
             f"same paths as 12 layers, each over its own cache, in one graph, per layer (`--in-step 12`).", "",
             "| target | " + " | ".join(names) + " | status |",
             "|---|" + "---|" * len(runs) + "---|"]
    for target in TARGETS:
        cells = [target.read(run) for run in runs]
        lines.append(f"| {target.label} | " + " | ".join(c[1] if c else "-" for c in cells) + " | "
                     + status(target, cells[0][0] if cells[0] else None) + " |")
    Path(md_path).write_text("\n".join(lines) + "\n")
