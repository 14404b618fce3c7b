"""The training loss under torch.compile (egmla.train.loss.compiled_cross_entropy) equals the eager fp32 cross-entropy,
value and gradient, for fp32 and bf16 logits."""
import pytest
import torch


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own use of torch.jit on import
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_compiled_cross_entropy_matches_eager(dtype, tol):
    from egmla.train.loss import compiled_cross_entropy, cross_entropy

    torch.manual_seed(0)
    base = (3 * torch.randn(2, 5, 64)).to(dtype)
    targets = torch.randint(0, 64, (2, 5))
    results = []
    for fn in (cross_entropy, compiled_cross_entropy()):
        logits = base.clone().requires_grad_(True)
        loss = fn(logits, targets)
        loss.backward()
        results.append((loss.detach(), logits.grad.float()))
    (eager, eager_grad), (compiled, compiled_grad) = results
    assert torch.isfinite(compiled) and compiled.dtype == torch.float32
    assert abs(float(compiled - eager)) <= tol * abs(float(eager))
    assert ((compiled_grad - eager_grad).norm() / eager_grad.norm()).item() < tol


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_chunked_loss_matches_eager():
    """train.loss_chunk_tokens with train.compile: each chunk's loss and gradient from the compiled step."""
    from egmla.train.loss import linear_cross_entropy

    torch.manual_seed(1)
    hidden, weight, targets = torch.randn(3, 8, 16), torch.randn(64, 16) / 4, torch.randint(0, 64, (3, 8))
    results = []
    for compiled in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = linear_cross_entropy(h, w, targets, 8, compiled=compiled)  # 3 equal chunks: one compilation
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for eager, compiled in zip(*results):
        assert ((compiled - eager).norm() / eager.norm()).item() < 1e-5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_blocks_that_recompute_with_the_chunked_loss_match_the_plain_eager_model():
    """train.compile with train.activation_checkpointing and train.loss_chunk_tokens, as a GPU run would combine
    them: the checkpointed forward traced inside each compiled block, the compiled chunk step; same loss and grads."""
    from egmla.model import Transformer
    from egmla.train.loss import token_loss
    from egmla.train.recompute import recompute_blocks
    from egmla.variants import VARIANTS

    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    results = []
    for lean in (False, True):
        torch.manual_seed(0)
        model = Transformer(VARIANTS["egmla-kv16"].config("tiny", vocab_size=300, n_layers=2, d_model=64, n_heads=2,
                                                          max_seq_len=32))
        model.check_inputs = False
        if lean:
            recompute_blocks(model, 1)
            for block in model.layers:
                block.compile()
        for _ in range(2):  # the second call runs the compiled graphs
            model.zero_grad()
            loss = token_loss(model, tokens[:, :-1], tokens[:, 1:], compiled=lean, chunk_tokens=8 if lean else 0)
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (lean, lean_grads) = results
    assert abs(float(lean - plain)) <= 1e-5 * abs(float(plain))
    for got, expected in zip(lean_grads, plain_grads):
        assert ((got - expected).norm() / expected.norm()).item() < 1e-4
