"""`egmla bench generate-suite`: the generation table of docs/benchmarks.md in one command (paper-base
shape, random weights):

    egmla bench generate-suite                      # ~8 min on an H100; writes bench-out/bench_generate.{json,md}
    egmla bench generate-suite --out docs           # ... as docs/bench_generate.{json,md}
    egmla bench generate-suite --quick              # CPU smoke run at `tiny` (seconds)

Runs `egmla bench generate` for every attention variant of the comparison set and every decode path at batch
1, 32 and 128 (prompts of 2048 corpus tokens + 32 generated), then EG-MLA kv64 again with its gate tables
offloaded to host memory, and writes the JSON and a Markdown table (device name in the title).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "bench_generate"  # OUT/bench_generate.json and .md


def markdown(results: list[dict]) -> str:
    first = results[0]
    lines = [f"### Generation: {first['source']}, {first['device']}, {first['dtype']}, torch {first['torch']}",
             "",
             f"Prompt {first['prompt_len']} corpus tokens + {first['new_tokens']} greedy tokens per sequence; "
             f"medians of {first['repeats']} runs; step = one decode step for the whole batch (wall time).",
             "",
             "| variant | decode path | batch | prefill ms | step ms (median) | step ms (p90) | decode tokens/s "
             "| cache MB | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for r in result["rows"]:
            name = r["variant"]
            if r.get("gate_table_mb_off_device") is not None:
                name += f" (gate tables offloaded: {r['gate_table_mb_off_device']:.0f} MB off the device)"
            if "error" in r:
                lines.append(f"| {name} | {r['decode_path']} | {r['batch']} | {r['error']} |||||||")
                continue
            peak = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
            lines.append(f"| {name} | {r['decode_path']} | {r['batch']} | {r['prefill_ms']:.1f} | "
                         f"{r['step_ms_median']:.2f} | {r['step_ms_p90']:.2f} | {r['decode_tokens_per_s']:.0f} | "
                         f"{r['cache_mb']:.1f} | {peak} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny preset, short prompts: a CPU smoke run")
    parser.add_argument("--out", default="bench-out", help=f"folder for {NAME}.json and {NAME}.md")


def main(args) -> int:
    from egmla.bench.cli import run

    out = Path(args.out) / NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.quick:
        common = ["--preset", "tiny", "--batch-sizes", "1,4", "--prompt-len", "32", "--new-tokens", "16"]
        offload_batch = "4"
    else:
        common = ["--preset", "paper-base", "--set", "max_seq_len=2112", "--batch-sizes", "1,32,128",
                  "--prompt-len", "2048", "--new-tokens", "32", "--repeats", "2", "--dtype", "bf16"]
        offload_batch = "128"
    runs = [
        (["--all-variants"], ".all.json"),
        (["--offload-gate-tables", "--paths", "naive,gate-table", "--batch-sizes", offload_batch], ".offload.json"),
    ]
    results = []
    for extra, suffix in runs:
        path = out.with_suffix(suffix)
        argv = [*common, *extra, "--json", str(path)]
        print("egmla bench generate " + " ".join(argv), flush=True)
        if run("generate", argv) != 0:
            return 1
        results.append(json.loads(path.read_text()))
        path.unlink()
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out}.json and {out}.md")
    return 0
