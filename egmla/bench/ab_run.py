"""`egmla bench ab`: an A/B of code versions in one command. Each version is a source tree (a folder holding an
`egmla` package, `git:REV` exported from this repository, or `.`), optionally with EGMLA_* settings; the same
`egmla bench generate` command runs once per version per round, in an order rotated every round (a fixed order
alone moved one code by up to ~6%: docs/bench/ab_h200_same_code/), each run from its own tree's root so that
`python -m` imports that tree's egmla (run from elsewhere it would import the current directory's), and the table of
egmla/bench/ab.py is written from the runs' JSON:

    egmla bench ab --version old=git:HEAD~1 --version new=. --rounds 3 --out ab-out -- \\
        --preset paper-base --prompt-len 2048 --new-tokens 16 --variants mla-kv64 --batch-sizes 1,32,128
    egmla bench ab --version atomic=. --version grouped=.,EGMLA_BIAS_MASS=grouped -- ...

The runs' JSON and logs, the exported trees and table.md go to --out."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="append", required=True, metavar="LABEL=SOURCE[,KEY=VALUE...]",
                        help="a code version (give two or more; the first is the baseline of the ratios): SOURCE is a "
                             "folder holding an `egmla` package, `.` for this working tree, or git:REV for a commit of "
                             "the repository around this working tree (exported with `git archive` under --out); "
                             "KEY=VALUE settings (EGMLA_* only) go into that version's environment")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs per version; the order of the versions rotates by one each round")
    parser.add_argument("--out", default="bench-out/ab", help="folder for the runs' JSON and logs, the exported "
                        "trees and table.md")
    parser.add_argument("--timeout", type=float, default=None, help="seconds one run may take (none: no limit)")
    parser.add_argument("generate_args", nargs=argparse.REMAINDER,
                        help="after `--`: the `egmla bench generate` arguments every run gets (not --json)")


def parse_version(text: str) -> tuple[str, str, dict[str, str]]:
    """'LABEL=SOURCE[,KEY=VALUE...]' -> (label, source, settings)."""
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest or not label.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"--version {text!r}: expected LABEL=SOURCE[,KEY=VALUE...] with a label of letters, digits, "
                         "'-' or '_' (e.g. old=git:HEAD~1, new=., grouped=.,EGMLA_BIAS_MASS=grouped)")
    source, *pairs = rest.split(",")
    settings = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.startswith("EGMLA_"):
            raise ValueError(f"--version {text!r}: setting {pair!r} is not EGMLA_NAME=VALUE")
        settings[key] = value
    return label, source, settings


def resolve_tree(label: str, source: str, out: Path) -> Path:
    """The root a version runs from: its folder, or a commit exported under out/trees/LABEL."""
    if source.startswith("git:"):
        rev = source[4:]
        repo = Path(__file__).resolve().parents[2]
        tree = out / "trees" / label
        if tree.exists():  # an earlier export of another commit: files it had and this one lacks must not survive
            shutil.rmtree(tree)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "egmla", "pyproject.toml"],
                                 capture_output=True, check=False)
        if archive.returncode != 0:
            raise ValueError(f"--version {label}=git:{rev}: `git archive {rev}` failed in {repo}: "
                             f"{archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        return tree.resolve()
    tree = Path(source).resolve()
    if not (tree / "egmla" / "__init__.py").is_file():
        raise ValueError(f"--version {label}={source}: {tree} holds no egmla package (egmla/__init__.py); give a "
                         "checkout's root, `.` or git:REV")
    return tree


def main(args) -> int:
    from egmla.bench.ab import ab_table, parse_labelled
    from egmla.bench.generate import write_table

    versions = [parse_version(v) for v in args.version]
    labels = [label for label, _, _ in versions]
    if len(versions) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"--version: give two or more versions with distinct labels (got {labels})")
    if args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds}: must be >= 1")
    generate_args = [a for a in args.generate_args if a != "--"]
    if any(a == "--json" or a.startswith("--json=") for a in generate_args):
        raise ValueError("the generate arguments must not hold --json: each run's file goes to --out")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trees = {label: resolve_tree(label, source, out) for label, source, _ in versions}
    files: dict[str, list[str]] = {label: [] for label in labels}
    for rnd in range(1, args.rounds + 1):
        shift = (rnd - 1) % len(versions)
        for label, _, settings in versions[shift:] + versions[:shift]:
            json_path = (out / f"gen_{label}_{rnd}.json").resolve()
            log_path = out / f"gen_{label}_{rnd}.log"
            env = {k: v for k, v in os.environ.items() if not k.startswith("EGMLA_")}
            env.update(settings, PYTHONPATH=str(trees[label]))
            command = [sys.executable, "-m", "egmla", "bench", "generate", *generate_args, "--json", str(json_path)]
            print(f"round {rnd}: {label} ({trees[label]}{', ' if settings else ''}"
                  f"{', '.join(f'{k}={v}' for k, v in settings.items())})", flush=True)
            with open(log_path, "w") as log:
                done = subprocess.run(command, cwd=trees[label], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=args.timeout, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{label}, round {rnd}: `egmla bench generate` exited {done.returncode}; its output "
                                   f"is in {log_path}")
            files[label].append(str(json_path))
    items = [f"{label}={path}" for label in labels for path in files[label]]
    return write_table(ab_table(parse_labelled(items)), str(out / "table.md"))
