"""KV-cache accounting: elements and bytes per token for every attention variant of one model shape.

Bytes are measured from the tensors a real `KVCache` allocates, next to the closed-form formula, so a
layout change that forgets something shows up as a mismatch.
"""
from __future__ import annotations

import torch

from egmla.attention import allocate_cache, attention_class, decode_paths
from egmla.attention.cache import Fp8KeepRope
from egmla.config import ModelConfig
from egmla.model import count_params
from egmla.variants import compared_configs


def variant_configs(base: ModelConfig) -> list[ModelConfig]:
    """The comparison set of egmla.variants (MHA, GQA-4, MLA and EG-MLA at several ranks, ...) at the shape
    of `base`, with `base` itself first when it is none of them."""
    rows = compared_configs(base)
    return rows if base in rows else [base, *rows]


def measured_cache_bytes_per_token(config: ModelConfig, dtype=torch.bfloat16, decode_path: str | None = None,
                                   probe_len: int = 16) -> tuple[float, float]:
    """(total, token-id part) bytes per token of a cache really allocated for 1 sequence of probe_len."""
    cache = allocate_cache(config, 1, min(probe_len, config.max_seq_len), dtype=dtype, device="cpu",
                           decode_path=decode_path)
    ids = cache.token_ids.numel() * cache.token_ids.element_size() if cache.token_ids is not None else 0
    return cache.bytes_per_token(), ids / cache.max_len


def kv_rows(configs: list[ModelConfig], dtype=torch.bfloat16) -> list[dict]:
    mha_elements = None
    rows = []
    for config in configs:
        if config.attention == "mha":
            mha_elements = config.kv_elements_per_token()
    for config in configs:
        elements = config.kv_elements_per_token()
        paths = decode_paths(config)
        measured, id_bytes = measured_cache_bytes_per_token(config, dtype, paths[0])
        fp8, _ = measured_cache_bytes_per_token(config, torch.float8_e4m3fn, paths[0])  # --cache-dtype fp8
        keep_rope, _ = measured_cache_bytes_per_token(config, Fp8KeepRope(dtype), paths[0])  # fp8-keep-rope
        row = {
            "variant": config.variant_name(),
            "attention": config.attention,
            "kv_lora_rank": config.kv_lora_rank if config.is_latent else None,
            "kv_heads": None if config.is_latent else config.kv_heads,
            "elements_per_token": elements,
            "bytes_per_token_bf16": elements * 2,
            "measured_bytes_per_token": measured,
            "measured_bytes_per_token_fp8": fp8,
            "measured_bytes_per_token_fp8_keep_rope": keep_rope,
            "token_id_bytes_per_token": id_bytes,
            "reduction_vs_mha": (1 - elements / mha_elements) if mha_elements else None,
            "params": count_params(config),
            "params_without_gate_tables": count_params(config, include_gate_tables=False),
            "decode_paths": list(paths),
        }
        rows.append(row)
        path = grouped_path(config)
        if path:
            rows.append(grouped_row(row, config, dtype, mha_elements, path))
    return rows


def grouped_path(config: ModelConfig) -> str | None:
    """The decode path whose cache adds statistics and token groups (the variant's own cache spec says which:
    EG-MLA's 'grouped', the bias control's 'absorbed'); None where there is none."""
    specs = attention_class(config).cache_spec
    return next((path for path in decode_paths(config) if specs(config, path).needs_token_groups), None)


def grouped_row(row: dict, config: ModelConfig, dtype, mha_elements: int | None, path: str = "grouped") -> dict:
    """The same variant with the cache of decode path `path` (docs/design.md §4b): + (mu, rho) fp32 per
    position and layer, + the token groups (slot, rank, distinct id, count: int32) per position for all layers."""
    measured, id_bytes = measured_cache_bytes_per_token(config, dtype, path)
    fp8, _ = measured_cache_bytes_per_token(config, torch.float8_e4m3fn, path)
    keep_rope, _ = measured_cache_bytes_per_token(config, Fp8KeepRope(dtype), path)
    cache_bytes = row["bytes_per_token_bf16"] + 8 * config.n_layers  # two fp32 statistics per layer
    return {**row, "variant": f"{row['variant']} ({path}: +2 fp32 stats/layer)", "decode_paths": [path],
            "bytes_per_token_bf16": cache_bytes, "measured_bytes_per_token": measured, "measured_bytes_per_token_fp8": fp8,
            "measured_bytes_per_token_fp8_keep_rope": keep_rope, "token_id_bytes_per_token": id_bytes,
            "reduction_vs_mha": (1 - cache_bytes / (2 * mha_elements)) if mha_elements else None}


def format_kv_table(rows: list[dict]) -> str:
    name_width = max([26] + [len(r["variant"]) for r in rows])
    header = (f"{'variant':<{name_width}} {'elem/token':>10} {'bf16 B/token':>12} {'measured B/token':>16} "
              f"{'vs MHA':>8} {'fp8 B/token':>11} {'fp8-keep-rope':>13} {'params (M)':>11} {'w/o gate tables':>15}")
    lines = [header, "-" * len(header)]
    for r in rows:
        red = (f"{-100 * r['reduction_vs_mha']:+.1f}%" if r["attention"] != "mha" and r["reduction_vs_mha"] is not None else "-")
        lines.append(f"{r['variant']:<{name_width}} {r['elements_per_token']:>10,} {r['bytes_per_token_bf16']:>12,} "
                     f"{r['measured_bytes_per_token']:>16,.0f} {red:>8} {r['measured_bytes_per_token_fp8']:>11,.0f} "
                     f"{r['measured_bytes_per_token_fp8_keep_rope']:>13,.0f} "
                     f"{r['params'] / 1e6:>11.1f} "
                     f"{r['params_without_gate_tables'] / 1e6:>15.1f}")
    lines.append("elements/token sum all layers (docs/design.md §3); measured bytes come from an allocated bf16 cache "
                 "and include EG-MLA's token id (4 B/token, once for all layers); 'grouped' and the bias control's "
                 "'absorbed' rows add (mu, rho) fp32 per layer and 16 B of token groups (slot, rank, distinct id, "
                 "count; once for all layers) per token; fp8 B/token: measured from an fp8 cache (--cache-dtype fp8: "
                 "K/V and latents one byte each, token ids and statistics as they are); fp8-keep-rope: the same with "
                 "the RoPE keys (MLA's k_rope, MHA's K) in bf16 (--cache-dtype fp8-keep-rope).")
    return "\n".join(lines)
