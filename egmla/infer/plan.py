"""Memory planning: how many concurrent sequences of length T fit in M GB, per attention variant.

    sequences = floor((M - weights - gate tables - reserve) / (cache bytes per token x T))
    sequences_with_decode_workspace: the same with a decode step's working memory per sequence added

Cache bytes per token are measured from a really allocated `KVCache` (egmla.accounting), so they
include everything the engine stores (EG-MLA's token id, 4 B/token). Weights are the parameter count
without the gate tables plus what a GPU decode path derives from the weights and keeps beside them (MLA's folded
absorption, the table controls' folded decode weights, the merged products' concatenated copies: measured from a
model built on the meta device), times the dtype's size; gate tables are EG-MLA's per-layer V x d_e embeddings
(plus, planning for a decode path that builds them beside those: `gate-table`, `kernel`, `grouped`, the bias
controls' `absorbed`, the precomputed V x n_h(d_n+d_v) tables), counted on the GPU or, when offloaded to host
memory (egmla.infer.offload), as the row cache of the ids in use (`gate_row_cache_bytes`). GB means 10^9 bytes.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from egmla.accounting import measured_cache_bytes_per_token, variant_configs
from egmla.attention import (GROUPED_MIN_POSITIONS, cache_format, checked_cache_dtype, cuda_decode_path,
                             decode_path_table, decode_paths)
from egmla.config import ModelConfig
from egmla.model import count_params

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GB = 1e9


def gate_table_params(config: ModelConfig, precomputed: bool = False, decode_path: str | None = None) -> int:
    """Parameters of the gate tables on the device: the model's own E_l (V x d_e), plus the precomputed G_l
    (V x n_h(d_n+d_v), the gate in the [k; v] layout) where the decode path builds it (`precomputed`, or a
    decode_path that `reads_gate_table`): the model keeps E_l, G_l is built from it."""
    if not config.is_gated:
        return 0
    embeddings = count_params(config) - count_params(config, include_gate_tables=False)
    path = decode_path_table(config).get(decode_path)
    builds_table = config.gate_placement == "up" and (precomputed or (path is not None and path.reads_gate_table))
    return embeddings + (config.n_layers * config.vocab_size * config.gate_norm_dim if builds_table else 0)


def gate_row_cache_bytes(config: ModelConfig, resident_ids: int, bytes_per_id: int) -> int:
    """Device bytes of an offload (egmla.infer.offload) that keeps the gate rows of `resident_ids` ids: its row cache,
    which grows by doubling and keeps a sixteenth of the vocabulary's room ahead (GenerationEngine._offload_slack), so
    up to min(vocab, max(2 x ids, vocab / 16)) rows of `bytes_per_id` (every offloaded table's row), plus its id -> slot
    map and resident flags (12 B per vocabulary id). 0 for a model without gate tables."""
    if not config.is_gated:
        return 0
    from egmla.infer.engine import OFFLOAD_ROOM_DIVISOR

    vocab = config.vocab_size
    rows = min(vocab, max(2 * resident_ids, vocab // OFFLOAD_ROOM_DIVISOR))
    return rows * bytes_per_id + 12 * vocab


def derived_weight_params(config: ModelConfig, decode_path: str, merged_products: bool = True) -> int:
    """Parameters a GPU decode step on `decode_path` reads besides the weights and the gate tables (counted apart):
    the tensors the engine's graphs read (egmla.infer.engine.precomputed_tensors) but the gate tables, counted on a model
    built on the meta device, so nothing is allocated. merged_products=False: without the merged products' copies
    (GenerationEngine(merged_products=False))."""
    from egmla.infer.engine import precomputed_tensors
    from egmla.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    model.set_decode_path(decode_path)
    model.set_merged_products(merged_products)
    tables = {id(getattr(layer.attn, "gate_table", None)) for layer in model.layers}
    tensors = {}
    for item in precomputed_tensors(model, cuda_graphs=True):
        for tensor in (item if isinstance(item, tuple) else (item,)):
            if tensor is not None and id(tensor) not in tables:
                tensors[id(tensor)] = tensor
    return sum(t.numel() for t in tensors.values())


def decode_workspace_bytes(config: ModelConfig, decode_path: str, context: int, item: int,
                           distinct_ids: int | None = None) -> int:
    """Bytes per sequence that one decode step allocates beside the cache, where that is not small: the grouped
    path's per-(sequence, id) and per-row buffers (egmla.kernels.grouped_workspace_bytes, one layer's at a time,
    plus the step's plan) at `distinct_ids` distinct ids per sequence (default: min(context, vocab), the most
    there can be). Other paths: 0, not counted (their temporaries are split partials and, for the same-table
    control's `absorbed` path, per-id terms of a few numbers per head: far smaller than the cache)."""
    if decode_path != "grouped":
        return 0
    from egmla.kernels import grouped_workspace_bytes

    distinct = min(context, config.vocab_size, distinct_ids or context)
    return grouped_workspace_bytes(config.n_heads, config.kv_lora_rank, config.v_head_dim, context, distinct, item)


def plan_row(config: ModelConfig, context: int, memory_gb: float, dtype: str = "bf16",
             reserve_gb: float = 0.0, precomputed_gate_table: bool = False, decode_path: str | None = None,
             distinct_ids: int | None = None, cache_layout: str | None = None, merged_products: bool = True,
             resident_ids: int | None = None, cache_dtype: str = "auto") -> dict:
    """One variant's plan: bytes per part and the sequences that fit with gate tables on GPU / offloaded, and
    with the decode step's working memory counted too (`decode_workspace_bytes`).

    Offloaded, the device still holds the rows of the ids the cache holds (`gate_row_cache_bytes`): of
    `resident_ids` ids, the distinct ids of every sequence together, default the most there can be, the sequences x
    min(T, distinct_ids) (real text shares most ids across sequences: 1,187 of 32K ids per 4K English tokens).

    The cache layout is that of `decode_path` where the variant has that path (e.g. 'grouped' and 'kernel'
    also store LayerNorm statistics), else of the variant's default path. "auto": the path `egmla generate`
    takes on a GPU at the batch that fits (`cuda_decode_path`: EG-MLA's 'grouped', with its working memory,
    where its batch x context reaches GROUPED_MIN_POSITIONS). cache_layout: the path whose cache layout is
    allocated, if not `decode_path`'s (under "auto" EG-MLA's cache has the grouped layout on either path).
    cache_dtype "fp8": an fp8 cache (torch.float8_e4m3fn); "fp8-keep-rope": the same but the RoPE keys in `dtype`."""
    if decode_path == "auto":
        return auto_plan_row(config, context, memory_gb, dtype, reserve_gb, precomputed_gate_table, distinct_ids,
                             merged_products, resident_ids, cache_dtype)
    torch_dtype = DTYPES[dtype]
    item = torch.tensor([], dtype=torch_dtype).element_size()
    path = decode_path if decode_path in decode_paths(config) else decode_paths(config)[0]
    fp8 = cache_dtype in ("fp8", "fp8-keep-rope")
    stored = cache_format(checked_cache_dtype(None if cache_dtype == "auto" else cache_dtype), torch_dtype)
    cache_per_token, _ = measured_cache_bytes_per_token(config, stored, cache_layout or path)
    derived = derived_weight_params(config, path, merged_products) * item
    weights = count_params(config, include_gate_tables=False) * item + derived
    tables = gate_table_params(config, precomputed_gate_table, path) * item
    per_sequence = cache_per_token * context
    workspace = decode_workspace_bytes(config, path, context, item, distinct_ids)
    budget = memory_gb * GB - reserve_gb * GB

    def fit(resident: float, extra: float = 0.0) -> int:
        return max(0, int((budget - resident) // (per_sequence + extra)))

    from egmla.infer.offload import offloadable as offload_serves

    offloadable = offload_serves(config, path)  # the path gathers gate rows by id or slot (egmla.infer.offload)
    ids_per_sequence = min(context, config.vocab_size, distinct_ids or context)
    bytes_per_id = tables // config.vocab_size if config.is_gated else 0

    def row_cache(sequences: int) -> int:
        return gate_row_cache_bytes(config, resident_ids or sequences * ids_per_sequence, bytes_per_id)

    def fit_offloaded() -> int:  # the most sequences whose cache and row cache fit beside the weights
        low, high = 0, fit(weights)
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if weights + row_cache(middle) + middle * per_sequence <= budget else (
                low, middle - 1)
        return low

    offloaded = fit_offloaded() if offloadable else None

    return {
        "variant": config.variant_name(),
        "attention": config.attention,
        "decode_path": path,
        "cache_dtype": cache_dtype if fp8 else dtype,
        "cache_bytes_per_token": cache_per_token,
        "cache_bytes_per_sequence": per_sequence,
        "weight_bytes": weights,
        "derived_weight_bytes": derived,  # part of weight_bytes: copies the decode path derives from the weights
        "gate_table_bytes": tables,
        "sequences": fit(weights + tables),
        "sequences_gate_tables_offloaded": offloaded,
        "gate_row_cache_bytes": row_cache(offloaded) if offloadable else None,  # at that many sequences
        "decode_workspace_bytes_per_sequence": workspace,
        "sequences_with_decode_workspace": fit(weights + tables, workspace),
    }


def auto_plan_row(config: ModelConfig, context: int, memory_gb: float, dtype: str, reserve_gb: float,
                  precomputed_gate_table: bool, distinct_ids: int | None, merged_products: bool = True,
                  resident_ids: int | None = None, cache_dtype: str = "auto") -> dict:
    """plan_row for the path generation picks on a GPU by itself: 'grouped' where the batch that fits with its
    working memory reaches GROUPED_MIN_POSITIONS, else the CUDA default at a batch below that threshold."""
    args = (context, memory_gb, dtype, reserve_gb, precomputed_gate_table)
    options = dict(distinct_ids=distinct_ids, merged_products=merged_products, resident_ids=resident_ids,
                   cache_dtype=cache_dtype)
    if "grouped" not in decode_paths(config):
        return plan_row(config, *args, decode_path=cuda_decode_path(config), **options)
    # the engine's cache has the grouped layout on either path (GenerationEngine.share_cache_across_paths)
    row = plan_row(config, *args, decode_path=cuda_decode_path(config), cache_layout="grouped", **options)
    grouped = plan_row(config, *args, decode_path="grouped", **options)
    if grouped["sequences_with_decode_workspace"] * context >= GROUPED_MIN_POSITIONS:
        return grouped
    below = -(-GROUPED_MIN_POSITIONS // context) - 1  # the most sequences that still run on the CUDA default
    for column in ("sequences", "sequences_gate_tables_offloaded", "sequences_with_decode_workspace"):
        row[column] = min(row[column], below) if row[column] is not None else None
    return row


def plan_rows(base: ModelConfig, context: int, memory_gb: float, dtype: str = "bf16", reserve_gb: float = 0.0,
              precomputed_gate_table: bool = False, decode_path: str | None = None,
              distinct_ids: int | None = None, merged_products: bool = True,
              resident_ids: int | None = None, cache_dtype: str = "auto") -> list[dict]:
    """The model `base` and the same shape under every other variant (egmla.accounting.variant_configs),
    with ratios of sequences against MHA and MLA kv256."""
    if context <= 0 or not 0 < memory_gb < math.inf:
        raise ValueError(f"context={context}, memory_gb={memory_gb}: both must be positive and finite")
    if not 0 <= reserve_gb < math.inf:
        raise ValueError(f"reserve_gb={reserve_gb}: must be >= 0 and finite (memory set aside, not added)")
    if distinct_ids is not None and distinct_ids <= 0:
        raise ValueError(f"distinct_ids={distinct_ids}: must be positive (distinct token ids per sequence)")
    if resident_ids is not None and resident_ids <= 0:
        raise ValueError(f"resident_ids={resident_ids}: must be positive (distinct token ids of every cached "
                         f"sequence together, whose gate rows an offload keeps on the device)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    if cache_dtype not in ("auto", "fp8", "fp8-keep-rope"):
        raise ValueError(f"cache_dtype={cache_dtype!r}: choose auto (the cache in dtype), fp8 or fp8-keep-rope (fp8 "
                         f"but the RoPE keys in dtype)")
    known = sorted({path for config in variant_configs(base) for path in decode_paths(config)} | {"auto"})
    if decode_path is not None and decode_path not in known:
        raise ValueError(f"decode_path={decode_path!r}: no variant has it; choose one of {', '.join(known)}")
    rows = []
    for config in variant_configs(base):
        row = plan_row(config, context, memory_gb, dtype, reserve_gb, precomputed_gate_table, decode_path, distinct_ids,
                       merged_products=merged_products, resident_ids=resident_ids, cache_dtype=cache_dtype)
        row["is_model"] = config.to_dict() == base.to_dict()
        rows.append(row)
    for key, reference in (("vs_mha", "MHA"), ("vs_mla_kv256", "MLA kv256")):
        ref = next((r for r in rows if r["variant"] == reference), None)
        for row in rows:
            for column in ("sequences", "sequences_gate_tables_offloaded"):
                denominator = ref[column] if ref else 0
                row[f"{column}_{key}"] = row[column] / denominator if denominator and row[column] is not None else None
    return rows


def format_plan(rows: list[dict], title: str) -> str:
    def ratio(value):
        return f"{value:.2f}x" if value is not None else "-"

    def count(value):
        return f"{value:,}" if value is not None else "-"

    header = (f"{'variant':<27} {'cache B/tok':>11} {'MB/seq':>8} {'weights GB':>10} {'gates GB':>8} "
              f"{'seqs':>7} {'vs MHA':>7} {'vs MLA256':>9} {'seqs, gates off GPU':>19} {'vs MHA':>7} {'vs MLA256':>9}")
    lines = [title, header, "-" * len(header)]
    for r in rows:
        name = ("* " if r["is_model"] else "  ") + r["variant"]
        gates = f"{r['gate_table_bytes'] / GB:.3f}" if r["gate_table_bytes"] else "-"
        lines.append(
            f"{name:<27} {r['cache_bytes_per_token']:>11,.0f} {r['cache_bytes_per_sequence'] / 1e6:>8.1f} "
            f"{r['weight_bytes'] / GB:>10.3f} {gates:>8} {r['sequences']:>7,} {ratio(r['sequences_vs_mha']):>7} "
            f"{ratio(r['sequences_vs_mla_kv256']):>9} {count(r['sequences_gate_tables_offloaded']):>19} "
            f"{ratio(r['sequences_gate_tables_offloaded_vs_mha']):>7} "
            f"{ratio(r['sequences_gate_tables_offloaded_vs_mla_kv256']):>9}")
    lines.append("* = the model asked about. seqs: gate tables on the GPU; 'gates off GPU': gate tables in host "
                 "memory (--offload-gate-tables); the device still holds the rows of the ids the cache holds, counted "
                 "at twice --resident-ids (default: the most there can be, sequences x distinct ids, i.e. up to the "
                 "tables' own size) with a sixteenth of the vocabulary at least, and 12 B per vocabulary id; '-' "
                 "where the decode path cannot offload them (none of EG-MLA's today).")
    lines.append("weights: the parameters and the copies a GPU decode step derives from them (folded absorption, "
                 "merged products); cache B/tok measured from an allocated cache (EG-MLA includes its 4 B token id); "
                 "GB = 1e9 B; activations and allocator slack are not counted (use --reserve-gb).")
    for r in rows:
        if r["decode_workspace_bytes_per_sequence"]:
            lines.append(f"{r['variant']} on '{r['decode_path']}': a decode step also allocates "
                         f"{r['decode_workspace_bytes_per_sequence'] / 1e6:.1f} MB per sequence beside the cache "
                         f"(per-id and per-row buffers of one layer, and the step's plan; --distinct-ids sets the ids "
                         f"per sequence, default the most there can be): {r['sequences_with_decode_workspace']:,} "
                         f"sequences fit with it.")
    return "\n".join(lines)


def serving_max_batch(config: ModelConfig, max_len: int, free_bytes: int, dtype: torch.dtype, decode_path: str,
                      prefill_tokens: int, memory_fraction: float = 0.9, limit: int | None = None,
                      prefill_steps: bool = False, graph_logits_rows: Callable[[int], int] | None = None,
                      gate_row_bytes: int = 0, cache_dtype: torch.dtype | None = None) -> dict:
    """`egmla serve --max-batch auto`: the most cache rows of `max_len` positions that fit in `memory_fraction` of
    `free_bytes` (the device's free memory measured after the weights are loaded), less the activations of a
    prefill forward of `prefill_tokens` tokens (its hidden states, attention inputs and FFN, twice over for
    temporaries) and of a prompt-logprobs forward's fp32 logits. Per row: the cache bytes of the layout the engine
    allocates ('auto' gives an EG-MLA cache the grouped layout) plus, where the decode may take the grouped path,
    its working memory at the most distinct ids a row can hold. Capped at `limit` (the largest graph-captured
    batch). prefill_steps: the engine prefills through CUDA-graph steps (egmla/infer/prefill_step.py), which keep a
    scratch cache of PREFILL_GRAPH_TOKENS positions and their graphs' activations of as many tokens, in addition.
    graph_logits_rows(max_batch): the rows of logits ([rows, vocab] each, in `dtype`) that the CUDA graphs captured
    for that many rows keep (every decode bucket's and the prefill steps captured at the start): reserved too, so the
    rows are the most whose cache and kept logits fit. gate_row_bytes: the gate tables are offloaded (the engine's
    offload), each resident id's rows take that many bytes; the offload's row cache is reserved at its bound for
    that many rows (`gate_row_cache_bytes` of every position's id distinct: for long rows, the tables' own size).
    cache_dtype: the cache's, where not `dtype` (torch.float8_e4m3fn: an fp8 cache; "fp8-keep-rope").
    Returns the rows and the figures behind them; raises ValueError where not even one row fits."""
    from egmla.infer.prefill_step import PREFILL_GRAPH_TOKENS
    from egmla.infer.scheduler import PROMPT_LOGPROBS_CHUNK

    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction={memory_fraction}: must lie in (0, 1] (the share of free memory to use)")
    item = torch.tensor([], dtype=dtype).element_size()
    paths = decode_paths(config)
    grouped_possible = "grouped" in paths and decode_path in ("auto", "grouped")
    layout = "grouped" if grouped_possible else (cuda_decode_path(config) if decode_path == "auto" else decode_path)
    per_token, _ = measured_cache_bytes_per_token(config, cache_format(cache_dtype, dtype), layout)
    workspace = decode_workspace_bytes(config, "grouped", max_len, item) if grouped_possible else 0
    per_row = per_token * max_len + workspace
    heads = (config.n_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
             if config.is_latent else 3 * config.d_model)  # per token: queries, keys and values of every head
    width = 4 * config.d_model + 3 * config.ffn_dim + 3 * heads
    activations = 2 * prefill_tokens * width * item + 2 * PROMPT_LOGPROBS_CHUNK * config.vocab_size * 4
    if prefill_steps:
        activations += PREFILL_GRAPH_TOKENS * (per_token + 2 * width * item)
    budget = memory_fraction * free_bytes - activations
    rows = int(budget // per_row) if budget > 0 else 0
    logits_row = config.vocab_size * item

    def kept(count: int) -> int:
        return graph_logits_rows(count) * logits_row if graph_logits_rows is not None and count > 0 else 0

    def gate_rows(count: int) -> int:
        return gate_row_cache_bytes(config, count * max_len, gate_row_bytes) if gate_row_bytes else 0

    if graph_logits_rows is not None or gate_row_bytes:  # the most rows whose cache, graphs' logits and gate rows fit
        low, high = 0, min(rows, limit) if limit else rows
        while low < high:
            middle = (low + high + 1) // 2
            low, high = ((middle, high) if middle * per_row + kept(middle) + gate_rows(middle) <= budget
                         else (low, middle - 1))
        rows = low
    if rows < 1:
        rows_note = (f" and the offloaded gate tables' rows up to {gate_rows(1) / GB:.2f} GB (give a number of rows "
                     f"instead: the rows real text holds are fewer)" if gate_row_bytes else "")
        raise ValueError(f"--max-batch auto: one row of {max_len} positions needs {per_row / GB:.3f} GB and a prefill "
                         f"forward ~{activations / GB:.2f} GB{rows_note}, more than {memory_fraction:.0%} of the "
                         f"{free_bytes / GB:.2f} GB free: lower --max-len or --prefill-chunk, or free device memory")
    return {"max_batch": min(rows, limit) if limit else rows, "fits": rows, "cache_layout": layout,
            "bytes_per_row": per_row, "decode_workspace_bytes_per_row": workspace, "activation_bytes": activations,
            "graph_logits_bytes": kept(min(rows, limit) if limit else rows),
            "gate_row_cache_bytes": gate_rows(min(rows, limit) if limit else rows),
            "free_bytes": free_bytes, "memory_fraction": memory_fraction}
