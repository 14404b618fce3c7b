"""The anchors a user would pick instead of egmla, timed at the same shape: transformers' own
`LlamaForCausalLM` (MHA) and `DeepseekV3ForCausalLM` (MLA, a dense SwiGLU MLP in every layer), random
weights, generating with `cache_implementation="static"` (transformers then compiles the decode step).

A step is timed as egmla's engine times its own: from one step's logits to the next, through the loop's
host sync, read by a logits processor that only records the time.
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
    """A logits processor that records when each step's logits are ready for sampling: it waits for them (on CUDA
    generate() queues the prefill's kernels and calls processors before they ran, so the prefill's end would be
    early; later steps are unchanged, transformers syncs on each one for its stop check anyway), as egmla's engine
    times a step up to its tokens on the host."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores


def time_anchor(model, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """Prefill and per-step times of `model.generate` (greedy, static cache, exactly new_tokens tokens)."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    runs = []
    for repeat in range(repeats + 1):  # the first compiles and captures: not measured
        clock = _StepClock()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                           logits_processor=LogitsProcessorList([clock]))
        if repeat:
            runs.append((clock.times[0] - start, [b - a for a, b in zip(clock.times, clock.times[1:])]))
    steps = sorted(step for _, run in runs for step in run)
    batch = len(prompts)
    step = statistics.median(steps)
    return {"prefill_ms": 1e3 * statistics.median(p for p, _ in runs), "step_ms_median": 1e3 * step,
            "step_ms_p90": 1e3 * steps[int(0.9 * (len(steps) - 1))], "decode_tokens_per_s": batch / step}
