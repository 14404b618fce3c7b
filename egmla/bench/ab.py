"""A/B of code versions from `egmla bench generate` result files: the same command run alternately with each
version, twice or more each, in one session on one GPU, every file named LABEL=JSON. The table gives each label's
step medians run by run, their median, and each label's median over the first label's, per (variant, decode path,
batch): whether a change moved the step beyond the run-to-run spread. Runs made with `--profile` add each label's
kernel time and launches per step and the kernels whose time moved most: what the change is made of.

`egmla bench ab` (egmla/bench/ab_run.py) makes such runs and this table in one command. By hand, run each version
from its own tree's root, `(cd OLD_TREE && python3 -m egmla bench generate ...)`: `python -m`
puts the current directory first on sys.path, so `PYTHONPATH=OLD_TREE python3 -m egmla` run from this repository
imports this repository's egmla, whatever PYTHONPATH says. Every result file records which code ran
(`code_identity`: a hash of the package's sources and the EGMLA_* settings), and the table refuses two labels that
ran the same code: three A/Bs were lost that way before the check existed (docs/NOTES.md)."""
from __future__ import annotations

import hashlib
import os
import statistics
from pathlib import Path

from egmla.bench.options import read_result
from egmla.stats import runs_apart


def code_identity() -> dict:
    """Which code a benchmark process ran: the imported egmla package's folder, a SHA-256 over its Python sources
    (relative path and bytes, in path order) and the EGMLA_* environment settings that switch code paths."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + b"\0" + source.read_bytes() + b"\0")
    return {"package": str(package), "source_sha256": digest.hexdigest(),
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("EGMLA_")}}


def _identity_key(meta: dict) -> tuple | None:
    code = meta.get("code")
    return None if code is None else (code["source_sha256"], tuple(sorted(code["env"].items())))


def check_versions(runs: dict[str, list[dict]]) -> None:
    """Refuse an A/B whose labels ran the same code, or whose one label ran several. Files from before the code was
    recorded pass (the table says so rather than vouch for them)."""
    seen: dict[tuple, str] = {}
    for label, metas in runs.items():
        keys = {_identity_key(meta) for meta in metas}
        if keys == {None}:
            continue
        if len(keys) > 1:
            raise ValueError(f"--ab: the files labelled {label!r} ran different code (source hashes or EGMLA_* "
                             f"settings differ): give each version its own label")
        key = keys.pop()
        if key in seen:
            raise ValueError(
                f"--ab: labels {seen[key]!r} and {label!r} ran the same code (source sha256 {key[0][:12]}, EGMLA_* "
                f"settings {dict(key[1]) or 'none'}): run each version from its own tree's root, e.g. "
                f"`(cd OLD_TREE && python3 -m egmla bench generate ...)`; `python -m` puts the current directory "
                f"ahead of PYTHONPATH")
        seen[key] = label


def parse_labelled(items: list[str]) -> dict[str, list[dict]]:
    """{label: [result file, ...]} in the order given, from 'LABEL=PATH' items."""
    runs: dict[str, list[dict]] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--ab: {item!r} is not LABEL=JSON (e.g. old=gen_old_1.json)")
        runs.setdefault(label, []).append(read_result(path, f"--ab {label}="))
    devices = {meta["device"] for metas in runs.values() for meta in metas}
    if len(devices) > 1:
        raise ValueError(f"--ab: the files come from several devices ({', '.join(sorted(devices))}): an A/B needs one")
    check_work(runs)
    check_versions(runs)
    return runs


# what a generate run's work is (the rows are matched by variant, path and batch only): files that differ in any of
# these timed different work, and their ratio would be read as the code's doing
WORK = ("dtype", "source", "torch", "prompt_len", "new_tokens", "fill_memory_gb", "context", "overlap_host")


def check_work(runs: dict[str, list[dict]]) -> None:
    """Refuse files that ran different work (prompt length, new tokens, dtype, model, torch, memory fill, host overlap):
    an A/B compares code on the same command, as `egmla bench ab` runs it."""
    first = next(iter(runs.values()))[0]
    for label, metas in runs.items():
        for meta in metas:
            differing = [k for k in WORK if meta.get(k) != first.get(k)]
            if differing:
                raise ValueError(f"--ab: a file labelled {label!r} ran other work than the first file ("
                                 + ", ".join(f"{k} {meta.get(k)!r} vs {first.get(k)!r}" for k in differing)
                                 + "): an A/B times one command with each code version")


def _code_note(metas: list[dict]) -> str:
    key = _identity_key(metas[0])
    if key is None:
        return "not recorded (files older than the check)"
    return f"sources {key[0][:12]}" + (f", {', '.join(f'{k}={v}' for k, v in key[1])}" if key[1] else "")


def _step_timing(runs: dict[str, list[dict]]) -> str:
    """How the steps were timed, from the rows' cuda_graphs (False on a CPU or with --eager); rows older than that
    field keep the header such tables always had."""
    graphs = {row.get("cuda_graphs", True) for metas in runs.values() for meta in metas for row in meta["rows"]
              if "error" not in row}
    return {frozenset({True}): "CUDA-graph replay", frozenset({False}): "eager"}.get(frozenset(graphs),
                                                                                     "CUDA-graph replay or eager")


def ab_table(runs: dict[str, list[dict]]) -> str:
    labels = list(runs)
    steps: dict[tuple, dict[str, list[float]]] = {}
    failed: dict[tuple, dict[str, int]] = {}  # runs whose row errored, per key and label: said, not left out
    for label, metas in runs.items():
        for meta in metas:
            for row in meta["rows"]:
                key = (row["variant"], row["decode_path"], row["batch"])
                if "error" not in row:
                    steps.setdefault(key, {}).setdefault(label, []).append(row["step_ms_median"])
                else:
                    steps.setdefault(key, {})
                    failed.setdefault(key, {})[label] = failed.get(key, {}).get(label, 0) + 1
    first, timing = next(iter(runs.values()))[0], _step_timing(runs)
    lines = [f"A/B of code versions on {first['device']}, {first['dtype']}: {first['source']}; prompts of "
             f"{first['prompt_len']} tokens, {first['new_tokens']} new; step ms ({timing}) of each run in the "
             f"order run, then the median; ratio = a label's median over `{labels[0]}`'s (< 1: faster); apart = "
             f"every run of one label beyond every run of `{labels[0]}` (no: the ratio is within the runs' spread). "
             f"Code: "
             + "; ".join(f"`{label}` {_code_note(metas)}" for label, metas in runs.items()) + ".", "",
             "| variant | path | batch | " + " | ".join(f"{label} step ms" for label in labels) + " | "
             + " | ".join(f"{label} ÷ {labels[0]} | apart" for label in labels[1:]) + " |",
             "|---|---|---:|" + "---|" * len(labels) + "---:|---|" * (len(labels) - 1)]
    for (variant, path, batch), by_label in sorted(steps.items()):
        medians = {label: statistics.median(xs) for label, xs in by_label.items()}
        errors = failed.get((variant, path, batch), {})
        cells = [(" ".join(f"{x:.3f}" for x in by_label[label]) + f" (**{medians[label]:.3f}**)"
                  if label in by_label else "") + (f"{' + ' if label in by_label else ''}{errors[label]} errored"
                                                   if label in errors else "") or "-" for label in labels]
        ratios = [f"{medians[label] / medians[labels[0]]:.3f} | {runs_apart(by_label[label], by_label[labels[0]])}"
                  if label in medians and labels[0] in medians else "- | -" for label in labels[1:]]
        lines.append(f"| {variant} | {path} | {batch} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines + _profile_lines(runs)) + "\n"


def _profile_lines(runs: dict[str, list[dict]], most: int = 4) -> list[str]:
    """Where the runs profiled their step (`--profile`): each label's kernel time and launches per step (medians over
    its runs), and the kernels whose time moved most from the first label to the last: what a step's change is made
    of, read on the device that ran it. Nothing without profiles."""
    labels = list(runs)
    profiles: dict[tuple, dict[str, list[dict]]] = {}
    for label, metas in runs.items():
        for meta in metas:
            for row in meta["rows"]:
                if "profile_kernels" in row:
                    profiles.setdefault((row["variant"], row["decode_path"], row["batch"]), {}).setdefault(
                        label, []).append(row)
    if not profiles:
        return []
    first, last = labels[0], labels[-1]
    lines = ["", f"Profiled steps (eager, torch.profiler; medians over each label's runs): kernel ms and launches per "
                 f"step, and the {most} kernels whose ms per step moved most from `{first}` to `{last}`.", "",
             "| variant | path | batch | " + " | ".join(f"{label} kernel ms / launches" for label in labels)
             + f" | moved most ({first} → {last}, ms per step) |",
             "|---|---|---:|" + "---|" * len(labels) + "---|"]
    for (variant, path, batch), by_label in sorted(profiles.items()):
        cells = [f"{statistics.median(r['profile_kernel_ms_per_step'] for r in by_label[label]):.3f} / "
                 f"{statistics.median(r['profile_kernels_per_step'] for r in by_label[label]):.0f}"
                 if label in by_label else "-" for label in labels]
        moved = ""
        if first in by_label and last in by_label:
            times = {label: _kernel_ms(by_label[label]) for label in (first, last)}
            names = sorted(set(times[first]) | set(times[last]),
                           key=lambda n: -abs(times[last].get(n, 0.0) - times[first].get(n, 0.0)))
            moved = ", ".join(f"`{n[:40]}` {times[first].get(n, 0.0):.3f} → {times[last].get(n, 0.0):.3f}"
                              for n in names[:most])
        lines.append(f"| {variant} | {path} | {batch} | " + " | ".join(cells) + f" | {moved} |")
    return lines


def _kernel_ms(rows: list[dict]) -> dict[str, float]:
    """{kernel name: median ms per step over the runs} (0 in a run that did not launch it)."""
    names = {name for row in rows for name, _, _ in row["profile_kernels"]}
    per_run = [{name: ms for name, ms, _ in row["profile_kernels"]} for row in rows]
    return {name: statistics.median(run.get(name, 0.0) for run in per_run) for name in names}
