"""Tiny models of every variant, a tokenizer and run directories on disk, for the inference tests."""
import json
from pathlib import Path

import torch

from egmla.config import ModelConfig
from egmla.model import Transformer
from egmla.runs import FORMAT_VERSION, save_weights
from tests.conftest import perturbed
from tests.variant_kinds import KINDS, with_latent_sizes

VOCAB = 300
# init_std 0.1 (not 0.02) so that random models have clear argmax margins: greedy ties between paths
# that differ by rounding (1e-7) would be luck, not a bug.
SHAPE = dict(vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=4, max_seq_len=48, init_std=0.1)
VARIANTS = with_latent_sizes(KINDS)  # every kind of registered variant (tests/variant_kinds.py)

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


def forward_into_one_buffer(monkeypatch, step_class=None) -> None:
    """`step_class.forward` (PrefillStep's by default; DecodeStep's too) as a graph replay behaves: each call rewrites
    the one output buffer kept since the first."""
    from egmla.infer.prefill_step import PrefillStep

    step_class = PrefillStep if step_class is None else step_class
    forward = step_class.forward

    def into_one_buffer(step):
        out = forward(step)
        if getattr(step, "_buffer", None) is None:
            step._buffer = out.clone()
        else:
            step._buffer.copy_(out)
        return step._buffer

    monkeypatch.setattr(step_class, "forward", into_one_buffer)


# ---- exactness against one full forward -------------------------------------------------------------------------
# Tokens alone catch a wrong decode path poorly: a tiny random model's argmax wins by a wide margin, so a path that
# drops a norm's gamma or scales a head still emits the same tokens for many steps. Each step's whole distribution
# shows it. The limit, relative 1e-4 in fp32, sits ~300x above what the correct paths give (1e-7).
def full_forward_log_probs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The reference distributions: log_softmax (fp32) of one training forward of prompt + tokens (no cache) at each
    position that predicts one of `tokens`, [len(tokens), vocab], on the CPU (the model may be on a GPU)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(tokens[:-1])], device=device))[0]
    return logits.float().log_softmax(dim=-1)[len(prompt) - 1:].cpu()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over the last dimension, the largest over the rest (NaN if any is)."""
    errors = (actual - expected).norm(dim=-1) / expected.norm(dim=-1)
    return float("nan") if errors.isnan().any() else errors.max().item()


def assert_log_probs_match(actual: torch.Tensor, expected: torch.Tensor, tokens: torch.Tensor, where) -> None:
    """fp32 agreement (the project's relative 1e-4; NaN and inf never pass) of [sequences, steps, vocab]
    log-probabilities, each step's whole distribution and the generated tokens' own log-probabilities."""
    assert actual.shape == expected.shape, where
    assert torch.isfinite(actual).all(), where
    assert relative_error(actual, expected) < 1e-4, (where, relative_error(actual, expected))
    chosen, want = (t.gather(-1, tokens[..., None])[..., 0] for t in (actual, expected))
    assert relative_error(chosen, want) < 1e-4, (where, relative_error(chosen, want))


def record_step_log_probs(monkeypatch) -> list[torch.Tensor]:
    """The log-probabilities (fp32, [rows, vocab]) of every set of logits GenerationEngine.generate picks tokens from
    (`select_next`'s input: the prefill's, then each decode step's, eager or replayed from a graph), in order, from
    now until the monkeypatch is undone: the `step_log_probs` fixture (conftest.py)."""
    import egmla.infer.engine as engine_module
    from egmla.infer.sampling import select_next

    seen = []

    def recording(logits, *args, **kwargs):
        seen.append(logits.detach().float().log_softmax(dim=-1))
        return select_next(logits, *args, **kwargs)

    monkeypatch.setattr(engine_module, "select_next", recording)
    return seen


def assert_steps_match_full_forward(model, prompts: list[list[int]], results, recorded: list[torch.Tensor],
                                    where) -> None:
    """`step_log_probs` of one generate call against the full forward of each prompt + its tokens, to fp32 (as
    assert_log_probs_match). Pass as `model` one whose forward shares nothing with what is under test (a copy with its
    gate tables on the device for an offload: its full forward would read the offloaded rows too). Sequences may end
    at different steps: step s has one row per sequence the engine still holds, in prompt order; a finished
    sequence's row is dropped where the engine compacts the live rows to the front (its batch bucket shrank), else it
    stays, unread."""
    assert len(recorded) == max(len(r.token_ids) for r in results), where
    steps: list[list[torch.Tensor]] = [[] for _ in results]
    rows: list[int | None] = list(range(len(results)))  # the engine's rows: sequence index, None once finished
    for s, log_probs in enumerate(recorded):
        live = [i for i in rows if i is not None]
        if log_probs.shape[0] == len(live):
            rows = live  # compacted (or none finished)
        assert log_probs.shape[0] == len(rows), (where, s, log_probs.shape, rows)
        for row, i in enumerate(rows):
            if i is not None:
                steps[i].append(log_probs[row])
        rows = [i if i is not None and len(results[i].token_ids) > s + 1 else None for i in rows]
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        assert_log_probs_match(torch.stack(steps[i]), full_forward_log_probs(model, prompt, result.token_ids),
                               torch.tensor(result.token_ids), (where, i))


def assert_served_log_probs_match(model, prompt: list[int], result, where) -> None:
    """The log-probabilities a Scheduler served one request (submitted with logprobs=k; its steps' logits never pass
    the engine's `select_next`, so `step_log_probs` sees none): each generated token's and the k most likely tokens'
    at its step, against one full forward of prompt + tokens, to fp32 (relative 1e-4, NaN and inf never pass). The
    served top ids are checked by their reference values, so that a near tie cannot fail it by order alone."""
    if not result.token_ids:  # a scoring request (max_new_tokens=0) generates nothing
        return
    reference = full_forward_log_probs(model, prompt, result.token_ids)
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids), where
    served = torch.tensor(result.logprobs)
    chosen = reference.gather(-1, torch.tensor(result.token_ids)[:, None])[:, 0]
    assert torch.isfinite(served).all() and relative_error(served, chosen) < 1e-4, \
        (where, relative_error(served, chosen))
    if result.top_logprobs and result.top_logprobs[0]:
        top_ids = torch.tensor([list(top) for top in result.top_logprobs])
        top = torch.tensor([list(top.values()) for top in result.top_logprobs])
        k = top.shape[1]
        assert torch.isfinite(top).all(), where
        assert relative_error(top, reference.gather(-1, top_ids)) < 1e-4, (where, "top ids")
        assert relative_error(top, reference.topk(k).values) < 1e-4, (where, "top values")
