"""`egmla bench calls`: the wall time of one engine's successive generate() calls, as a user calling generate() again
and again meets it (the steady-state tables of `egmla bench generate`, same shape every call, never do):

- calls of decreasing prompt length (`--lengths`): the kept cache (and its CUDA graphs) reused by the shorter calls
  against a cache and graphs made for each length (`GenerationEngine(reuse_longer_cache=...)`);
- calls of alternating batch sizes (`--batches 32,4`): under decode_path="auto" EG-MLA changes path between them
  (`grouped` for large calls, `kernel` for small ones); one cache and the graphs of both paths kept across the
  changes against a cache and graphs made again at each change (`share_cache_across_paths=...`);
- `--compare prefill_graphs`: the prompts prefilled by the fixed-shape step replayed from a CUDA graph per bucket
  against eager prefill forwards (`GenerationEngine(prefill_graphs=...)`).

Per variant: one pass that compiles (setting on, not reported), then the kept passes, each on a fresh engine with the
same prompts, in the order on, off, off, on (`PASS_ORDER`, ABBA): a drift across the passes (clocks, what the compiling
pass left warm or cold) falls on both settings alike instead of always favouring the one timed last. The table gives
each setting's first call (the median of its two passes' first calls) and the median of its later calls over both
passes."""
from __future__ import annotations

import argparse
import statistics
import time

from egmla.bench.options import add_output_arguments, add_preset_arguments, report
from egmla.configfile import int_list


# The setting in each kept pass, in turn (after the compiling pass): balanced (ABBA), each setting timed twice.
PASS_ORDER = (True, False, False, True)

SETTINGS = {"reuse_longer_cache": ("kept cache reused by shorter calls", "no: one per length"),
            "share_cache_across_paths": ("one cache and graphs kept across paths", "no: made again at each change"),
            "prefill_graphs": ("prefill steps (CUDA graphs)", "no: eager prefill forwards")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_preset_arguments(parser, fits="the longest call")
    parser.add_argument("--variants", default="mla-kv64,egmla-kv64", help="comma-separated registry names")
    parser.add_argument("--lengths", default="1024,960,896,832,768,704,640,576",
                        help="prompt tokens of the successive calls (the first allocates the cache)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per call")
    parser.add_argument("--batches", default=None,
                        help="comma-separated prompts per call, taken in turn with --lengths (calls: the longer list); "
                             "compares share_cache_across_paths instead of reuse_longer_cache, e.g. --batches 32,4 "
                             "--lengths 2048")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt and call")
    parser.add_argument("--compare", choices=sorted(SETTINGS), default=None,
                        help="the engine setting compared (on, off): default reuse_longer_cache, or "
                             "share_cache_across_paths with --batches")
    add_output_arguments(parser)


def main(args) -> int:
    if args.report:
        return report(args, markdown)
    import torch

    from egmla.bench.generate import write_table
    from egmla.bench.token_ids import text_token_ids
    from egmla.config import preset
    from egmla.configfile import model_overrides
    from egmla.infer import GenerationEngine
    from egmla.infer.cli import resolve_device_dtype
    from egmla.model import Transformer
    from egmla.runs import atomic_write_json
    from egmla.variants import select

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    lengths = int_list(args.lengths, "--lengths")
    batches = int_list(args.batches, "--batches") if args.batches else int_list(str(args.batch), "--batch")
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens {args.new_tokens}: must be >= 2 (one step after the prefill's token)")
    calls = [(batches[i % len(batches)], lengths[i % len(lengths)]) for i in range(max(len(lengths), len(batches)))]
    setting = args.compare or ("share_cache_across_paths" if args.batches else "reuse_longer_cache")
    name = args.preset if args.preset != "auto" else ("paper-base" if device.type == "cuda" else "tiny")
    overrides = {"max_seq_len": max(lengths) + args.new_tokens, **model_overrides(args.overrides)}
    base = preset(name, **overrides)
    ids = text_token_ids(max(batches), max(lengths), base.vocab_size)[0].tolist()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"benchmark": "calls", "device": device_name, "dtype": str(dtype), "torch": torch.__version__,
            "source": f"preset {name}, random weights", "batch": args.batch, "new_tokens": args.new_tokens,
            "lengths": lengths, "batches": batches if args.batches else None, "setting": setting,
            "passes": list(PASS_ORDER), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    print(f"egmla bench calls: {meta['source']}; {device_name}, {dtype}; {len(calls)} calls per pass, "
          f"{args.new_tokens} greedy tokens each; {setting} {_order(PASS_ORDER)} (after a compiling pass, on)")
    for variant in select(args.variants):
        torch.manual_seed(0)
        with torch.device(device):
            model = Transformer(variant.config(base)).to(dtype)
        for pass_index, enabled in enumerate((True, *PASS_ORDER)):  # the first pass compiles the kernels: not kept
            engine = GenerationEngine(model, **{setting: enabled})
            for batch, length in calls:
                prompts = [row[:length] for row in ids[:batch]]
                _sync(device)
                start = time.perf_counter()
                engine.generate(prompts, max_new_tokens=args.new_tokens)
                _sync(device)
                stats = engine.last_stats
                row = {"variant": model.config.variant_name(), setting: enabled, "pass": pass_index, "batch": batch,
                       "prompt": length, "wall_ms": 1e3 * (time.perf_counter() - start),
                       "prefill_ms": 1e3 * stats.prefill_seconds, "decode_ms": 1e3 * stats.decode_seconds,
                       "decode_path": stats.decode_path, "cuda_graphs": stats.cuda_graphs,
                       "cache_positions": engine.kept_cache_len}
                print(format_row(row, setting, kept=bool(pass_index)), flush=True)
                if pass_index:
                    meta["rows"].append(row)
            engine.release()
            if args.json_path:
                atomic_write_json(args.json_path, meta)
        del model
    print()
    return write_table(markdown(meta), args.markdown)


def format_row(row: dict, setting: str, kept: bool = True) -> str:
    """One call, as printed while the benchmark runs (egmla/bench/generate.format_row's layout); the first pass, which
    compiles the kernels and is left out of the JSON and the table, is marked."""
    return (f"{row['variant']:<22} {row['decode_path']:<12} B={row['batch']:<5} prompt {row['prompt']:>6}  "
            f"{setting} {'on ' if row[setting] else 'off'}  wall {row['wall_ms']:9.1f} ms  "
            f"prefill {row['prefill_ms']:9.1f} ms  decode {row['decode_ms']:9.1f} ms  "
            f"cache {row['cache_positions']:>6} positions, {'CUDA graphs' if row['cuda_graphs'] else 'eager'}"
            + ("" if kept else "  (compiling pass, not kept)"))


def _order(passes) -> str:
    return ", ".join("on" if enabled else "off" for enabled in passes)


def markdown(meta: dict) -> str:
    """Per variant and setting (and batch, for alternating batches): the first call of a pass (it allocates and
    captures; the median over the setting's passes) and the median of the later ones (over its passes). A run from
    before the balanced order (no "passes": one kept pass per setting, off then on) reads as one pass each."""
    setting = meta.get("setting", "reuse_longer_cache")
    header, off = SETTINGS[setting]
    batches = meta.get("batches")
    shape = (f"prompts of {', '.join(map(str, meta['lengths']))} tokens and batches of {', '.join(map(str, batches))} "
             f"in turn (under decode_path='auto')" if batches else
             f"{meta['batch']} prompts of {', '.join(map(str, meta['lengths']))} tokens in turn")
    lines = [f"Successive generate() calls on one engine, {meta['device']}, {meta['dtype']}, torch {meta['torch']}: "
             f"{meta['source']}; {shape}, {meta['new_tokens']} greedy tokens each. ms of wall clock per call."
             + (f" Passes {_order(meta['passes'])} after a compiling pass; first call: the median of each pass's "
                "first, later calls: of every pass's later ones." if meta.get("passes") else ""), "",
             f"| variant | decode path |{' batch |' if batches else ''} {header} | first call ms | later calls ms "
             "(median) | later calls: prefill ms (median) | later calls: decode ms (median) | cache positions |",
             f"|---|---|{'---:|' if batches else ''}---|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for row in meta["rows"]:
        groups.setdefault((row["variant"], row[setting], row["batch"] if batches else None), []).append(row)
    variants = list(dict.fromkeys(variant for variant, _, _ in groups))
    # per variant the setting off, then on (the order of the runs before the balanced one), whatever the pass order
    for (variant, enabled, batch), rows in sorted(groups.items(), key=lambda kv: (variants.index(kv[0][0]), kv[0][1])):
        passes: dict[int, list[dict]] = {}  # a run before the balanced order: no "pass", one pass per setting
        for call in rows:
            passes.setdefault(call.get("pass", 0), []).append(call)
        firsts = [calls[0] for calls in passes.values()]
        later = [call for calls in passes.values() for call in calls[1:]] or rows
        positions = sorted({r["cache_positions"] for r in rows})
        paths = ", ".join(dict.fromkeys(r["decode_path"] for r in rows))
        lines.append(f"| {variant} | {paths} |{f' {batch} |' if batches else ''} {'yes' if enabled else off} | "
                     f"{statistics.median(r['wall_ms'] for r in firsts):.1f} | "
                     f"{statistics.median(r['wall_ms'] for r in later):.1f} | "
                     f"{statistics.median(r['prefill_ms'] for r in later):.1f} | "
                     f"{statistics.median(r['decode_ms'] for r in later):.1f} | "
                     f"{', '.join(map(str, positions)) if len(positions) <= 3 else f'{positions[0]}–{positions[-1]}'} |")
    return "\n".join(lines) + "\n"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)

