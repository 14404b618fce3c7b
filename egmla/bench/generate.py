"""`egmla bench generate`: end-to-end generation speed per variant, decode path and batch size, side by side
with the anchors a user would pick instead (transformers' Llama and DeepSeek-V3, `--compare-hf`).

For each configuration: prefill a batch of prompts, then decode `--new-tokens` tokens per sequence through
`GenerationEngine` (greedy, EOS ignored, so every run does the same work; CUDA graphs unless `--eager`).
Reported: prefill time, per-step latency (median and p90, host sync to host sync, so wall time on GPU too),
decode tokens/s, cache size and peak device memory, and the ratio of tokens/s to transformers' Llama at the
same batch. After one warm-up run, `--repeats` runs: prefill is the median of the runs' prefills, the step median
and p90 are over every decode step of every run together, and decode tokens/s = batch / that median step (the
rows a batch bucket pads with are not counted).

`--fill-memory GB --context T` runs each variant at the largest batch whose cache fits GB at T positions
(`egmla plan`'s number): the prompts are every distinct real-text window of that length the corpus holds (up to
FILL_PROMPTS; ~740 at 4,089 tokens of the embedded corpus), each prefilled once and copied to the rows that repeat
it (the engine does that for repeated prompts). Greedy decoding continues a repeated prompt alike, so a step sees
only that many sequences' distinct ids: EG-MLA's gate rows then come from fewer distinct ids than a batch of as
many different texts would read (until 2026-12-05 only 32 windows were used: ~39 MB of gate rows, which fit the
H200's L2, flattering EG-MLA's full-memory rows).

Prompt ids come from real text (docs/design.md §4: EG-MLA's gate-row traffic depends on how often ids
repeat): windows of the embedded English corpus, tokenized with the run's tokenizer or, for random weights,
with a BPE of the model's vocab size trained on the corpus (egmla.bench.token_ids).
"""
from __future__ import annotations

import argparse
import statistics
import time

DEFAULT_PATHS = "auto"
FILL_PROMPTS = 1024  # distinct prompts of a --fill-memory run at most (each 4K-token prompt is ~0.2 MB of ids)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="auto", help="model shape with random weights: tiny, paper-base, paper-1b; "
                        "auto (default) = paper-base on CUDA, tiny elsewhere (docs/benchmarks.md §2's tables are "
                        "`egmla bench generate-suite`: paper-base, 2,048-token prompts)")
    source.add_argument("--run", help="benchmark a trained run directory instead of random weights")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model field of the preset, e.g. --set max_seq_len=4096 (repeatable)")
    parser.add_argument("--variants", help="comma-separated registry names (egmla/variants.py), e.g. "
                                           "mha,mla-kv64,egmla-kv64; 'none' = only the --compare-hf anchors; "
                                           "default: the preset's own variant")
    parser.add_argument("--all-variants", action="store_true",
                        help="the comparison set at the preset's shape: MHA, GQA, MLA and EG-MLA")
    parser.add_argument("--paths", default=DEFAULT_PATHS,
                        help="comma-separated decode paths; 'auto' = what generation takes by default on the "
                             "device (on CUDA the Triton kernel, EG-MLA's grouped decode from 16,384 positions per "
                             "step; the row names the path that ran); 'all' = every path each variant has")
    parser.add_argument("--batch-sizes", default="1,4,16", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per configuration (after a warm-up)")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs: run every decode step eagerly")
    parser.add_argument("--no-overlap", action="store_true",
                        help="the engine reads each step's tokens back before queueing the next step (default: it "
                             "queues the step first, overlapping the host's per-token work with the device's)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each configuration's decode step (torch.profiler, eager, 3 steps): the "
                             "kernel time per step against the measured step, and the kernels that take most")
    parser.add_argument("--compare-hf", action="store_true",
                        help="also time transformers' LlamaForCausalLM (MHA) and DeepseekV3ForCausalLM (MLA, dense "
                             "MLP) at the same shape with cache_implementation='static'")
    parser.add_argument("--fill-memory", type=float, metavar="GB",
                        help="run each variant at the largest batch whose cache fits GB (decimal) at --context")
    parser.add_argument("--context", type=int, help="with --fill-memory: positions per sequence (prompt + new tokens)")
    parser.add_argument("--offload-gate-tables", action="store_true", help="EG-MLA rows: gate tables in host memory")
    parser.add_argument("--cache-dtypes", default="auto", metavar="LIST",
                        help="comma-separated KV cache dtypes to run each configuration with: auto (the model's), "
                             "fp8 (float8_e4m3fn) and fp8-keep-rope (the RoPE keys in the model's); with "
                             "--fill-memory each fills the memory at its own bytes per token (default: auto)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ...; auto = cuda if available")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto = bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--report", nargs="+", metavar="JSON",
                        help="measure nothing: merge these result files (of one device) into one Markdown table, "
                             "printed, and written to --markdown")
    parser.add_argument("--markdown", metavar="PATH", help="with --report: write the table here")
    parser.add_argument("--plot", metavar="PNG", help="with --report: also draw tokens/s per batch as bars here, "
                        "each labelled with its multiple of Llama's (matplotlib)")
    parser.add_argument("--ab", action="store_true",
                        help="with --report: the files are LABEL=JSON, runs of one command alternated between code "
                             "versions; a table of each label's steps per run, their median and the ratio to the "
                             "first label's (egmla/bench/ab.py)")
    parser.add_argument("--crossover", action="store_true",
                        help="with --report: EG-MLA's 'kernel' against 'grouped' step per prompt length and batch "
                             "(files of several prompt lengths), beside the path decode_path='auto' takes there")
    parser.add_argument("--summary", action="store_true",
                        help="with --report: the compact table of README.md, each variant's tokens/s over Llama's "
                             "per batch (files run with --compare-hf; a --fill-memory file adds its row); "
                             "`python -m egmla.bench.summary README.md` refreshes the README's copies "
                             "(egmla/bench/summary.py)")


def run_prompts(tokenizer, count: int, length: int, fewer: bool = False) -> list[list[int]]:
    """`count` prompts of `length` ids: consecutive windows of the embedded corpus in the run's tokenizer (fewer:
    as many as it holds, if that is less)."""
    from egmla.data.corpora import embedded_documents

    ids: list[int] = []
    for _, text in embedded_documents():
        ids += tokenizer.encode(text).ids
        if len(ids) >= count * length:
            return [ids[i * length:(i + 1) * length] for i in range(count)]
    if fewer and len(ids) >= length:
        return [ids[i * length:(i + 1) * length] for i in range(len(ids) // length)]
    raise ValueError(f"--prompt-len {length} x batch {count}: the corpus has only {len(ids)} tokens")


def fill_prompts(length: int, vocab_size: int) -> list[list[int]]:
    """Every distinct `length`-id window of the embedded corpus, up to FILL_PROMPTS (random weights' tokenizer).

    The stream is asked for all FILL_PROMPTS windows at once: asking for one window tokenized only a slack's worth
    of text, so a 4,089-id prompt found 8 windows where the corpus holds hundreds (2026-12-05)."""
    from egmla.bench.token_ids import text_token_ids

    ids, note = text_token_ids(FILL_PROMPTS, length, vocab_size)
    windows = max(1, min(FILL_PROMPTS, note["tokens_available"] // length))
    return ids[:windows].tolist()


def bench_one(engine, prompts, new_tokens: int, repeats: int, device) -> dict:
    """One warm-up run, then `repeats` runs: the median of the runs' prefills; the median and p90 of every decode
    step of every run together (not a median of per-run medians), and tokens/s = the prompts (not the padded
    bucket) over that median step."""
    import torch

    from egmla.infer.sampling import SamplingParams

    engine.generate(prompts, max_new_tokens=new_tokens, sampling=SamplingParams())  # same shapes: JIT, graphs
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(repeats):
        engine.generate(prompts, max_new_tokens=new_tokens, sampling=SamplingParams())
        runs.append(engine.last_stats)
    steps = sorted(s for stats in runs for s in stats.step_seconds)
    return {
        "prefill_ms": 1e3 * statistics.median(s.prefill_seconds for s in runs),
        "step_ms_median": 1e3 * statistics.median(steps),
        "step_ms_p90": 1e3 * steps[int(0.9 * (len(steps) - 1))],
        "decode_tokens_per_s": len(prompts) / statistics.median(steps),
        "cache_mb": runs[0].cache_bytes / 1e6,
        "cuda_graphs": runs[0].cuda_graphs,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None,
    }


def profile_step(engine, steps: int = 3, top: int = 6) -> dict:
    """The engine's last decode step, run eagerly `steps` times under torch.profiler with every row appending
    nothing (the cache is left as it was): device time of its kernels per step, the costliest kernels, and every
    kernel's time and launches per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step = engine.last_step
    if step is None:
        raise ValueError("--profile: no decode step ran (every sequence ended on its first token): give "
                         "--new-tokens 2 or more")
    on_cuda = step.tokens.is_cuda
    with torch.inference_mode():
        saved = step.n_new.clone()
        step.n_new.zero_()
        step.forward()
        activities = [ProfilerActivity.CUDA] if on_cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step.forward()
            if on_cuda:
                torch.cuda.synchronize()
        step.n_new.copy_(saved)
    from egmla.bench.profiling import timed_events

    kernels, time_of = timed_events(prof, on_cuda)
    return {"profile_kernel_ms_per_step": sum(time_of(e) for e in kernels) / steps / 1e3,
            "profile_kernels_per_step": sum(e.count for e in kernels) / steps,
            "profile_top": [(e.key[:60], time_of(e) / steps / 1e3) for e in kernels[:top]],
            # every kernel (name, ms per step, launches per step), costliest first: what two variants' steps differ by
            "profile_kernels": [(e.key[:100], time_of(e) / steps / 1e3, e.count / steps) for e in kernels]}


def fill_batch(config, path: str, memory_gb: float, context: int, dtype) -> int:
    """The largest batch whose cache (on `path`'s layout) fits memory_gb at `context` positions."""
    from egmla.accounting import measured_cache_bytes_per_token

    per_token, _ = measured_cache_bytes_per_token(config, dtype, path)
    return int(memory_gb * 1e9 // (per_token * context))


def main(args) -> int:
    import torch

    from egmla.accounting import variant_configs
    from egmla.attention import cache_format, decode_paths, fastest_decode_path
    from egmla.bench.ab import code_identity
    from egmla.config import preset
    from egmla.configfile import int_list, model_overrides
    from egmla.infer.cli import cache_dtype_of, resolve_device_dtype
    from egmla.runs import atomic_write_json
    from egmla.variants import select, variant_config

    if args.report:
        if args.crossover:
            return crossover_report(args.report, args.markdown)
        if args.summary:
            from egmla.bench.summary import summary_of_files

            return write_table(summary_of_files(args.report), args.markdown)
        if args.ab:
            from egmla.bench.ab import ab_table, parse_labelled

            return write_table(ab_table(parse_labelled(args.report)), args.markdown)
        return report(args.report, args.markdown, args.plot)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    batch_sizes = int_list(args.batch_sizes, "--batch-sizes", example="1,32,128")
    cache_dtypes = [name.strip() for name in args.cache_dtypes.split(",")]
    for name in cache_dtypes:
        cache_dtype_of(name, "--cache-dtypes")  # a typo is refused before any model is built
    if min(batch_sizes) < 1 or args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1:
        raise ValueError("--batch-sizes, --prompt-len, --repeats must be >= 1 and --new-tokens >= 2")
    if (args.fill_memory is None) != (args.context is None):
        raise ValueError("--fill-memory GB and --context T go together")
    if args.fill_memory is not None and (args.fill_memory <= 0 or args.context <= args.new_tokens):
        raise ValueError(f"--fill-memory {args.fill_memory} must be > 0 and --context {args.context} > --new-tokens")
    prompt_len = args.context - args.new_tokens + 1 if args.fill_memory else args.prompt_len
    trained = None
    if args.run:
        from egmla.runs import load_model, load_tokenizer

        trained, _ = load_model(args.run, device=device, dtype=dtype)
        base, source = trained.config, f"run {args.run}"
        distinct = run_prompts(load_tokenizer(args.run), FILL_PROMPTS if args.fill_memory else max(batch_sizes),
                               prompt_len, fewer=bool(args.fill_memory))
    else:
        from egmla.bench.token_ids import text_token_ids

        name = args.preset if args.preset != "auto" else ("paper-base" if device.type == "cuda" else "tiny")
        base = preset(name, **model_overrides(args.overrides))
        source = f"preset {name}, random weights"
        distinct = (fill_prompts(prompt_len, base.vocab_size) if args.fill_memory
                    else text_token_ids(max(batch_sizes), prompt_len, base.vocab_size)[0].tolist())
    if prompt_len + args.new_tokens - 1 > base.max_seq_len:
        raise ValueError(f"prompt {prompt_len} + {args.new_tokens} new tokens exceeds max_seq_len={base.max_seq_len}: "
                         f"shorten them or --set max_seq_len=...")
    if args.variants == "none":
        configs = []
    elif args.variants:
        configs = [v.config(base) for v in select(args.variants)]
    else:
        configs = variant_configs(base) if args.all_variants and trained is None else [base]
    if args.paths not in ("auto", "all") and configs:  # each variant skips the paths it lacks: one none has is a typo
        offered = sorted({path for config in configs for path in decode_paths(config)})
        missing = [path for path in args.paths.split(",") if path not in offered]
        if missing:
            raise ValueError(f"--paths {args.paths!r}: no variant benchmarked here has {', '.join(map(repr, missing))}; "
                             f"choose from {', '.join(offered)}, or auto or all")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"egmla bench generate: {source}; {device_name}, {dtype}; prompt {prompt_len} + {args.new_tokens} new "
          f"tokens, greedy; {'eager' if args.eager else 'CUDA graphs where on CUDA'}; torch {torch.__version__}")
    rows: list[dict] = []
    meta = {"benchmark": "generate", "source": source, "device": device_name, "dtype": str(dtype),
            "torch": torch.__version__, "prompt_len": prompt_len, "new_tokens": args.new_tokens,
            "overlap_host": not args.no_overlap,
            "repeats": args.repeats, "fill_memory_gb": args.fill_memory, "context": args.context,
            "distinct_prompts": len(distinct),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "code": code_identity(), "rows": rows}

    def record(row: dict, work) -> None:
        try:
            row.update(work())
        except Exception as err:  # noqa: BLE001 - a configuration that fails is reported, the rest still run
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(format_row(row), flush=True)
        if args.json_path:  # after every row, so a run cut short keeps what it measured
            atomic_write_json(args.json_path, meta)

    for config in configs:
        model = trained if trained is not None else _random_model(config, device, dtype)
        if args.paths == "auto":
            wanted = ["auto"]  # the engine's default: chosen per call from the batch and cache length
        else:
            wanted = decode_paths(config) if args.paths == "all" else [p for p in args.paths.split(",")
                                                                       if p in decode_paths(config)]
        for path, cache_name in ((p, c) for p in wanted for c in cache_dtypes):
            cache_dtype = cache_dtype_of(cache_name)
            layout = fastest_decode_path(config, device) if path == "auto" else path
            sizes = ([fill_batch(config, layout, args.fill_memory, args.context, cache_format(cache_dtype, dtype))]
                     if args.fill_memory else batch_sizes)
            for batch in sizes:
                engine = _engine(model, config, path, args, cache_dtype)
                prompts = [distinct[i % len(distinct)] for i in range(batch)]
                row = {"model": "egmla", "variant": config.variant_name(), "decode_path": path, "batch": batch,
                       "offloaded_gate_tables": engine.offload is not None,
                       **({"cache_dtype": cache_name} if cache_dtype is not None else {})}
                record(row, lambda: {**bench_one(engine, prompts, args.new_tokens, args.repeats, device),
                                     **(profile_step(engine) if args.profile else {}),
                                     **({"decode_path": f"auto ({engine.decode_path})"} if path == "auto" else {})})
                if engine.offload is not None:
                    row["gate_table_mb_off_device"] = engine.offload.bytes_saved() / 1e6
                    engine.offload.restore()  # the next path may need the tables on the device
                engine.release()
        del model
    if args.compare_hf:
        from egmla.bench.hf_anchors import ANCHORS, anchor_model, time_anchor

        positions = prompt_len + args.new_tokens
        for name in ANCHORS:
            anchor = variant_config("mha", base) if name == "llama" else _mla_shape(base)
            sizes = ([fill_batch(anchor, "naive", args.fill_memory, args.context, dtype)] if args.fill_memory
                     else batch_sizes)
            if args.fill_memory and name != "llama":
                continue  # at full memory the anchor is MHA's largest batch
            model = anchor_model(name, anchor, positions, device, dtype)
            for batch in sizes:
                prompts = [distinct[i % len(distinct)] for i in range(batch)]
                row = {"model": f"transformers {type(model).__name__}", "variant": anchor.variant_name(),
                       "decode_path": "static cache", "batch": batch}
                record(row, lambda: time_anchor(model, prompts, args.new_tokens, args.repeats))
            del model
    print("\n" + markdown(meta))
    if args.json_path:
        print(f"wrote {args.json_path}")
    return 0


def _random_model(config, device, dtype):
    import torch

    from egmla.model import Transformer

    torch.manual_seed(0)
    with torch.device(device):
        return Transformer(config).to(dtype)


def _engine(model, config, path: str, args, cache_dtype=None):
    from egmla.infer.engine import GenerationEngine
    from egmla.infer.offload import offloadable

    offload = args.offload_gate_tables and config.is_gated and offloadable(config, path)
    return GenerationEngine(model, decode_path=path, offload_gate_tables=offload, cache_dtype=cache_dtype,
                            cuda_graphs=False if args.eager else None, overlap_host=not args.no_overlap)


def _mla_shape(base):
    """DeepSeek-V3's attention at the shape of `base`: MLA with base's latent rank if it has one, else 64."""
    from egmla.variants import variant_config

    return variant_config("mla-kv64", base, **({"kv_lora_rank": base.kv_lora_rank} if base.is_latent else {}))


def report(paths: list[str], markdown_path: str | None, plot_path: str | None = None) -> int:
    """One table (and with plot_path a chart) from several result files of one device and one setting (prompt,
    new tokens, memory)."""
    from egmla.bench.options import read_result

    metas = [read_result(p, "--report") for p in paths]
    keys = ("device", "dtype", "source", "torch", "prompt_len", "new_tokens", "fill_memory_gb", "context")
    for meta in metas[1:]:
        differing = [k for k in keys if meta.get(k) != metas[0].get(k)]
        if differing:
            raise ValueError(f"--report: the files differ in {', '.join(differing)}: give files of one setting")
    merged = {**metas[0], "rows": merge_runs(metas), "repeats": max(meta["repeats"] for meta in metas)}
    if plot_path:
        plot(merged, plot_path)
    return write_table(markdown(merged), markdown_path)


def merge_runs(metas: list[dict]) -> list[dict]:
    """The rows of several runs, each tagged with its run ("run": a row's Llama is the one timed in its own
    process; a merged file keeps the tags it has). Llama's step moves by up to half between processes."""
    rows, offset = [], 0
    for meta in metas:
        runs = {row.get("run", 0) for row in meta["rows"]}
        rows += [{**row, "run": offset + row.get("run", 0)} for row in meta["rows"]]
        offset += max(runs, default=0) + 1
    return rows


def llama_of(rows: list[dict]) -> dict:
    """{(run, batch): Llama's decode tokens/s}: the anchor of each row is the Llama of its own run."""
    return {(r.get("run", 0), r["batch"]): r["decode_tokens_per_s"] for r in rows if "Llama" in r["model"]}


def anchor_of(meta: dict, rows: list[dict]):
    """row -> the Llama tokens/s its ratio divides by (None: its run timed none): the Llama of the row's own run at
    its batch, or at full memory (`--fill-memory`) the Llama of its run at Llama's own largest batch. The one rule
    of the table and the plot."""
    llama = llama_of(rows)
    if meta.get("fill_memory_gb"):
        by_run = {run: tokens_per_s for (run, _), tokens_per_s in llama.items()}
        return lambda row: by_run.get(row.get("run", 0))
    return lambda row: llama.get((row.get("run", 0), row["batch"]))


def plot(meta: dict, path: str) -> None:
    """Decode tokens/s per batch size, one bar per (model, variant, path), log scale, each bar labelled with its
    multiple of Llama's tokens/s at that batch: the table of `markdown` as a picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in meta["rows"] if "error" not in r]
    batches = sorted({r["batch"] for r in rows})
    series = list(dict.fromkeys((r["model"], r["variant"], r["decode_path"]) for r in rows))
    anchor_for = anchor_of(meta, rows)  # as the table's: at full memory, Llama at its own largest batch
    by_key = {(r["model"], r["variant"], r["decode_path"], r["batch"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(10, 5.5))
    width = 0.8 / len(series)
    for index, (model, variant, path_name) in enumerate(series):
        xs, ys, ratios = [], [], []
        for position, batch in enumerate(batches):
            row = by_key.get((model, variant, path_name, batch))
            if row:
                xs.append(position + (index - (len(series) - 1) / 2) * width)
                ys.append(row["decode_tokens_per_s"])
                anchor = anchor_for(row)
                ratios.append(row["decode_tokens_per_s"] / anchor if anchor else None)
        label = variant + (f" ({path_name})" if model == "egmla" else f", {model.split()[-1]}")
        bars = ax.bar(xs, ys, width, label=label)
        for bar, ratio in zip(bars, ratios):
            if ratio is not None:
                ax.annotate(f"{ratio:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 1.6)  # room for the top labels
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tokens/s (log scale); label: × Llama's")
    ax.set_title(f"Generation, {meta['device']}, {meta['dtype'].replace('torch.', '')}: prompts of {meta['prompt_len']} "
                 f"tokens, {meta['source']}", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def write_table(table: str, markdown_path: str | None) -> int:
    """Print a report's Markdown table and write it to markdown_path (if given)."""
    print(table)
    if markdown_path:
        from pathlib import Path

        Path(markdown_path).write_text(table)
        print(f"wrote {markdown_path}")
    return 0


def crossover_report(paths: list[str], markdown_path: str | None) -> int:
    """EG-MLA's two fast paths side by side per (prompt length, batch), from runs with `--paths kernel,grouped`, and
    the path `fastest_decode_path` takes at that call's batch and cache length: the data behind its threshold."""
    from egmla.attention import GROUPED_MIN_POSITIONS
    from egmla.bench.options import read_result

    metas = sorted((read_result(p, "--report") for p in paths), key=lambda m: m["prompt_len"])
    lines = [f"EG-MLA decode step, `kernel` against `grouped`, on {metas[0]['device']}, {metas[0]['dtype']}, torch "
             f"{metas[0]['torch']}: {metas[0]['source']}; {metas[0]['new_tokens']} greedy tokens, CUDA graphs, medians "
             f"of {metas[0]['repeats']} runs. Positions = batch × cache length (prompt + new tokens − 1); `auto` = "
             f"the path `decode_path=\"auto\"` takes there (grouped from {GROUPED_MIN_POSITIONS:,} positions).", "",
             "| prompt | batch | positions | kernel step ms | grouped step ms | kernel / grouped | auto |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for meta in metas:
        steps: dict[int, dict[str, float]] = {}
        for r in meta["rows"]:
            if "error" not in r and r["model"] == "egmla":
                steps.setdefault(r["batch"], {})[r["decode_path"]] = r["step_ms_median"]
        for batch, by_path in sorted(steps.items()):
            if {"kernel", "grouped"} <= by_path.keys():
                positions = batch * (meta["prompt_len"] + meta["new_tokens"] - 1)
                auto = "grouped" if positions >= GROUPED_MIN_POSITIONS else "kernel"
                lines.append(f"| {meta['prompt_len']:,} | {batch} | {positions:,} | {by_path['kernel']:.2f} | "
                             f"{by_path['grouped']:.2f} | {by_path['kernel'] / by_path['grouped']:.2f} | {auto} |")
    return write_table("\n".join(lines) + "\n", markdown_path)


def format_row(row: dict) -> str:
    head = f"{row['variant']:<22} {row['decode_path']:<12} B={row['batch']:<5}"
    if "error" in row:
        return f"{head} error: {row['error']}"
    cache = f"  cache {row['cache_mb']:8.1f} MB" if "cache_mb" in row else ""
    if "profile_kernel_ms_per_step" in row:
        cache += (f"\n    profile: {row['profile_kernel_ms_per_step']:.2f} ms of kernels per step "
                  f"({row['profile_kernels_per_step']:.0f} launches); top: "
                  + ", ".join(f"{name} {ms:.3f}" for name, ms in row["profile_top"]))
    peak = f"  peak {row['peak_memory_mb']:8.0f} MB" if row.get("peak_memory_mb") is not None else ""
    return (f"{head} prefill {row['prefill_ms']:8.1f} ms  step {row['step_ms_median']:7.2f} ms "
            f"(p90 {row['step_ms_p90']:7.2f})  {row['decode_tokens_per_s']:9.1f} tok/s{cache}{peak}")


def markdown(meta: dict) -> str:
    """The results side by side, per batch size, with tokens/s as a multiple of transformers' Llama's."""
    rows = [r for r in meta["rows"] if "error" not in r]
    anchor_for = anchor_of(meta, rows)  # each row against the Llama of its own run; none where its run timed none
    full = meta.get("fill_memory_gb")
    several = len({r.get("run", 0) for r in rows}) > 1  # then a column says which run (and which Llama) a row is
    lines = [f"Generation on {meta['device']}, {meta['dtype']}, torch {meta['torch']}: {meta['source']}; "
             + (f"the largest batch whose cache fits {full:g} GB at {meta['context']} positions, "
                if full else f"prompts of {meta['prompt_len']} tokens, ")
             + f"{meta['new_tokens']} greedy tokens; medians of {meta['repeats']} runs."
             + (f" Note: {meta['note']}." if meta.get("note") else "")
             + (" `run`: the process that timed the row (runs merged by `egmla bench generate-suite`); each row's "
                "× Llama is against the Llama of its own run, which moves between processes." if several else ""), "",
             "| model | variant | decode path | batch | step ms | tokens/s | × Llama tokens/s | prefill ms |"
             + (" run |" if several else ""),
             "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if several else "")]
    for r in sorted(rows, key=lambda r: (0 if full else r["batch"], r["model"] != "egmla", r["variant"])):
        run = r.get("run", 0)
        anchor = anchor_for(r)
        ratio = f"{r['decode_tokens_per_s'] / anchor:.2f}" if anchor else "-"
        graphs = " (eager)" if r.get("cuda_graphs") is False and meta["device"] != "cpu" else ""
        graphs += ", gate tables offloaded" if r.get("offloaded_gate_tables") else ""
        graphs += f", {r['cache_dtype']} cache" if r.get("cache_dtype") else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['decode_path']}{graphs} | {r['batch']} | "
                     f"{r['step_ms_median']:.2f} | {r['decode_tokens_per_s']:,.0f} | {ratio} | {r['prefill_ms']:.0f} |"
                     + (f" {run + 1} |" if several else ""))
    for r in meta["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r['decode_path']} | {r['batch']} | "
                         f"error: {r['error'][:120]} ||||")
    profiled = [r for r in rows if "profile_kernel_ms_per_step" in r]
    if profiled:
        lines += ["", "Profile of the same decode step run eagerly (torch.profiler, 3 steps): the device time of its "
                  "kernels per step, beside the step measured above (a CUDA-graph replay, host sync included).", "",
                  "| variant | decode path | batch | step ms | kernel ms per step | kernels per step | costliest kernels (ms per step) |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for r in profiled:
            top = ", ".join(f"`{name.split('<')[0].strip()}` {ms:.2f}" for name, ms in r["profile_top"][:3])
            lines.append(f"| {r['variant']} | {r['decode_path']} | {r['batch']} | {r['step_ms_median']:.2f} | "
                         f"{r['profile_kernel_ms_per_step']:.2f} | {r['profile_kernels_per_step']:.0f} | {top} |")
    return "\n".join(lines) + "\n"
