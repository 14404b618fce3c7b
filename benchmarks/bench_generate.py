"""One command for the generation benchmark on the lent GPU (paper-base shape, random weights):

    python benchmarks/bench_generate.py                 # ~8 min on an H100; writes docs/bench_generate.{json,md}
    python benchmarks/bench_generate.py --quick         # CPU smoke run at `tiny` (seconds)

Runs `egmla bench generate` for every attention variant and decode path at batch 1, 32 and 128
(prompts of 2048 corpus tokens + 32 generated), then EG-MLA kv64 again with its gate tables offloaded
to host memory, and writes the JSON and a markdown table (device name in the title) for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from egmla.cli import main as egmla_main

ROOT = Path(__file__).resolve().parent.parent


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny preset, short prompts: a CPU smoke run")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_generate"),
                        help="output path without extension (.json and .md are written)")
    args = parser.parse_args()
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
        path = args.out + suffix
        argv = ["bench", "generate", *common, *extra, "--json", path]
        print("egmla " + " ".join(argv), flush=True)
        if egmla_main(argv) != 0:
            return 1
        results.append(json.loads(Path(path).read_text()))
    Path(args.out + ".json").write_text(json.dumps(results, indent=2) + "\n")
    for _, suffix in runs:
        Path(args.out + suffix).unlink()
    Path(args.out + ".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
