"""Activation checkpointing (train.activation_checkpointing, egmla/train/recompute.py): the same loss and gradients
as the plain model, fewer tensors kept for the backward, and the plain model's parameter names."""
import pytest
import torch

from egmla.model import Transformer
from egmla.train.loss import token_loss
from egmla.train.recompute import recompute_blocks
from egmla.variants import VARIANTS
from tests.saved_tensors import kept_bytes


def tiny(variant: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(VARIANTS[variant].config("tiny", vocab_size=300, n_layers=4, d_model=64, n_heads=2,
                                                max_seq_len=32))


@pytest.mark.parametrize("variant", ["mha", "mla-kv16", "egmla-kv16", "egmla-kv64-bias-v"])
@pytest.mark.parametrize("every", [1, 3])
def test_same_loss_and_gradients_fewer_saved_tensors(variant, every):
    tokens = torch.randint(0, 300, (2, 25), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    results, kept = [], []
    for recompute in (0, every):
        model = tiny(variant)
        names = [name for name, _ in model.named_parameters()]
        assert recompute_blocks(model, recompute) == list(range(0, 4, recompute) if recompute else [])
        assert [name for name, _ in model.named_parameters()] == names  # checkpoints keep their keys
        kept.append(kept_bytes(lambda: token_loss(model, inputs, targets)))
        loss = token_loss(model, inputs, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    assert torch.equal(plain, recomputed)  # the same forward, run again: bit for bit on the CPU
    for name, grad in plain_grads.items():
        assert torch.allclose(recomputed_grads[name], grad, rtol=1e-5, atol=1e-7), name
    assert kept[1] < kept[0] * (0.5 if every == 1 else 0.9)


def test_a_negative_setting_is_refused():
    with pytest.raises(ValueError, match="train.activation_checkpointing=-1"):
        recompute_blocks(tiny("mha"), -1)


def test_setting_again_replaces_and_zero_restores_the_plain_forward():
    model = tiny("mla-kv16")
    assert recompute_blocks(model, 1) == [0, 1, 2, 3]
    assert recompute_blocks(model, 2) == [0, 2]  # not stacked on the first setting
    assert "forward" in vars(model.layers[0]) and "forward" not in vars(model.layers[1])
    assert recompute_blocks(model, 0) == []
    assert not any("forward" in vars(block) for block in model.layers)


def test_a_given_checkpoint_function_runs_the_blocks():
    calls = []

    def counting(forward, *args, **kwargs):
        calls.append(forward)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    model = tiny("mha")
    recompute_blocks(model, 1, counting)
    token_loss(model, torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)).backward()
    assert len(calls) == 4


def test_a_recomputing_model_is_freed_without_the_garbage_collector():
    """No reference cycle through a block's own forward: `del model` frees it (its GPU memory) at once."""
    import gc
    import weakref

    model = tiny("egmla-kv16")
    recompute_blocks(model, 1)
    block = weakref.ref(model.layers[0])
    gc.disable()
    try:
        del model
        assert block() is None
    finally:
        gc.enable()
