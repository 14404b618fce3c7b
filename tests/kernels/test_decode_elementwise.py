"""The decode step's fused residual add + RMSNorm and SwiGLU activation vs their PyTorch references: fresh random
inputs, widths that are not powers of two, no weight, views of wider buffers; and the model's dispatch on a GPU."""
import pytest
import torch

from tests.kernels.conftest import kernel_device, needs_cuda, rel_err, requires_triton

pytestmark = requires_triton


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape,weighted", [((3, 1, 48), True), ((2, 5, 768), True), ((4, 1, 40), False)])
def test_add_rms_norm_matches_the_reference(dtype, tol, shape, weighted):
    from egmla.kernels.decode_elementwise import add_rms_norm
    from egmla.kernels.decode_elementwise_ref import add_rms_norm_ref

    device = kernel_device()
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16
    x, y = (torch.randn(*shape, device=device).to(dtype) for _ in range(2))
    weight = (1 + 0.3 * torch.randn(shape[-1], device=device)).to(dtype) if weighted else None
    total, normed = add_rms_norm(x, y, weight, 1e-5)
    ref_total, ref_normed = add_rms_norm_ref(x.float(), y.float(), None if weight is None else weight.float(), 1e-5)
    assert total.dtype == normed.dtype == dtype and total.shape == normed.shape == x.shape
    assert torch.equal(total, (x + y)), "the residual stream is x + y rounded as PyTorch rounds it"
    assert rel_err(normed.float(), ref_normed) < tol and not normed.isnan().any()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(3, 1, 100), (2, 3, 2048)])
def test_silu_mul_matches_the_reference(dtype, tol, shape):
    from egmla.kernels.decode_elementwise import silu_mul
    from egmla.kernels.decode_elementwise_ref import silu_mul_ref

    device = kernel_device()
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16
    both = torch.randn(*shape[:-1], 2 * shape[-1], device=device).to(dtype)
    gate, up = both[..., : shape[-1]], both[..., shape[-1]:]  # views of one projection, as a merged w1/w3 gives
    out = silu_mul(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype
    assert rel_err(out.float(), silu_mul_ref(gate.float(), up.float())) < tol


def test_bad_inputs_name_the_field():
    from egmla.kernels.decode_elementwise import add_rms_norm, silu_mul

    x = torch.randn(2, 1, 16)
    with pytest.raises(ValueError, match="must match"):
        add_rms_norm(x, x.double(), None, 1e-5)
    with pytest.raises(ValueError, match="must match"):
        silu_mul(x, x[..., :8])
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul(x[..., ::2], x[..., 1::2])  # every other column: the last dim is strided


@needs_cuda
def test_the_model_fuses_without_gradients_only(monkeypatch):
    """On the GPU: a block's forward without gradients goes through both kernels and gives the PyTorch numbers; a
    forward that needs gradients does not touch them."""
    import egmla.kernels.decode_elementwise as kernels
    from egmla.model import Transformer
    from tests.conftest import small_config

    calls = []
    for name in ("add_rms_norm", "silu_mul"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model = Transformer(small_config(attention="mha")).cuda().to(torch.bfloat16).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 8), device="cuda")
    with torch.no_grad():
        fused = model(tokens)
    assert sorted(set(calls)) == ["add_rms_norm", "silu_mul"]
    calls.clear()
    unfused = model(tokens)
    assert calls == [] and rel_err(fused.float(), unfused.detach().float()) < 1e-2


def test_a_block_without_gradients_fuses_and_matches(monkeypatch):
    """The model's no-grad blocks (on the CPU made to take the GPU's route, in the interpreter; fp32): the residual
    add + norm and the SwiGLU activation through the kernels, and the FFN's residual add inside the down projection (addmm,
    beta = 1), give the logits of the forward that needs gradients."""
    import egmla.model as model_module
    from egmla.model import Transformer
    from tests.conftest import small_config

    device = kernel_device()
    monkeypatch.setattr(model_module, "no_grad_kernel_can_run", lambda x: not torch.is_grad_enabled())
    addmm_calls = []
    original = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda *a, **k: addmm_calls.append(1) or original(*a, **k))
    model = Transformer(small_config(attention="mla")).to(device).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 7), device=device)
    with torch.no_grad():
        fused = model(tokens)
    assert len(addmm_calls) == model.config.n_layers  # into the block's own residual tensor (no copy of it first)
    addmm_calls.clear()
    unfused = model(tokens)
    assert addmm_calls == [] and rel_err(fused, unfused.detach()) < 1e-5


def test_swiglu_leaves_a_residual_it_does_not_own_untouched(monkeypatch):
    """SwiGLU(x, residual) on the GPU's route adds into `residual` only when told it may (residual_in_place, as a
    block does with its own residual stream); either way the result is the unfused one."""
    import egmla.model as model_module
    from egmla.model import SwiGLU

    device = kernel_device()
    monkeypatch.setattr(model_module, "no_grad_kernel_can_run", lambda x: not torch.is_grad_enabled())
    torch.manual_seed(3)
    ffn = SwiGLU(16, 40).to(device)
    x, residual = torch.randn(2, 3, 16, device=device), torch.randn(2, 3, 16, device=device)
    with torch.no_grad():
        expected = residual + ffn.w2(torch.nn.functional.silu(ffn.w1(x)) * ffn.w3(x))
        kept = residual.clone()
        out = ffn(x, residual=residual)
        assert torch.equal(residual, kept) and rel_err(out, expected) < 1e-5
        out = ffn(x, residual=residual, residual_in_place=True)
        assert rel_err(out, expected) < 1e-5 and out.data_ptr() == residual.data_ptr()
