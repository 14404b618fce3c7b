"""The anchors a user would pick instead of egmla, timed at the same shape: transformers' own
`LlamaForCausalLM` (MHA) and `DeepseekV3ForCausalLM` (MLA, a dense SwiGLU MLP in every layer), random
weights, generating with `cache_implementation="static"` (transformers then compiles the decode step).

A step is timed as egmla's engine times its own: from one step's logits to the next, through the loop's
host work, marked by a logits processor that only records a CUDA event (see _StepClock).
"""
from __future__ import annotations

import statistics
import time

import torch

from egmla.config import ModelConfig

ANCHORS = ("llama", "deepseek-v3")


def anchor_model(name: str, config: ModelConfig, max_positions: int, device, dtype):
    """transformers' model `name` at the shape of `config` (layers, width, heads, MLP, vocab, head dims)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_dim,
                  num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                  num_key_value_heads=config.n_heads, max_position_embeddings=max_positions,
                  rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
                  pad_token_id=0, bos_token_id=None, eos_token_id=None)
    if name == "llama":
        hf_config, cls = LlamaConfig(**common, head_dim=config.mha_head_dim), LlamaForCausalLM
    elif name == "deepseek-v3":
        hf_config = DeepseekV3Config(
            **common, kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank or None,
            qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
            v_head_dim=config.v_head_dim, first_k_dense_replace=config.n_layers,  # dense MLP in every layer
            n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1)
        cls = DeepseekV3ForCausalLM
    else:
        raise ValueError(f"anchor {name!r}: choose one of {', '.join(ANCHORS)}")
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(hf_config).to(dtype).eval()
    return model


class _StepClock:
    """Marks when the model's first forward starts (the prefill, after generate() has set up its static cache, as
    egmla's prefill clock starts after its cache is allocated) and when each step's logits reach the logits
    processors. On CUDA the marks are events on the stream by default: they add no host sync to transformers' loop
    (whose stop check may run one step behind), and the time between two marks is the stream's, idle gaps included.
    sync=True marks with the host clock after a device sync instead (the clock of the tables timed before
    2026-12-06's change, kept to A/B it: docs/bench/anchor_clock_h100)."""

    def __init__(self, model, device: torch.device, sync: bool = False):
        self.events = device.type == "cuda" and not sync
        self.sync_device = device if device.type == "cuda" and sync else None
        self.marks: list = []
        self._hook = model.register_forward_pre_hook(self._first_forward)

    def _mark(self) -> None:
        if self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
            return
        if self.sync_device is not None:
            torch.cuda.synchronize(self.sync_device)
        self.marks.append(time.perf_counter())

    def _first_forward(self, module, args) -> None:
        self._hook.remove()  # once: the decode steps (compiled by transformers) run without it
        self._mark()

    def __call__(self, input_ids, scores):
        self._mark()
        return scores

    def remove(self) -> None:
        self._hook.remove()

    def seconds(self) -> list[float]:
        """[prefill, step 1, step 2, ...]: the times between consecutive marks."""
        if self.events:
            self.marks[-1].synchronize()
            return [start.elapsed_time(end) / 1e3 for start, end in zip(self.marks, self.marks[1:])]
        return [end - start for start, end in zip(self.marks, self.marks[1:])]


def time_anchor(model, prompts: list[list[int]], new_tokens: int, repeats: int, sync_clock: bool = False) -> dict:
    """Prefill and per-step times of `model.generate` (greedy, static cache, exactly new_tokens tokens);
    sync_clock: see _StepClock."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    runs = []
    for repeat in range(repeats + 1):  # the first compiles and captures: not measured
        clock = _StepClock(model, device, sync=sync_clock)
        try:
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                               logits_processor=LogitsProcessorList([clock]))
        finally:
            clock.remove()
        if repeat:
            times = clock.seconds()
            runs.append((times[0], times[1:]))
    steps = sorted(step for _, run in runs for step in run)
    batch = len(prompts)
    step = statistics.median(steps)
    return {"prefill_ms": 1e3 * statistics.median(p for p, _ in runs), "step_ms_median": 1e3 * step,
            "step_ms_p90": 1e3 * steps[int(0.9 * (len(steps) - 1))], "decode_tokens_per_s": batch / step}
