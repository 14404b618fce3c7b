"""`egmla bench generate`: end-to-end generation speed per variant, decode path and batch size.

For each configuration: prefill a batch of prompts, then decode `--new-tokens` tokens per sequence
through `GenerationEngine` (greedy, EOS ignored, so every run does the same work). Reported: prefill
time, per-step latency (median and p90, host sync to host sync, so it is wall time on GPU too),
decode tokens/s, cache size and peak device memory. Medians over `--repeats` runs after one warm-up.

Prompt ids come from real text (DESIGN.md §4: EG-MLA's gate-row traffic depends on how often ids
repeat): windows of the embedded English corpus, tokenized with the run's tokenizer or, for random
weights, with a BPE of the model's vocab size trained on the corpus (egmla.bench.token_ids).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="tiny", help="model shape with random weights: tiny, paper-base, paper-1b")
    source.add_argument("--run", help="benchmark a trained run directory instead of random weights")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model field of the preset, e.g. --set max_seq_len=4096 (repeatable)")
    parser.add_argument("--all-variants", action="store_true",
                        help="also benchmark the same shape as MHA, GQA, MLA and EG-MLA (egmla.accounting.variant_configs)")
    parser.add_argument("--paths", default="all",
                        help="comma-separated decode paths; 'all' = every path each variant supports")
    parser.add_argument("--batch-sizes", default="1,4,16", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per configuration (after a warm-up)")
    parser.add_argument("--offload-gate-tables", action="store_true", help="EG-MLA rows: gate tables in host memory")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ...; auto = cuda if available")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto = bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write the results as JSON here")


def run_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` ids: consecutive windows of the embedded corpus in the run's tokenizer."""
    from egmla.data.corpora import embedded_documents

    ids: list[int] = []
    for _, text in embedded_documents():
        ids += tokenizer.encode(text).ids
        if len(ids) >= count * length:
            return [ids[i * length:(i + 1) * length] for i in range(count)]
    raise ValueError(f"--prompt-len {length} x batch {count}: the corpus has only {len(ids)} tokens")


def bench_one(engine, prompts, new_tokens: int, repeats: int, device) -> dict:
    """One warm-up run, then `repeats` runs; medians of the per-run figures."""
    import torch

    from egmla.infer.sampling import SamplingParams

    engine.generate(prompts, max_new_tokens=new_tokens, sampling=SamplingParams())  # same shapes: JIT, autotune
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(repeats):
        engine.generate(prompts, max_new_tokens=new_tokens, sampling=SamplingParams())
        runs.append(engine.last_stats)
    steps = sorted(s for stats in runs for s in stats.step_seconds)
    return {
        "prefill_ms": 1e3 * statistics.median(s.prefill_seconds for s in runs),
        "step_ms_median": 1e3 * statistics.median(steps) if steps else None,
        "step_ms_p90": 1e3 * steps[int(0.9 * (len(steps) - 1))] if steps else None,
        "decode_tokens_per_s": statistics.median(s.decode_tokens_per_second for s in runs),
        "cache_mb": runs[0].cache_bytes / 1e6,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None,
    }


def main(args) -> int:
    import torch

    from egmla.accounting import variant_configs
    from egmla.attention import decode_paths
    from egmla.config import preset
    from egmla.configfile import parse_overrides
    from egmla.infer.cli import resolve_device_dtype
    from egmla.infer.engine import GenerationEngine
    from egmla.infer.offload import OFFLOADABLE_PATHS
    from egmla.model import Transformer
    from egmla.runs import atomic_write_json

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if min(batch_sizes) < 1 or args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1:
        raise ValueError("--batch-sizes, --prompt-len, --repeats must be >= 1 and --new-tokens >= 2")
    if args.run:
        from egmla.runs import load_model, load_tokenizer

        trained, _ = load_model(args.run, device=device, dtype=dtype)
        base, source = trained.config, f"run {args.run}"
        prompts = run_prompts(load_tokenizer(args.run), max(batch_sizes), args.prompt_len)
    else:
        from egmla.bench.token_ids import text_token_ids

        trained = None
        base = preset(args.preset, **parse_overrides(args.overrides, section="model"))
        source = f"preset {args.preset}, random weights"
        prompts = text_token_ids(max(batch_sizes), args.prompt_len, base.vocab_size)[0].tolist()
    if args.prompt_len + args.new_tokens > base.max_seq_len:
        raise ValueError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds max_seq_len="
                         f"{base.max_seq_len}: shorten them or --set max_seq_len=...")
    configs = variant_configs(base) if args.all_variants and trained is None else [base]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"egmla bench generate: {source}; {device_name}, {dtype}; prompt {args.prompt_len} + "
          f"{args.new_tokens} new tokens, greedy; torch {torch.__version__}")
    rows: list[dict] = []
    meta = {"benchmark": "generate", "source": source, "device": device_name, "dtype": str(dtype),
            "torch": torch.__version__, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    for config in configs:
        torch.manual_seed(0)
        with torch.device(device):
            model = trained if trained is not None else Transformer(config).to(dtype)
        wanted = decode_paths(config) if args.paths == "all" else [p for p in args.paths.split(",")
                                                                     if p in decode_paths(config)]
        for path in wanted:
            offload = args.offload_gate_tables and config.is_gated and path in OFFLOADABLE_PATHS
            engine = GenerationEngine(model, decode_path=path, offload_gate_tables=offload)
            for batch in batch_sizes:
                row = {"variant": config.variant_name(), "decode_path": path, "batch": batch,
                       "offloaded_gate_tables": offload}
                try:
                    row.update(bench_one(engine, prompts[:batch], args.new_tokens, args.repeats, device))
                    if engine.offload is not None:
                        row["gate_table_mb_off_device"] = engine.offload.bytes_saved() / 1e6
                except Exception as err:  # noqa: BLE001 - a path that fails here is reported, the rest still run
                    row["error"] = f"{type(err).__name__}: {err}"[:300]
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(format_row(row), flush=True)
                if args.json_path:  # after every row, so a run cut short keeps what it measured
                    atomic_write_json(args.json_path, meta)
            if engine.offload is not None:
                engine.offload.restore()  # the next path may need the tables on the device
        del model
    if args.json_path:
        print(f"wrote {args.json_path}")
    return 0


def format_row(row: dict) -> str:
    head = f"{row['variant']:<24} {row['decode_path']:<11} B={row['batch']:<4}"
    if "error" in row:
        return f"{head} error: {row['error']}"
    return (f"{head} prefill {row['prefill_ms']:8.1f} ms  step {row['step_ms_median']:7.2f} ms "
            f"(p90 {row['step_ms_p90']:7.2f})  {row['decode_tokens_per_s']:9.1f} tok/s  "
            f"cache {row['cache_mb']:8.1f} MB" + (f"  peak {row['peak_memory_mb']:8.0f} MB"
                                                  if row["peak_memory_mb"] is not None else ""))
