"""train.gate_table_update = "row-sparse": the lazy Adam step on EG-MLA's gate tables (egmla.train.optim.RowSparseAdamW)
against a hand-written reference and against dense AdamW where the two are the same update, and its state
through checkpoints and --resume."""
import argparse
import json
import shutil

import pytest
import torch

from egmla.config import preset
from egmla.model import Transformer
from egmla.train import checkpoint as ckpt
from egmla.train.cli import add_arguments, resolve_config
from egmla.train.config import TrainConfig
from egmla.train.distributed import DistInfo, clip_grad_norm
from egmla.train.optim import RowSparseAdamW, build_optimizer, gate_tables, param_groups
from egmla.train.loss import token_loss
from egmla.train.trainer import train
from tests.train.helpers import run_config, train_losses

QUIET = dict(progress=False, log=lambda *_: None)
ROW_SPARSE = dict(train=dict(gate_table_update="row-sparse"))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


def tiny_model(vocab: int = 64) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=vocab, n_layers=2, d_model=32, n_heads=2, qk_nope_head_dim=8,
                              qk_rope_head_dim=8, v_head_dim=8, kv_lora_rank=16, gate_dim=8, max_seq_len=64))


def train_steps(mode: str, batches: list[torch.Tensor], device: str = "cpu", **train_options) -> Transformer:
    """The trainer's step (loss, backward, clip, optimizer step) over `batches` with the given gate-table update
    (on CUDA dense AdamW takes its foreach path, as in training)."""
    model = tiny_model().to(device)
    optimizer = build_optimizer(model, TrainConfig(gate_table_update=mode, lr=1e-2, **train_options))
    for ids in batches:
        ids = ids.to(device)
        token_loss(model, ids[:, :-1], ids[:, 1:]).backward()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def assert_same_weights(model, reference, **tolerance):
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param, expected, msg=name, **tolerance)


def test_build_optimizer_picks_the_update_and_keeps_adamws_groups():
    model = tiny_model()
    dense = build_optimizer(model, TrainConfig())
    sparse = build_optimizer(model, TrainConfig(gate_table_update="row-sparse"))
    assert type(dense) is torch.optim.AdamW and isinstance(sparse, RowSparseAdamW)
    assert [len(g["params"]) for g in dense.param_groups] == [len(g["params"]) for g in sparse.param_groups]
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(t)] for t in sparse.row_sparse] == ["layers.0.attn.gate_embed.weight",
                                                         "layers.1.attn.gate_embed.weight"]
    assert gate_tables(Transformer(preset("tiny", attention="mla", n_layers=1))) == []


@pytest.mark.parametrize("device", DEVICES)
def test_lazy_adam_matches_a_hand_written_reference_and_leaves_untouched_rows_alone(device):
    torch.manual_seed(1)
    table = torch.nn.Parameter(torch.randn(12, 5, device=device))
    bias = torch.nn.Parameter(torch.randn(5, device=device))
    lr, beta1, beta2, eps = 0.05, 0.8, 0.9, 1e-8
    optimizer = RowSparseAdamW([{"params": [table, bias], "weight_decay": 0.0}], row_sparse=[table], lr=lr,
                               betas=(beta1, beta2), eps=eps)
    weights, exp_avg, exp_avg_sq = (table.detach().clone(), torch.zeros(12, 5, device=device),
                                    torch.zeros(12, 5, device=device))
    for step, ids in enumerate(([0, 3, 3, 7], [1, 3], [7, 8, 9, 0], [3]), start=1):
        before = {key: value.clone() for key, value in optimizer.state[table].items() if key != "step"}
        table_before = table.detach().clone()
        ((table[torch.tensor(ids, device=device)] + bias) ** 2).sum().backward()
        grad = table.grad.clone()
        optimizer.step()
        optimizer.zero_grad()
        for row in sorted(set(ids)):  # Adam on each touched row, one at a time
            exp_avg[row] = beta1 * exp_avg[row] + (1 - beta1) * grad[row]
            exp_avg_sq[row] = beta2 * exp_avg_sq[row] + (1 - beta2) * grad[row] ** 2
            denom = (exp_avg_sq[row] / (1 - beta2 ** step)).sqrt() + eps
            weights[row] -= lr / (1 - beta1 ** step) * exp_avg[row] / denom
        state = optimizer.state[table]
        torch.testing.assert_close(table.detach(), weights, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state["exp_avg"], exp_avg, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sq"], exp_avg_sq, rtol=1e-6, atol=1e-7)
        assert float(state["step"]) == step
        untouched = torch.tensor([row not in ids for row in range(12)], device=device)
        assert torch.equal(table.detach()[untouched], table_before[untouched])  # bit for bit
        for key, value in before.items():
            assert torch.equal(state[key][untouched], value[untouched]), key
    assert not torch.equal(bias.detach(), torch.zeros(5, device=device))  # the other parameter took AdamW's step


@pytest.mark.parametrize("device", DEVICES)
def test_every_row_touched_every_step_is_dense_adamw(device):
    """When each batch holds every token id, lazy Adam and dense AdamW are the same update. On CUDA dense AdamW
    is fused, which rounds differently from the lazy step's foreach ops: one step there (see the fused test)."""
    torch.manual_seed(2)
    batches = [torch.stack([torch.randperm(64) for _ in range(3)]) for _ in range(4)]  # every id as an input
    batches = [torch.cat([ids, ids[:, :1]], dim=1) for ids in batches]  # + one target column
    batches = batches[:1] if device == "cuda" else batches
    dense, sparse = train_steps("dense", batches, device), train_steps("row-sparse", batches, device)
    start = tiny_model().layers[0].attn.gate_embed.weight.to(device)
    assert not torch.equal(dense.layers[0].attn.gate_embed.weight, start)
    assert_same_weights(sparse, dense, rtol=1e-6, atol=1e-7)  # bit for bit on the CPU today


def test_the_lazy_step_sits_on_fused_adamw_too():
    """On CUDA build_optimizer takes AdamW's fused kernel for everything but the tables (the CPU has one too).
    One step: after it the fused and foreach roundings of the tables make later gradients differ, and Adam
    turns tiny gradient differences of near-zero gradients (the gate norm's bias) into visible ones."""
    torch.manual_seed(2)
    ids = torch.stack([torch.randperm(64) for _ in range(3)])
    batches = [torch.cat([ids, ids[:, :1]], dim=1)]
    models = []
    for lazy in (False, True):
        model = tiny_model()
        optimizer = RowSparseAdamW(param_groups(model, 0.1), row_sparse=gate_tables(model) if lazy else [], lr=1e-2,
                                   fused=True)
        for ids in batches:
            token_loss(model, ids[:, :-1], ids[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        models.append(model)
    assert not torch.equal(models[0].layers[0].attn.gate_embed.weight, tiny_model().layers[0].attn.gate_embed.weight)
    assert_same_weights(models[1], models[0], rtol=1e-6, atol=1e-7)  # fused and foreach round differently


def test_memoryless_adam_is_the_same_on_any_batch():
    """With beta1 = beta2 = 0 Adam keeps no memory (each step is g / (|g| + eps), sign-SGD up to eps): an
    untouched row does not move under dense AdamW either, so the two agree on batches that skip most rows."""
    torch.manual_seed(3)
    batches = [torch.randint(0, 16, (2, 9)) for _ in range(4)]  # ids 0..15 of 64: most rows untouched
    dense = train_steps("dense", batches, beta1=0.0, beta2=0.0)
    sparse = train_steps("row-sparse", batches, beta1=0.0, beta2=0.0)
    assert_same_weights(sparse, dense, rtol=1e-6, atol=1e-7)
    lazy, momentum = train_steps("row-sparse", batches), train_steps("dense", batches)  # with Adam's betas they differ
    assert not torch.allclose(lazy.layers[0].attn.gate_embed.weight, momentum.layers[0].attn.gate_embed.weight)


def test_optimizer_state_saves_and_loads_exactly(tmp_path):
    model = tiny_model()
    optimizer = build_optimizer(model, TrainConfig(gate_table_update="row-sparse"))
    for _ in range(2):
        ids = torch.randint(0, 20, (2, 9))
        token_loss(model, ids[:, :-1], ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = ckpt.save_checkpoint(tmp_path, 2, model, optimizer, {}, DistInfo(), 1, model.config)
    saved = ckpt.read_optimizer(folder)
    table_state = saved["state"]["layers.0.attn.gate_embed.weight"]
    assert sorted(table_state) == ["exp_avg", "exp_avg_sq", "step"] and float(table_state["step"]) == 2

    fresh = tiny_model()
    ckpt.load_weights(folder, fresh)
    restored = build_optimizer(fresh, TrainConfig(gate_table_update="row-sparse"))
    ckpt.load_optimizer(saved, folder, fresh, restored)
    params = dict(fresh.named_parameters())
    for name, param in model.named_parameters():
        for key, value in optimizer.state[param].items():
            assert torch.equal(restored.state[params[name]][key], value), (name, key)


def test_resume_continues_exactly_and_the_switch_survives(tmp_path, cache_dir):
    run = run_config(cache_dir, **ROW_SPARSE)  # 12 steps, checkpoints at 4, 8, 12
    run_dir = tmp_path / "run"
    train(run, run_dir, **QUIET)
    original = train_losses(run_dir)
    assert json.loads((run_dir / "config.json").read_text())["train"]["gate_table_update"] == "row-sparse"
    shutil.rmtree(run_dir / "checkpoints" / "step_00000012")

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    resumed, _, resume = resolve_config(parser.parse_args(["--resume", str(run_dir)]))
    assert resume and resumed.train.gate_table_update == "row-sparse"
    messages = []
    train(resumed, run_dir, resume=True, progress=False, log=messages.append)
    assert "step_00000008" in "\n".join(messages) and "row-sparse gate-table updates" in "\n".join(messages)
    assert train_losses(run_dir) == original  # steps 9-12 again, bit for bit

    dense = run_config(cache_dir)
    train(dense, tmp_path / "dense", **QUIET)
    assert train_losses(tmp_path / "dense")[12] != original[12]  # the switch changes the run


def test_a_dense_checkpoint_resumes_row_sparse(tmp_path, cache_dir):
    """The state has AdamW's keys either way: switching train.gate_table_update on --resume works."""
    run_dir = tmp_path / "run"
    train(run_config(cache_dir, train=dict(steps=4)), run_dir, **QUIET)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    switched, _, _ = resolve_config(parser.parse_args(["--resume", str(run_dir), "--set", "train.steps=8", "--set",
                                                       "train.gate_table_update=row-sparse"]))
    summary = train(switched, run_dir, resume=True, **QUIET)
    assert summary["steps"] == 8 and sorted(train_losses(run_dir)) == list(range(1, 9))


def test_row_sparse_needs_undecayed_plain_adam():
    table = torch.nn.Parameter(torch.randn(4, 2))
    with pytest.raises(ValueError, match="weight_decay=0"):
        RowSparseAdamW([{"params": [table], "weight_decay": 0.1}], row_sparse=[table])
    optimizer = RowSparseAdamW([{"params": [table], "weight_decay": 0.0}], row_sparse=[table])
    with pytest.raises(ValueError, match="closures are not supported"):
        optimizer.step(lambda: 0.0)
