"""Tiny random run directories (config.json, tokenizer.json, model.safetensors) for the HF tests."""
import json
from pathlib import Path

import pytest
import torch

from egmla.config import ModelConfig
from egmla.model import Transformer
from egmla.runs import FORMAT_VERSION, save_weights
from tests.conftest import perturbed
from tests.variant_kinds import KINDS, LATENT, with_latent_sizes

TASKS_DIR = Path(__file__).resolve().parents[2] / "egmla" / "hf" / "tasks"
VOCAB = 300
# init_std 0.1 gives random models clear argmax margins, so greedy comparisons test code, not luck.
SHAPE = dict(vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=4, max_seq_len=64, init_std=0.1)
# Every kind of registered variant (tests/variant_kinds.py, read from egmla.variants), and a low-rank query with
# untied embeddings.
VARIANTS = {
    **with_latent_sizes(KINDS),
    "mla-qlora-untied": dict(attention="mla", q_lora_rank=24, tie_embeddings=False, **LATENT),
}


def pytest_generate_tests(metafunc):
    """A test taking `variant` runs on every variant above unless it parametrizes `variant` itself."""
    marks = [m for m in metafunc.definition.iter_markers("parametrize") if "variant" in str(m.args[0])]
    if "variant" in metafunc.fixturenames and not marks:
        metafunc.parametrize("variant", list(VARIANTS))


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(variant) -> the ModelConfig of that variant."""
    return lambda variant: ModelConfig(**SHAPE, **VARIANTS[variant])


@pytest.fixture(scope="session")
def tasks_dir() -> Path:
    return TASKS_DIR


@pytest.fixture(scope="session")
def bpe():
    """A byte-level BPE with <|endoftext|> (egmla's recipe), trained on the local task texts."""
    from egmla.data.tokenizer import train_tokenizer

    texts = [json.loads(line)["text"] for line in open(TASKS_DIR / "egmla_ppl.jsonl")]
    texts += [json.loads(line)["question"] for line in open(TASKS_DIR / "egmla_mc.jsonl")]
    tokenizer = train_tokenizer(texts * 4, VOCAB)
    assert tokenizer.get_vocab_size() <= VOCAB
    return tokenizer


@pytest.fixture(scope="session")
def make_run(tmp_path_factory, bpe, tiny_config):
    """make_run(variant) -> a run directory with a random tiny model of that variant (made once)."""
    made = {}

    def make(variant: str) -> Path:
        if variant not in made:
            torch.manual_seed(0)
            # perturbed (tests.conftest): the norm affines and the identity gate's W_UE, constant at initialisation,
            # moved, so that a cached or fast path dropping one differs from the full forward in these tests too
            model = perturbed(Transformer(tiny_config(variant)))
            run = tmp_path_factory.mktemp(f"run-{variant}")
            (run / "config.json").write_text(json.dumps({"format_version": FORMAT_VERSION,
                                                         "model": model.config.to_dict()}))
            bpe.save(str(run / "tokenizer.json"))
            save_weights(model, run / "model.safetensors")
            made[variant] = run
        return made[variant]

    return make


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any pickle load (pickle.load/loads, torch.load) fails the test."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
