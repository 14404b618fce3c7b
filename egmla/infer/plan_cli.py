"""`egmla plan`: how many concurrent sequences of length T fit in M GB, for a model and every variant."""
import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory written by `egmla train` (its config.json gives the model), or a "
                                      "folder exported by `egmla export --to hf`")
    source.add_argument("--preset", help="model shape: tiny, paper-base or paper-1b")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model field of the preset, e.g. --set kv_lora_rank=32 (repeatable)")
    parser.add_argument("--context", type=int, required=True, metavar="T",
                        help="tokens per sequence (prompt + generated) to plan for")
    parser.add_argument("--memory-gb", type=float, required=True, metavar="M",
                        help="device memory available for weights + gate tables + cache, in GB (1e9 bytes)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="dtype of weights and cache")
    parser.add_argument("--cache-dtype", default="auto", choices=["auto", "fp8", "fp8-keep-rope"],
                        help="auto: the cache in --dtype; fp8: an fp8 KV cache (float8_e4m3fn, 1 byte per element), "
                             "whose rows then hold about twice as many sequences as bf16 (EG-MLA's token ids and fp32 "
                             "norm statistics stay as they are); fp8-keep-rope: the same but the RoPE keys in --dtype")
    parser.add_argument("--reserve-gb", type=float, default=0.0,
                        help="memory to set aside for activations, workspace and allocator slack")
    parser.add_argument("--gate-table", action="store_true",
                        help="plan EG-MLA for the gate-table decode path: count the precomputed V x n_h(d_n+d_v) "
                             "gate tables as well as the V x d_e embeddings they are built from (--decode-path "
                             "gate-table, kernel, grouped or absorbed counts them too)")
    parser.add_argument("--decode-path", metavar="PATH",
                        help="plan the cache layout of this decode path for the variants that have it (grouped "
                             "and kernel also store 8 B of LayerNorm statistics per token and layer) and the "
                             "tables and working memory it needs; the others use their default path. auto: the "
                             "path `egmla generate` takes on a GPU at the batch that fits (EG-MLA: grouped from "
                             "16,384 positions per step, with its working memory). Default: every variant's "
                             "`naive` path (the cache alone, no tables or decode working memory)")
    parser.add_argument("--distinct-ids", type=int, metavar="N",
                        help="distinct token ids per sequence, for the grouped path's per-id working memory "
                             "(default: min(T, vocab), the most there can be; real text holds fewer, e.g. ~1,500 "
                             "of 4,096 English tokens). Under CUDA graphs (batches up to 512) the engine sizes the "
                             "buffers for the ids a call can reach, rounded up to 256, which can exceed the ids "
                             "the text holds: the default is the safe figure")
    parser.add_argument("--resident-ids", type=int, metavar="N",
                        help="for the 'gates off GPU' column: the distinct token ids of every cached sequence "
                             "together, whose gate rows an offload keeps on the device (its row cache is counted at "
                             "twice N, a sixteenth of the vocabulary at least, the vocabulary at most). Default: the "
                             "most there can be, sequences x distinct ids per sequence, which at long contexts is the "
                             "tables' own size; real text shares most ids across sequences, so measure N on your "
                             "prompts")
    parser.add_argument("--no-merged-products", dest="merged_products", action="store_false",
                        help="plan for GenerationEngine(merged_products=False): no concatenated copies of the input "
                             "and MLP weights (counted in the weights by default; ~106 MB for MLA kv64 at paper-base)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="PNG",
                        help="also draw the sequences that fit in M GB against the tokens per sequence (powers of two "
                             "from 256 to 4 x T, log-log), one line per variant, gate tables on the device, the model "
                             "asked about drawn thick and T marked; the same-cache ablations are left out unless asked "
                             "about (matplotlib)")


def run_model_config(run: str):
    """The ModelConfig of a run directory or of an `egmla export --to hf` folder, as generate and serve take both."""
    from egmla.config import ModelConfig
    from egmla.hf.export import is_hf_export
    from egmla.runs import read_run_config

    if is_hf_export(run):
        from egmla.hf import require_transformers

        require_transformers()
        from egmla.hf import EgmlaConfig

        return EgmlaConfig.from_pretrained(run).to_model_config()
    return ModelConfig.from_dict(read_run_config(run)["model"])


def main(args) -> int:
    from egmla.config import preset
    from egmla.configfile import model_overrides
    from egmla.infer.plan import format_plan, plan_rows

    if args.plot:
        check_plot_path(args.plot)
    if args.run:
        if args.overrides:
            raise ValueError("--set applies to --preset only; a run's shape is fixed by its config.json")
        base, source = run_model_config(args.run), f"run {args.run}"
    else:
        base, source = preset(args.preset, **model_overrides(args.overrides)), f"preset {args.preset}"
    rows = plan_rows(base, args.context, args.memory_gb, args.dtype, args.reserve_gb, args.gate_table,
                     args.decode_path, args.distinct_ids, merged_products=args.merged_products,
                     resident_ids=args.resident_ids, cache_dtype=args.cache_dtype)
    if args.json:
        print(json.dumps({"source": source, "context": args.context, "memory_gb": args.memory_gb,
                          "dtype": args.dtype, "cache_dtype": args.cache_dtype, "reserve_gb": args.reserve_gb, "gate_table_path": args.gate_table,
                          "decode_path": args.decode_path, "distinct_ids": args.distinct_ids,
                          "resident_ids": args.resident_ids,
                          "merged_products": args.merged_products, "rows": rows}, indent=2))
        if args.plot:
            plot_plan(base, args, source)
        return 0
    title = (f"Memory plan: {source} ({base.n_layers} layers, d_model {base.d_model}, vocab {base.vocab_size}), "
             f"{args.context} tokens per sequence, {args.memory_gb:g} GB, {args.dtype}"
             + (f", {args.cache_dtype} cache" if args.cache_dtype != "auto" else "")
             + (", EG-MLA gate-table path" if args.gate_table else ""))
    print(format_plan(rows, title))
    if args.context > base.max_seq_len:
        print(f"note: context {args.context} exceeds the model's max_seq_len={base.max_seq_len}; "
              f"the plan is for the same shape with a longer context.")
    if args.plot:
        plot_plan(base, args, source)
    return 0


def check_plot_path(path: str) -> None:
    """--plot's file, checked before the plan: a missing folder, or a format matplotlib cannot write, failed only after
    the table was printed, as a traceback or in matplotlib's words without the option's name."""
    from pathlib import Path

    folder = Path(path).parent
    if not folder.is_dir():
        raise ValueError(f"--plot {path!r}: the folder {str(folder)!r} does not exist; create it or choose another path")
    suffix = Path(path).suffix.lstrip(".").lower()
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:  # plot_plan says how to install it
        return
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:  # no suffix: matplotlib writes a PNG
        raise ValueError(f"--plot {path!r}: matplotlib cannot write .{suffix} files; end the name with .png, .svg "
                         f"or .pdf (any of {', '.join(sorted(formats))})")


def plot_contexts(context: int) -> list[int]:
    """Powers of two from 256 to 4 x context, and context itself."""
    contexts, length = {context}, 256
    while length <= 4 * context:
        contexts.add(length)
        length *= 2
    return sorted(contexts)


def plot_plan(base, args, source: str) -> None:
    """`--plot PNG`: sequences that fit (gate tables on the device) against the context, per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    from egmla.infer.plan import plan_rows

    contexts = plot_contexts(args.context)
    lines: dict[str, list[tuple[int, int]]] = {}
    model = None
    for context in contexts:
        for row in plan_rows(base, context, args.memory_gb, args.dtype, args.reserve_gb, args.gate_table,
                             args.decode_path, args.distinct_ids, merged_products=args.merged_products,
                             resident_ids=args.resident_ids):
            ablation = any(word in row["variant"] for word in ("latent-gate", "gate-bias"))  # kv64's cache: one line
            if row["sequences"] > 0 and (row["is_model"] or not ablation):  # log scale: none fitting has no point
                lines.setdefault(row["variant"], []).append((context, row["sequences"]))
            model = row["variant"] if row["is_model"] else model
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for index, (variant, points) in enumerate(lines.items()):
        mine = variant == model
        ax.plot(*zip(*points), marker="o", markersize=3, color=f"C{index % 10}", linewidth=2.6 if mine else 1.1,
                zorder=3 if mine else 2,
                label=variant + (" (this model)" if mine else ""), linestyle="-" if "EG-MLA" in variant else "--")
    ax.axvline(args.context, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per sequence (prompt + generated)")
    ax.set_ylabel(f"sequences that fit in {args.memory_gb:g} GB")
    ax.set_title(f"Memory plan: {source}, {args.dtype}, gate tables on the device", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.plot)
    plt.close(fig)
    print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
