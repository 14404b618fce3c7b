"""`egmla bench generate-suite`: the generation tables of docs/benchmarks.md §2 in one command (paper-base shape,
random weights, bf16), each run with its anchors in the same process:

    egmla bench generate-suite --out docs/bench        # on a GPU: ~12 min on an H200 (or in parts: --tables)
    egmla bench generate-suite --quick                 # CPU smoke run at `tiny` (seconds)

  generate_<gpu>.json/.md/.png      MHA, MLA kv64, EG-MLA kv64 (kernel, grouped) at batch 1, 32, 128, prompts of
                                   2,048 tokens + 32 generated, beside transformers' Llama and DeepSeek-V3 (the
                                   PNG: tokens/s as bars)
  generate_<gpu>_fill.json/.md     the largest batch whose cache fits 60 GB at 4,096 positions, beside Llama's
  generate_<gpu>_profile.json/.md  the decode step profiled at batch 32 and 128 (kernel time, costliest kernels)
  generate_<gpu>_paths.json/.md    every decode path at batch 1, 32, 128 with CUDA graphs, and two paths eagerly
  generate_<gpu>_control.json/.md  issue 18's same-table control (`egmla-kv64-bias`) on its `absorbed` path (MLA's
                                   absorbed decode plus a term per distinct id) and `gate-table`, beside MLA kv64
                                   and EG-MLA kv64 on `kernel` and Llama, at batch 1, 32, 128
  generate_<gpu>_control_fill...   the control on `absorbed` at full memory, beside MLA kv64 and Llama (`control-fill`:
                                   Llama's 60 GB anchor needs more than an 80 GB card)
  generate_<gpu>_crossover.md      EG-MLA kv64 `kernel` against `grouped` at prompts of 512, 2,048 and 8,192 tokens
  (+ generate_<gpu>_crossover/)    and batch 1-64: the data behind `decode_path="auto"`'s threshold (one JSON each)
  generate_<gpu>_calls.json/.md    successive generate() calls of decreasing length on one engine, the kept cache
                                   and graphs reused or not (`egmla bench calls`)
  generate_<gpu>_switch.json/.md   calls alternating between batch 32 and 4 (EG-MLA's `grouped` and `kernel` under
                                   decode_path="auto"), one cache and both paths' graphs kept or made again at
                                   each change (`egmla bench calls --batches`)
  generate_<gpu>_prefill.json/.md  prompt prefill per variant, batch 1, 32, 128 and prefill token budget, beside
                                   Llama's (`egmla bench prefill`)

`--tables control,control-fill` (or any comma-separated subset of main, fill, profile, paths, control, control-fill,
crossover, calls, switch, prefill) runs only those.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path


TABLES = {"main": ("",), "fill": ("_fill",), "profile": ("_profile",), "paths": ("_paths",),
          "control": ("_control",), "control-fill": ("_control_fill",), "crossover": (), "calls": (), "switch": (),
          "prefill": ()}  # --tables name -> its files


def crossover_runs(quick: bool) -> dict[int, list[str]]:
    """{prompt length: argv of its `egmla bench generate` run} for the crossover table."""
    if quick:
        return {length: ["--preset", "tiny", "--set", "max_seq_len=64", "--prompt-len", str(length), "--new-tokens",
                         "3", "--repeats", "1", "--variants", "egmla-kv64", "--paths", "kernel,grouped",
                         "--batch-sizes", "1,2"] for length in (16, 32)}
    return {length: ["--preset", "paper-base", "--set", f"max_seq_len={length + 64}", "--prompt-len", str(length),
                     "--new-tokens", "32", "--repeats", "2", "--dtype", "bf16", "--variants", "egmla-kv64",
                     "--paths", "kernel,grouped", "--batch-sizes", batches]
            for length, batches in ((512, "1,2,4,8,16,32,64"), (2048, "1,2,4,8,16,32,64"), (8192, "1,2,4,8,16"))}


def calls_run(quick: bool) -> list[str]:
    """argv of the `egmla bench calls` run."""
    if quick:
        return ["--preset", "tiny", "--lengths", "24,16", "--batch", "2", "--new-tokens", "3"]
    return ["--preset", "paper-base", "--dtype", "bf16"]


def switch_run(quick: bool) -> list[str]:
    """argv of the `egmla bench calls` run that alternates batch sizes (and so, under "auto", EG-MLA's path)."""
    if quick:
        return ["--preset", "tiny", "--variants", "egmla-kv64", "--lengths", "16", "--batches", "2,1,2,1",
                "--new-tokens", "3"]
    return ["--preset", "paper-base", "--dtype", "bf16", "--variants", "egmla-kv64", "--lengths", "2048",
            "--batches", "32,4,32,4,32,4"]


def prefill_run(quick: bool) -> list[str]:
    """argv of the `egmla bench prefill` run."""
    if quick:
        return ["--preset", "tiny", "--prompt-len", "16", "--batch-sizes", "1,4", "--budgets", "16,64",
                "--repeats", "1"]
    return ["--preset", "paper-base", "--dtype", "bf16", "--paths", "kernel,grouped", "--compare-hf"]


# tables that are one run of their own benchmark: table -> (benchmark, argv)
STANDALONE = {"calls": ("calls", calls_run), "switch": ("calls", switch_run), "prefill": ("prefill", prefill_run)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny preset, short prompts: a CPU smoke run")
    parser.add_argument("--out", default="bench-out", help="folder for the JSON and Markdown files")
    parser.add_argument("--tables", default="all",
                        help=f"comma-separated tables to run: {', '.join(TABLES)} (default: all of them)")


def suite(quick: bool) -> dict[str, list[list[str]]]:
    """{file suffix: [argv of each `egmla bench generate` run merged into that table]}."""
    if quick:
        shape = ["--preset", "tiny", "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1"]
        fill = ["--preset", "tiny", "--fill-memory", "0.002", "--context", "64", "--new-tokens", "4", "--repeats", "1"]
        batches = "1,4"
    else:
        shape = ["--preset", "paper-base", "--set", "max_seq_len=2112", "--prompt-len", "2048", "--new-tokens", "32",
                 "--repeats", "2", "--dtype", "bf16"]
        fill = ["--preset", "paper-base", "--set", "max_seq_len=4096", "--fill-memory", "60", "--context", "4096",
                "--new-tokens", "8", "--repeats", "1", "--dtype", "bf16"]
        batches = "1,32,128"
    main_variants = ["--variants", "mha,mla-kv64,egmla-kv64", "--paths", "kernel,grouped"]
    profiled = ["--batch-sizes", batches.split(",", 1)[-1], "--profile"]
    return {
        "": [[*shape, *main_variants, "--batch-sizes", batches, "--compare-hf"]],
        "_fill": [[*fill, "--variants", "mla-kv64,egmla-kv64", "--paths", "kernel,grouped", "--compare-hf"]],
        "_profile": [[*shape, *main_variants, *profiled]],
        "_paths": [[*shape, "--variants", "mha,mla-kv64,egmla-kv64", "--paths", "all", "--batch-sizes", batches],
                   [*shape, "--variants", "mla-kv64,egmla-kv64", "--paths", "kernel,grouped",
                    "--batch-sizes", batches.split(",")[1], "--eager"]],
        "_control": [[*shape, "--variants", "mla-kv64,egmla-kv64", "--paths", "kernel", "--batch-sizes", batches,
                      "--compare-hf"],
                     [*shape, "--variants", "egmla-kv64-bias", "--paths", "absorbed,gate-table",
                      "--batch-sizes", batches, "--compare-hf"]],  # each run its own anchors: Llama moves per process
        "_control_fill": [[*fill, "--variants", "mla-kv64", "--paths", "kernel", "--compare-hf"],
                          [*fill, "--variants", "egmla-kv64-bias", "--paths", "absorbed", "--compare-hf"]],
    }


def gpu_tag(name: str) -> str:
    """The model in a CUDA device name, for file names: "NVIDIA H100 80GB HBM3" -> "h100" (its last word, "hbm3",
    named an H100's files until 2026-12-05), "NVIDIA A100-SXM4-80GB" -> "a100", "NVIDIA H200" -> "h200"."""
    words = re.split(r"[\s-]+", name.strip())
    model = next((w for w in words if re.search(r"\d", w) and not re.fullmatch(r"\d+GB", w, re.I)), words[-1])
    return model.lower()


def main(args) -> int:
    import torch

    from egmla.bench.cli import run
    from egmla.bench.generate import crossover_report, report

    device = gpu_tag(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu"
    wanted = list(TABLES) if args.tables == "all" else [t.strip() for t in args.tables.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TABLES]
    if unknown or not wanted:
        raise SystemExit(f"egmla bench generate-suite: --tables {args.tables!r}: choose from {', '.join(TABLES)} "
                         f"or all")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "crossover" in wanted:
        folder = out / f"generate_{device}_crossover"
        folder.mkdir(exist_ok=True)
        files = []
        for length, argv in crossover_runs(args.quick).items():
            files.append(str(folder / f"crossover_p{length}.json"))
            print("egmla bench generate " + " ".join(argv), flush=True)
            if run("generate", [*argv, "--json", files[-1]]) != 0:
                return 1
        crossover_report(files, str(folder.with_suffix(".md")))
    for name in (t for t in wanted if t in STANDALONE):
        (benchmark, argv_of), stem = STANDALONE[name], out / f"generate_{device}_{name}"
        argv = argv_of(args.quick)
        print(f"egmla bench {benchmark} " + " ".join(argv), flush=True)
        if run(benchmark, [*argv, "--json", str(stem.with_suffix(".json")), "--markdown", str(stem.with_suffix(".md"))]):
            return 1
    tables = suite(args.quick)
    for suffix, runs in ((suffix, tables[suffix]) for t in wanted for suffix in TABLES[t]):
        stem = out / f"generate_{device}{suffix}"
        parts = []
        for index, argv in enumerate(runs):
            part = stem.with_name(f"{stem.name}.part{index}.json") if len(runs) > 1 else stem.with_suffix(".json")
            print("egmla bench generate " + " ".join(argv), flush=True)
            if run("generate", [*argv, "--json", str(part)]) != 0:
                return 1
            parts.append(part)
        report([str(p) for p in parts], str(stem.with_suffix(".md")), str(stem.with_suffix(".png")) if not suffix else None)
        if len(parts) > 1:  # keep one JSON per table: the eager run's rows joined to the graph run's
            import json

            from egmla.bench.generate import merge_runs

            metas = [json.loads(p.read_text()) for p in parts]
            metas[0]["rows"] = merge_runs(metas)  # tagged by run: each row keeps its own run's anchor
            stem.with_suffix(".json").write_text(json.dumps(metas[0], indent=2) + "\n")
            for part in parts:
                part.unlink()
    return 0
