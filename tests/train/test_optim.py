"""AdamW groups (no decay on norms, biases, embeddings, gate tables) and the lr schedules."""
import pytest

from egmla.config import preset
from egmla.model import Transformer
from egmla.train.config import TrainConfig
from egmla.train.optim import build_optimizer, lr_at


def test_weight_decay_only_on_matrices():
    model = Transformer(preset("tiny", vocab_size=300, n_layers=1, d_model=32, n_heads=2, kv_lora_rank=16, gate_dim=8))
    decay, plain = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in plain["params"]}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {"tok_embeddings.weight", "layers.0.attn.gate_embed.weight", "norm.weight",
            "layers.0.attn.kv_norm.weight", "layers.0.attn.gate_norm.weight",
            "layers.0.attn.gate_norm.bias"} <= undecayed
    assert {"layers.0.attn.wq.weight", "layers.0.attn.wue.weight", "layers.0.ffn.w1.weight"} <= decayed
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))


def test_cosine_warmup_and_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, cfg) < 1.0 and lr_at(54, cfg) == pytest.approx(0.55, abs=0.02)
    assert lr_at(99, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(10, 100)]
    assert values == sorted(values, reverse=True)


def test_wsd_is_flat_then_decays_linearly():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert all(lr_at(s, cfg) == 1.0 for s in range(10, 80))
    assert lr_at(89, cfg) == pytest.approx(0.5) and lr_at(99, cfg) == pytest.approx(0.0)
    assert lr_at(50, TrainConfig(steps=100, lr=2.0, warmup_steps=10, schedule="constant")) == 2.0
