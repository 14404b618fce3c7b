"""MLA's causal attention with v padded to q/k's head dim (FlashAttention's shape) gives the unpadded result."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from egmla.attention.mla import causal_attention
from egmla.model import Transformer
from tests.conftest import small_config


def mla_inputs(dtype, device="cpu", batch=2, seq=33, heads=3, qk_dim=24, v_dim=8):
    q, k = (torch.randn(batch, seq, heads, qk_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, seq, heads, v_dim, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


def padded_and_plain(q, k, v):
    results = []
    for pad in (True, False):
        out = causal_attention(q, k, v, 24 ** -0.5, pad_v=pad)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        results.append((out, grads))
    return results


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_padding_v_changes_nothing(dtype, tolerance):
    (out, grads), (out_plain, grads_plain) = padded_and_plain(*mla_inputs(dtype))
    assert out.shape == (2, 33, 3, 8)
    torch.testing.assert_close(out, out_plain, rtol=tolerance, atol=tolerance)
    for grad, grad_plain in zip(grads, grads_plain):
        assert grad.shape == grad_plain.shape
        torch.testing.assert_close(grad, grad_plain, rtol=tolerance, atol=tolerance)


def test_the_training_forward_takes_it():
    """The model's uncached forward is causal_attention (on the CPU unpadded, as before)."""
    model = Transformer(small_config(attention="mla"))
    tokens = torch.randint(0, 61, (2, 12))
    cache = model.new_cache(2, 12)
    torch.testing.assert_close(model(tokens), model(tokens, cache=cache), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FlashAttention)")
def test_padded_v_runs_on_flash_attention():
    q, k, v = mla_inputs(torch.bfloat16, "cuda", seq=256, heads=4, qk_dim=128, v_dim=64)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # only FlashAttention: an unsupported shape raises
        out = causal_attention(q, k, v, 128 ** -0.5, pad_v=True)
    with sdpa_kernel(SDPBackend.MATH):
        reference = causal_attention(q.float(), k.float(), v.float(), 128 ** -0.5, pad_v=False)
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
