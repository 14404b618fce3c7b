"""transformers' activation checkpointing on EgmlaForCausalLM (`gradient_checkpointing_enable()`, what the Trainer's
`gradient_checkpointing=True` calls): blocks recompute in the backward, the same loss and gradients, fewer tensors
kept; disabling restores the plain forward."""
import warnings

import pytest
import torch

from egmla.hf import EgmlaForCausalLM
from egmla.runs import load_model
from tests.saved_tensors import kept_bytes

# transformers 5.25 renames gradient_checkpointing_* to activation_checkpointing_* (the GPU image's 5.17 has only the
# old names, which both keep): the old names, without their deprecation warnings
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def loss_and_grads(model, tokens):
    model.zero_grad()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant, reentrant", [("mla", False), ("eg-mla", False), ("eg-mla", True)])
def test_enable_recomputes_blocks_with_the_same_gradients(variant, reentrant, make_run):
    model, _ = load_model(make_run(variant))
    hf_model = EgmlaForCausalLM.from_egmla(model, eos_token_id=0).train()
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    plain_kept = kept_bytes(lambda: hf_model(tokens, labels=tokens).loss)
    plain = loss_and_grads(hf_model, tokens)
    hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert hf_model.is_gradient_checkpointing
    assert all("forward" in vars(block) for block in hf_model.model.layers)
    assert kept_bytes(lambda: hf_model(tokens, labels=tokens).loss) < plain_kept
    recomputed = loss_and_grads(hf_model, tokens)
    assert torch.equal(recomputed[0], plain[0])
    assert recomputed[1].keys() == plain[1].keys()
    for name, grad in plain[1].items():
        torch.testing.assert_close(recomputed[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    hf_model.gradient_checkpointing_disable()
    assert not hf_model.is_gradient_checkpointing
    assert not any("forward" in vars(block) for block in hf_model.model.layers)
    with torch.no_grad():  # and the plain model's logits after all this
        assert torch.equal(hf_model(tokens).logits, model(tokens))


def test_reentrant_checkpointing_leaves_eval_and_no_grad_forwards_as_they_are(make_run):
    """As transformers' GradientCheckpointingLayer: blocks recompute only in a training forward with grad enabled.
    Under no_grad a reentrant checkpoint warned "None of the inputs have requires_grad=True"; in eval it recomputed."""
    model, _ = load_model(make_run("eg-mla"))
    hf_model = EgmlaForCausalLM.from_egmla(model, eos_token_id=0).train()
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain_logits = hf_model(tokens).logits
    plain_eval_kept = kept_bytes(lambda: hf_model.eval()(tokens).logits)
    plain_train_kept = kept_bytes(lambda: hf_model.train()(tokens, labels=tokens).loss)
    plain = loss_and_grads(hf_model, tokens)
    hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    for mode in (hf_model.eval, hf_model.train):
        mode()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # any warning fails
            assert torch.equal(hf_model(tokens).logits, plain_logits)
    assert kept_bytes(lambda: hf_model.eval()(tokens).logits) == plain_eval_kept  # eval with grad: not recomputed
    # training still recomputes, with the same gradients
    assert kept_bytes(lambda: hf_model.train()(tokens, labels=tokens).loss) < plain_train_kept
    recomputed = loss_and_grads(hf_model, tokens)
    assert torch.equal(recomputed[0], plain[0])
    for name, grad in plain[1].items():
        torch.testing.assert_close(recomputed[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
