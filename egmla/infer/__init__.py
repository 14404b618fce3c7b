"""Inference: batched generation over compressed KV caches, sampling, gate-table offload, memory planning."""
from egmla.infer.engine import Generation, GenerationEngine, GenerationStats, TokenEvent
from egmla.infer.sampling import SamplingParams, filter_logits, select_next

__all__ = ["Generation", "GenerationEngine", "GenerationStats", "SamplingParams", "TokenEvent",
           "filter_logits", "select_next"]
