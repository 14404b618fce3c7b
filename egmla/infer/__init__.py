"""Inference: batched generation over compressed KV caches, sampling, gate-table offload, memory planning."""
from egmla.infer.engine import Generation, GenerationEngine, GenerationStats, TokenEvent, keep_cache_rows
from egmla.infer.sampling import SamplingParams, filter_logits, select_next

__all__ = ["Generation", "GenerationEngine", "GenerationStats", "SamplingParams", "TokenEvent",
           "filter_logits", "keep_cache_rows", "select_next"]
