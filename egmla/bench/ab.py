"""A/B of code versions from `egmla bench generate` result files: the same command run alternately with each
version (e.g. `PYTHONPATH=old/ ...` and the working tree, twice each, in one session on one GPU), every file named
LABEL=JSON. The table gives each label's step medians run by run, their median, and each label's median over the
first label's, per (variant, decode path, batch): whether a change moved the step beyond the run-to-run spread."""
from __future__ import annotations

import json
import statistics
from pathlib import Path


def parse_labelled(items: list[str]) -> dict[str, list[dict]]:
    """{label: [result file, ...]} in the order given, from 'LABEL=PATH' items."""
    runs: dict[str, list[dict]] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--ab: {item!r} is not LABEL=JSON (e.g. old=gen_old_1.json)")
        runs.setdefault(label, []).append(json.loads(Path(path).read_text()))
    devices = {meta["device"] for metas in runs.values() for meta in metas}
    if len(devices) > 1:
        raise ValueError(f"--ab: the files come from several devices ({', '.join(sorted(devices))}): an A/B needs one")
    return runs


def ab_table(runs: dict[str, list[dict]]) -> str:
    labels = list(runs)
    steps: dict[tuple, dict[str, list[float]]] = {}
    for label, metas in runs.items():
        for meta in metas:
            for row in meta["rows"]:
                if "error" not in row:
                    key = (row["variant"], row["decode_path"], row["batch"])
                    steps.setdefault(key, {}).setdefault(label, []).append(row["step_ms_median"])
    first = next(iter(runs.values()))[0]
    lines = [f"A/B of code versions on {first['device']}, {first['dtype']}: {first['source']}; prompts of "
             f"{first['prompt_len']} tokens, {first['new_tokens']} new; step ms (CUDA-graph replay) of each run in the "
             f"order run, then the median; ratio = a label's median over `{labels[0]}`'s (< 1: faster).", "",
             "| variant | path | batch | " + " | ".join(f"{label} step ms" for label in labels) + " | "
             + " | ".join(f"{label} ÷ {labels[0]}" for label in labels[1:]) + " |",
             "|---|---|---:|" + "---|" * len(labels) + "---:|" * (len(labels) - 1)]
    for (variant, path, batch), by_label in sorted(steps.items(), key=lambda item: (item[0][0], item[0][1], item[0][2])):
        medians = {label: statistics.median(xs) for label, xs in by_label.items()}
        cells = [" ".join(f"{x:.3f}" for x in by_label[label]) + f" (**{medians[label]:.3f}**)"
                 if label in by_label else "-" for label in labels]
        ratios = [f"{medians[label] / medians[labels[0]]:.3f}" if label in medians and labels[0] in medians else "-"
                  for label in labels[1:]]
        lines.append(f"| {variant} | {path} | {batch} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"
