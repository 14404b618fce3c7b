"""The training loss under torch.compile (trainer.compiled_cross_entropy) equals the eager fp32 cross-entropy,
value and gradient, for fp32 and bf16 logits."""
import pytest
import torch


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own use of torch.jit on import
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_compiled_cross_entropy_matches_eager(dtype, tol):
    from egmla.train.trainer import compiled_cross_entropy, cross_entropy

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
