"""egmla.attention.norms: nn.LayerNorm / nn.RMSNorm exactly in one dtype; with fp32 weights and a bf16 input
(bf16 autocast) the norm runs in fp32 with input and weights of one dtype (what the fused kernels need: no
"Cannot dispatch to fused" fallback) and returns bf16."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from egmla.attention.norms import LayerNorm, RMSNorm
from egmla.model import Transformer
from tests.conftest import small_config

PAIRS = [(LayerNorm, nn.LayerNorm), (RMSNorm, nn.RMSNorm)]


def twins(ours, theirs, dim=24, dtype=torch.float32):
    reference = theirs(dim, eps=1e-6).to(dtype)
    with torch.no_grad():  # non-trivial affine parameters
        for param in reference.parameters():
            param.copy_(torch.randn_like(param))
    norm = ours(dim, eps=1e-6).to(dtype)
    norm.load_state_dict(reference.state_dict())  # same names: old checkpoints load
    return norm, reference


@pytest.mark.parametrize("ours, theirs", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_same_as_torch_in_one_dtype(ours, theirs, dtype):
    norm, reference = twins(ours, theirs, dtype=dtype)
    x = (3 * torch.randn(5, 7, 24) + 1).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, expected = norm(x), reference(x_ref)
    assert out.dtype == dtype and torch.equal(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(norm.weight.grad, reference.weight.grad)


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_bf16_input_with_fp32_weights_normalises_in_fp32_and_returns_bf16(ours, theirs):
    norm, reference = twins(ours, theirs)
    x = (3 * torch.randn(5, 7, 24) + 1).to(torch.bfloat16)
    expected = reference(x.float())  # fp32 throughout, the most accurate answer
    out = norm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_autocast = norm(x)
    for result in (out, out_autocast):
        assert result.dtype == torch.bfloat16
        torch.testing.assert_close(result.float(), expected, rtol=1e-2, atol=1e-2)  # bf16's rounding of it
        assert torch.equal(result, expected.to(torch.bfloat16))  # normalised in fp32, rounded once


@pytest.fixture
def norm_dtypes(monkeypatch):
    """(input dtype, weight dtype) of every F.layer_norm / F.rms_norm call (the fallback's warning is printed
    once per process, so it cannot be waited for)."""
    calls = []
    for name in ("layer_norm", "rms_norm"):
        def recording(input, shape, weight=None, *args, original=getattr(F, name), **kwargs):
            calls.append((input.dtype, weight.dtype if weight is not None else input.dtype))
            return original(input, shape, weight, *args, **kwargs)
        monkeypatch.setattr(F, name, recording)
    return calls


@pytest.mark.parametrize("variant", [dict(attention="mla", q_lora_rank=24), dict(attention="eg-mla"),
                                     dict(attention="eg-mla", gate_norm="rmsnorm"),
                                     dict(attention="eg-mla", gate_placement="latent")])
def test_every_norm_sees_its_weights_dtype_under_autocast(norm_dtypes, variant):
    """Under autocast the q and kv RMSNorms of MLA and EG-MLA's gate norm get bf16 inputs (products of linears)."""
    model = Transformer(small_config(**variant))
    tokens = torch.randint(0, 61, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert len(norm_dtypes) >= 3 * model.config.n_layers and all(a == b for a, b in norm_dtypes), norm_dtypes
    torch.testing.assert_close(logits.float(), model(tokens), rtol=0.1, atol=0.1)
