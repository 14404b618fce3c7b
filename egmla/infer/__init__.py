"""Inference: batched generation over compressed KV caches, continuous batching, sampling, gate-table offload,
memory planning."""
from egmla.infer.engine import Generation, GenerationEngine, GenerationStats, TokenEvent
from egmla.infer.requests import RequestHandle, SchedulerStats
from egmla.infer.sampling import SamplingParams, filter_logits, select_next
from egmla.infer.scheduler import Scheduler

__all__ = ["Generation", "GenerationEngine", "GenerationStats", "RequestHandle", "SamplingParams", "Scheduler",
           "SchedulerStats", "TokenEvent", "filter_logits", "select_next"]
