"""Tiny models of every variant, a tokenizer and run directories on disk, for the inference tests."""
import json
from pathlib import Path

import torch

from egmla.config import ModelConfig
from egmla.model import Transformer
from egmla.runs import FORMAT_VERSION, save_weights
from tests.conftest import perturbed

VOCAB = 300
LATENT = dict(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
# init_std 0.1 (not 0.02) so that random models have clear argmax margins: greedy ties between paths
# that differ by rounding (1e-7) would be luck, not a bug.
SHAPE = dict(vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=4, max_seq_len=48, init_std=0.1)
VARIANTS = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_heads=2),
    "mla": dict(attention="mla", **LATENT),
    "eg-mla": dict(attention="eg-mla", gate_dim=32, **LATENT),
    "eg-mla-latent": dict(attention="eg-mla", gate_dim=32, gate_placement="latent", **LATENT),
    "eg-mla-add": dict(attention="eg-mla", gate_dim=32, gate_op="add", **LATENT),  # ablation: gate added
    "eg-mla-no-norm": dict(attention="eg-mla", gate_dim=32, gate_norm="none", **LATENT),  # ablation: no norm
    "eg-mla-identity": dict(attention="eg-mla", gate_dim=32, gate_init="identity", **LATENT),  # gate starts at 1
    "eg-mla-bias": dict(attention="eg-mla", gate_dim=32, gate_op="bias", **LATENT),  # issue 18's control
    "eg-mla-bias-v": dict(attention="eg-mla", gate_dim=32, gate_op="bias-v", **LATENT),  # the table on V alone
}

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
        "and arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
        "Café naïve — façade. ") * 20


def tiny_config(variant: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**SHAPE, **VARIANTS[variant], **overrides})


def tiny_model(variant: str, seed: int = 0, perturb: bool = True, **overrides) -> Transformer:
    """A random tiny model, perturbed (tests.conftest.perturbed) unless perturb=False: every parameter that starts
    constant (norm weights at 1, biases at 0, the identity gate's W_UE at 0) moved, so that a decode path or engine
    step that dropped one (LayerNorm's gamma or beta, the identity-started gate) would differ from the full forward
    here too. The perturbation draws from its own generator, not torch's global one."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(variant, **overrides))
    return (perturbed(model, seed=seed) if perturb else model).eval()


def train_tokenizer(vocab_size: int = VOCAB):
    """The project's byte-level BPE (id 0 = <|endoftext|>) on a few KB of text, in well under a second."""
    from egmla.data.tokenizer import train_tokenizer as train_bpe

    return train_bpe([TEXT], vocab_size)


def write_run(run_dir: Path, model: Transformer, tokenizer, format_version: int = FORMAT_VERSION) -> Path:
    """A run directory as `egmla train` writes it (config.json, tokenizer.json, model.safetensors)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"format_version": format_version,
                                                     "model": model.config.to_dict()}))
    tokenizer.save(str(run_dir / "tokenizer.json"))
    save_weights(model, run_dir / "model.safetensors")
    return run_dir


class GraphReplay:
    """Stands in for a captured CUDA graph on the CPU: replay() runs the step's forward into its logits."""

    def __init__(self, step):
        self.step = step

    def replay(self):
        self.step.logits = self.step.forward()


def prefill_steps_as_graphs(monkeypatch) -> None:
    """The engine hands out prefill steps marked as CUDA graphs (use_graph), as on a GPU."""
    from egmla.infer import GenerationEngine

    hand_out = GenerationEngine.prefill_step

    def as_graph(self, *args):
        step = hand_out(self, *args)
        if step is not None:
            step.use_graph = True
        return step

    monkeypatch.setattr(GenerationEngine, "prefill_step", as_graph)


def forward_into_one_buffer(monkeypatch) -> None:
    """PrefillStep.forward as a graph replay behaves: each call rewrites the one output buffer kept since the first."""
    from egmla.infer.prefill_step import PrefillStep

    forward = PrefillStep.forward

    def into_one_buffer(step):
        out = forward(step)
        if getattr(step, "_buffer", None) is None:
            step._buffer = out.clone()
        else:
            step._buffer.copy_(out)
        return step._buffer

    monkeypatch.setattr(PrefillStep, "forward", into_one_buffer)
