"""`egmla bench prefill`: the time to put a batch of prompts into the cache (prompts in, first token of every
sequence out), per variant, decode path, batch and `prefill_token_budget` (the prompt tokens of one forward call),
beside transformers' Llama at the same shape (`--compare-hf`). The budget trades activation memory for fewer,
larger calls; this table is what chose the engine's default.

Per configuration: one warm-up call (kernels compile), then the median of `--repeats` calls on one engine."""
from __future__ import annotations

import argparse
import statistics
import time

from egmla.bench.options import add_output_arguments, add_preset_arguments, report
from egmla.configfile import int_list


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_preset_arguments(parser, fits="the prompt")
    parser.add_argument("--variants", default="mha,mla-kv64,egmla-kv64", help="comma-separated registry names")
    parser.add_argument("--paths", default="auto", help="comma-separated decode paths (the cache each path keeps "
                        "is written during prefill); auto = what generation takes on the device")
    parser.add_argument("--batch-sizes", default="1,32,128", help="comma-separated batch sizes")
    parser.add_argument("--budgets", default="8192,32768,131072",
                        help="comma-separated prefill_token_budget values (prompt tokens per forward call)")
    parser.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="measured calls per configuration")
    parser.add_argument("--compare-hf", action="store_true",
                        help="also time transformers' LlamaForCausalLM's prefill at each batch size")
    add_output_arguments(parser)


def main(args) -> int:
    if args.report:
        return report(args, markdown)
    import torch

    from egmla.bench.generate import write_table
    from egmla.attention import decode_paths
    from egmla.bench.token_ids import text_token_ids
    from egmla.config import preset
    from egmla.configfile import model_overrides
    from egmla.infer import GenerationEngine
    from egmla.infer.cli import resolve_device_dtype
    from egmla.model import Transformer
    from egmla.runs import atomic_write_json
    from egmla.variants import select

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    batches, budgets = int_list(args.batch_sizes, "--batch-sizes"), int_list(args.budgets, "--budgets")
    if args.prompt_len < 1 or args.repeats < 1:
        raise ValueError(f"--prompt-len {args.prompt_len} and --repeats {args.repeats} must be >= 1")
    name = args.preset if args.preset != "auto" else ("paper-base" if device.type == "cuda" else "tiny")
    base = preset(name, **{"max_seq_len": args.prompt_len + 2, **model_overrides(args.overrides)})
    ids = text_token_ids(max(batches), args.prompt_len, base.vocab_size)[0].tolist()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"benchmark": "prefill", "device": device_name, "dtype": str(dtype), "torch": torch.__version__,
            "source": f"preset {name}, random weights", "prompt_len": args.prompt_len, "repeats": args.repeats,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": [], "anchors": []}

    def save() -> None:
        if args.json_path:
            atomic_write_json(args.json_path, meta)

    for variant in select(args.variants):
        torch.manual_seed(0)
        with torch.device(device):
            model = Transformer(variant.config(base)).to(dtype)
        for path in args.paths.split(","):
            if path != "auto" and path not in decode_paths(model.config):
                continue  # e.g. `grouped` is EG-MLA's only
            for batch in batches:
                for budget in budgets:
                    if budget >= batch * args.prompt_len and budget != min(b for b in budgets
                                                                          if b >= batch * args.prompt_len):
                        continue  # a larger budget than the whole batch changes nothing
                    engine = GenerationEngine(model, decode_path=path, prefill_token_budget=budget)
                    prompts = ids[:batch]
                    _reset_peak(device)
                    times = []
                    for _ in range(args.repeats + 1):  # the first compiles: not kept
                        engine.generate(prompts, max_new_tokens=2)
                        times.append(engine.last_stats.prefill_seconds)
                    row = {"variant": model.config.variant_name(), "decode_path": engine.last_stats.decode_path,
                           "batch": batch, "budget": budget, "prefill_ms": 1e3 * statistics.median(times[1:]),
                           "peak_memory_gb": _peak_gb(device)}
                    print(format_row(row), flush=True)
                    meta["rows"].append(row)
                    engine.release()
                    save()
        del model
        _empty_cache(device)
    if args.compare_hf:
        from egmla.bench.hf_anchors import anchor_model, time_anchor

        llama = anchor_model("llama", base, args.prompt_len + 2, device, dtype)
        for batch in batches:
            timed = time_anchor(llama, ids[:batch], new_tokens=2, repeats=args.repeats)
            meta["anchors"].append({"model": "transformers LlamaForCausalLM", "batch": batch,
                                    "prefill_ms": timed["prefill_ms"]})
            print(format_row({"variant": "Llama (transformers)", "decode_path": "", "budget": 0,
                              **meta["anchors"][-1]}), flush=True)
            save()
        del llama
    print()
    return write_table(markdown(meta), args.markdown)


def format_row(row: dict) -> str:
    """One measurement as printed while the benchmark runs (egmla/bench/generate.format_row's layout)."""
    budget = f"budget {row['budget']:>6,}" if row["budget"] else "budget      -"
    peak = f"  peak {1e3 * row['peak_memory_gb']:8.0f} MB" if row.get("peak_memory_gb") is not None else ""
    return (f"{row['variant']:<22} {row['decode_path']:<9} B={row['batch']:<4} {budget}  "
            f"prefill {row['prefill_ms']:9.1f} ms{peak}")


def markdown(meta: dict) -> str:
    """One row per (variant, path, batch, budget); with anchors, the prefill time against Llama's at the batch."""
    llama = {a["batch"]: a["prefill_ms"] for a in meta.get("anchors", [])}
    lines = [f"Prefill on {meta['device']}, {meta['dtype']}, torch {meta['torch']}: {meta['source']}; prompts of "
             f"{meta['prompt_len']} tokens; median of {meta['repeats']} calls. `budget`: prompt tokens per forward "
             "call (`prefill_token_budget`).", "",
             "| model | variant | decode path | batch | budget | prefill ms | × Llama time | peak memory GB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in meta["rows"]:
        ratio = f"{r['prefill_ms'] / llama[r['batch']]:.2f}" if r["batch"] in llama else "–"
        peak = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "–"
        lines.append(f"| egmla | {r['variant']} | {r['decode_path']} | {r['batch']} | {r['budget']:,} | "
                     f"{r['prefill_ms']:.1f} | {ratio} | {peak} |")
    for a in meta.get("anchors", []):
        lines.append(f"| {a['model']} | MHA | – | {a['batch']} | whole batch | {a['prefill_ms']:.1f} | 1.00 | – |")
    return "\n".join(lines) + "\n"


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _empty_cache(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
