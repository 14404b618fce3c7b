"""Attention variants behind one registry, selected by `ModelConfig.attention`."""
from egmla.attention.cache import CacheSpec, KVCache, LayerCache
from egmla.attention.context import AttnContext
from egmla.attention.egmla import EmbeddingGatedMLA
from egmla.attention.mha import GroupedQueryAttention
from egmla.attention.mla import MultiHeadLatentAttention
from egmla.attention.paths import DecodePath
from egmla.attention.table_bias import TableBiasMLA

ATTENTION_CLASSES = {
    "mha": GroupedQueryAttention,
    "gqa": GroupedQueryAttention,
    "mla": MultiHeadLatentAttention,
    "eg-mla": EmbeddingGatedMLA,
}


def attention_class(config):
    """The class of `config.attention`; for EG-MLA's same-table controls (gate_op 'bias', 'bias-v') their own."""
    if config.adds_table:
        return TableBiasMLA
    return ATTENTION_CLASSES[config.attention]


def decode_path_table(config) -> dict[str, DecodePath]:
    """The decode paths this config supports, by name, with what each reads and keeps; the first is the default."""
    return attention_class(config).decode_path_table(config)


def decode_paths(config) -> tuple[str, ...]:
    """Decode paths this config supports; the first is the default."""
    return tuple(decode_path_table(config))


# The grouped EG-MLA decode beats the fused `kernel` once a step covers this many cached positions (batch x context):
# on one H200 at paper-base they tie at 16,384 (batch 32 x 512, 8 x 2,048, 2 x 8,192) and grouped leads from 32,768
# on (docs/bench/generate_h200_crossover.md); below, its per-step plan and bookkeeping cost more than it saves.
GROUPED_MIN_POSITIONS = 16_384


def fastest_decode_path(config, device, batch_size: int | None = None, context: int | None = None) -> str:
    """The decode path generation takes by default on `device`: `cuda_decode_path` on a CUDA device the Triton
    kernels run on, the variant's first path elsewhere."""
    import torch

    from egmla.kernels import kernel_unavailable_reason

    if torch.device(device).type == "cuda" and kernel_unavailable_reason(device) is None:
        return cuda_decode_path(config, batch_size, context)
    return decode_paths(config)[0]


def cuda_decode_path(config, batch_size: int | None = None, context: int | None = None) -> str:
    """The default decode path on CUDA: the Triton 'kernel' of MHA/GQA, MLA and EG-MLA, EG-MLA's 'grouped' instead
    where batch_size x context (the positions a step reads, when given) is at least GROUPED_MIN_POSITIONS, and for
    the same-table control (no 'kernel') its 'absorbed' decode, Triton too, 1.5-1.8x faster than its 'gate-table'
    at batch 32 and 128 in one H200 run (docs/benchmarks.md §2 has the measurements behind each choice)."""
    paths = decode_paths(config)
    if "grouped" in paths and batch_size and context and batch_size * context >= GROUPED_MIN_POSITIONS:
        return "grouped"
    for fast in ("kernel", "absorbed"):  # every variant with 'absorbed' has 'kernel' but the control
        if fast in paths:
            return fast
    return paths[0]


def check_decode_path(config, path: str) -> str:
    paths = decode_paths(config)
    if path not in paths:
        raise ValueError(f"decode_path={path!r} is not available for {config.variant_name()}; "
                         f"choose one of {', '.join(paths)}")
    return path


def checked_cache_dtype(cache_dtype, name: str = "cache_dtype"):
    """A cache dtype as a user gives it (None or "auto": the model's; "fp8" or torch.float8_e4m3fn: an fp8 cache, which
    every variant keeps; "fp8-keep-rope": fp8 but the RoPE keys in the model's dtype, egmla.attention.cache.Fp8KeepRope;
    any other torch dtype as given) as a torch dtype, "fp8-keep-rope" or None (`cache_format` resolves the last two
    against the model's dtype)."""
    import torch

    from egmla.attention.cache import FP8, FP8_KEEP_ROPE

    if cache_dtype in (None, "auto"):
        return None
    if cache_dtype == "fp8":  # as the command line spells it
        cache_dtype = FP8
    if cache_dtype == FP8_KEEP_ROPE or isinstance(cache_dtype, torch.dtype):
        return cache_dtype
    raise ValueError(f"{name}={cache_dtype!r}: a torch dtype (torch.float8_e4m3fn for an fp8 cache), 'fp8', "
                     f"'{FP8_KEEP_ROPE}' (fp8 but the RoPE keys in the model's dtype) or None for the model's")


def cache_format(cache_dtype, model_dtype):
    """What a cache is allocated in (KVCache's dtype) for a `checked_cache_dtype` value under a model of model_dtype:
    model_dtype for None, Fp8KeepRope(model_dtype) for "fp8-keep-rope", else cache_dtype."""
    from egmla.attention.cache import FP8_KEEP_ROPE, Fp8KeepRope

    if cache_dtype is None:
        return model_dtype
    return Fp8KeepRope(model_dtype) if cache_dtype == FP8_KEEP_ROPE else cache_dtype


def allocate_cache(config, batch_size: int, max_len: int | None = None, dtype=None, device=None,
                   decode_path: str | None = None, fp8_tensors=()) -> KVCache:
    """A cache for `batch_size` sequences of up to `max_len` tokens, holding only what the variant needs. dtype
    torch.float8_e4m3fn: an fp8 cache (egmla/attention/cache.py), Fp8KeepRope(model dtype) the same but the RoPE keys
    (`cache_format` makes one); fp8_tensors: only these in fp8 (a measurement)."""
    import torch

    max_len = max_len or config.max_seq_len
    if max_len > config.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={config.max_seq_len}: "
                         f"use at most {config.max_seq_len} or a model config with a larger max_seq_len")
    if batch_size <= 0 or max_len <= 0:
        raise ValueError(f"batch_size={batch_size}, max_len={max_len}: both must be positive")
    path = check_decode_path(config, decode_path or decode_paths(config)[0])
    spec = attention_class(config).cache_spec(config, path)
    return KVCache([spec] * config.n_layers, batch_size, max_len, dtype=dtype or torch.float32, device=device,
                   fp8_tensors=fp8_tensors)


__all__ = ["ATTENTION_CLASSES", "AttnContext", "CacheSpec", "DecodePath", "EmbeddingGatedMLA", "GroupedQueryAttention",
           "KVCache", "LayerCache", "MultiHeadLatentAttention", "TableBiasMLA", "allocate_cache", "attention_class",
           "GROUPED_MIN_POSITIONS", "check_decode_path", "checked_cache_dtype", "cuda_decode_path", "decode_path_table",
           "decode_paths", "fastest_decode_path", "cache_format"]
