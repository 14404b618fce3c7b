"""The chunked training loss (train.loss_chunk_tokens, egmla/train/loss.py) equals the whole-logits cross-entropy,
value and gradients, on fresh random inputs; and it never keeps a [tokens, vocab] tensor for the backward."""
import pytest
import torch

from egmla.model import Transformer
from egmla.variants import VARIANTS
from tests.saved_tensors import saved_for_backward
from egmla.train.loss import chunk_loss_and_gradient, cross_entropy, linear_cross_entropy, token_loss


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def reference(hidden, weight, targets, reduction):
    return cross_entropy(torch.nn.functional.linear(hidden, weight), targets, reduction)


def loss_and_grads(fn, hidden, weight, targets, autocast=False):
    hidden, weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(hidden, weight, targets)
    (3 * loss).backward()  # an upstream gradient other than 1 reaches both gradients
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk", [1, 7, 20, 64])  # one token, a ragged last chunk, exact, more than the tokens
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_equals_whole_fp32(chunk, reduction):
    torch.manual_seed(chunk)
    hidden, weight = torch.randn(4, 5, 16), torch.randn(50, 16) / 4
    targets = torch.randint(0, 50, (4, 5))
    whole = loss_and_grads(lambda h, w, t: reference(h, w, t, reduction), hidden, weight, targets)
    chunked = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk, reduction), hidden, weight, targets)
    for got, expected in zip(chunked, whole):
        assert got.dtype == expected.dtype and torch.isfinite(got).all()
        assert relative(got, expected) < 1e-5


def test_chunked_equals_whole_under_bf16_autocast():
    """Under autocast the head's matmuls run in bf16 (as F.linear would) and the softmax in fp32; the gradients
    come back in the inputs' dtypes."""
    torch.manual_seed(1)
    hidden, weight = torch.randn(2, 24, 32), torch.randn(300, 32) / 6
    targets = torch.randint(0, 300, (2, 24))
    whole = loss_and_grads(lambda h, w, t: reference(h, w, t, "mean"), hidden, weight, targets, autocast=True)
    chunked = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, 10), hidden, weight, targets,
                             autocast=True)
    assert chunked[1].dtype == chunked[2].dtype == torch.float32
    for got, expected in zip(chunked, whole):
        assert torch.isfinite(got).all() and relative(got, expected) < 1e-2


def test_the_chunk_gradient_is_softmax_minus_one_hot():
    torch.manual_seed(2)
    logits, targets = 4 * torch.randn(6, 11), torch.randint(0, 11, (6,))
    loss, gradient = chunk_loss_and_gradient(logits, targets)
    leaf = logits.clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(leaf, targets, reduction="sum")
    expected.backward()
    assert relative(loss, expected.detach()) < 1e-6 and relative(gradient, leaf.grad) < 1e-6


def test_without_gradients_the_loss_alone():
    torch.manual_seed(3)
    hidden, weight, targets = torch.randn(3, 9, 8), torch.randn(40, 8), torch.randint(0, 40, (3, 9))
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets, 4, "sum")
    assert relative(got, reference(hidden, weight, targets, "sum")) < 1e-6


@pytest.mark.parametrize("value, match", [(0, "chunk_tokens=0"), (-4, "chunk_tokens=-4")])
def test_a_chunk_size_that_is_not_positive_is_refused(value, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), value)


@pytest.mark.parametrize("variant", ["mha", "mla-kv16", "egmla-kv16"])
def test_model_loss_and_gradients_equal_and_no_logits_kept(variant):
    """token_loss with chunks equals the whole-logits loss for the model, every parameter's gradient (the tied
    embedding gets the head's share), and autograd keeps no [tokens, vocab] tensor (the whole form keeps one)."""
    config = VARIANTS[variant].config("tiny", vocab_size=300, n_layers=2, d_model=64, n_heads=2, max_seq_len=32)
    torch.manual_seed(4)
    model = Transformer(config)
    tokens = torch.randint(0, 300, (2, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    results = []
    for chunk in (0, 5):
        model.zero_grad()
        loss = token_loss(model, inputs, targets, chunk_tokens=chunk)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (whole, whole_grads), (chunked, chunked_grads) = results
    assert relative(chunked, whole) < 1e-5
    for name, grad in whole_grads.items():
        assert relative(chunked_grads[name], grad) < 1e-4, name
    vocab_sized = lambda saved: [t for t in saved if t.dim() >= 2 and t.shape[-1] == 300 and t.numel() >= 32 * 300]
    assert vocab_sized(saved_for_backward(lambda: token_loss(model, inputs, targets)))
    assert not vocab_sized(saved_for_backward(lambda: token_loss(model, inputs, targets, chunk_tokens=5)))


@pytest.mark.parametrize("grad", [True, False])  # the training step's path and validation's
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_targets_of_minus_100_count_for_nothing_as_in_the_whole_form(grad, reduction):
    """F.cross_entropy (the whole form) skips targets of -100 and averages over the rest; the chunked form did not:
    with gradients it crashed (gather at -100; a device assert on CUDA), without them it divided by every token."""
    torch.manual_seed(5)
    hidden, weight = torch.randn(3, 7, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (3, 7))
    targets[0, 2:5], targets[2, 6] = -100, -100
    if grad:
        whole = loss_and_grads(lambda h, w, t: reference(h, w, t, reduction), hidden, weight, targets)
        chunked = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, 4, reduction), hidden, weight, targets)
    else:
        with torch.no_grad():
            whole = [reference(hidden, weight, targets, reduction)]
            chunked = [linear_cross_entropy(hidden, weight, targets, 4, reduction)]
    for got, expected in zip(chunked, whole):
        assert relative(got, expected) < 1e-5
    if grad:  # an ignored token's hidden state gets no gradient
        assert not chunked[1][0, 2:5].any() and chunked[1][0, 1].any()


def test_no_tokens_without_gradients_is_a_nan_mean_as_in_the_whole_form():
    hidden, weight, targets = torch.randn(2, 0, 8), torch.randn(30, 8), torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        assert torch.isnan(linear_cross_entropy(hidden, weight, targets, 4))  # was ZeroDivisionError
        assert linear_cross_entropy(hidden, weight, targets, 4, "sum").item() == 0


def test_a_frozen_head_keeps_no_weight_gradient():
    """A head that takes no gradient (frozen, e.g. fine-tuning the blocks alone): no fp32 [vocab, d_model] held."""
    hidden, weight = torch.randn(2, 6, 8, requires_grad=True), torch.randn(30, 8)
    targets = torch.randint(0, 30, (2, 6))
    kept = saved_for_backward(lambda: linear_cross_entropy(hidden, weight, targets, 4))
    assert [tuple(t.shape) for t in kept if t.dim()] == [(12, 8)]  # the hidden states' gradient alone
    loss = linear_cross_entropy(hidden, weight, targets, 4)
    loss.backward()
    expected = torch.autograd.grad(reference(hidden, weight, targets, "mean"), hidden)[0]
    assert relative(hidden.grad, expected) < 1e-5
