"""The one-launch RoPE kernel vs its PyTorch reference and the model's rotation: fresh random inputs, query and key
slices of a wider projection (as MLA rotates them), in place, 3-D keys, ragged positions."""
import pytest
import torch

from tests.kernels.conftest import kernel_device, needs_cuda, poisoned, rel_err, requires_triton

pytestmark = requires_triton


def tables(batch, seq, half, device):
    """cos, sin of ragged positions, gathered from the model's tables as a decode step does."""
    from egmla.attention.rope import rope_tables

    cos, sin = rope_tables(2 * half, 64, 10000.0)
    positions = torch.randint(0, 64, (batch, seq))
    return cos[positions].to(device), sin[positions].to(device)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("shape", [(3, 1, 5, 16), (2, 7, 3, 32), (4, 2, 24)])
def test_matches_the_reference_and_the_models_rotation(dtype, tol, shape):
    from egmla.attention.rope import apply_rope
    from egmla.kernels.rope import rope
    from egmla.kernels.rope_ref import rope_ref

    device = kernel_device()
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16
    cos, sin = tables(*shape[:2], shape[-1] // 2, device)
    x = torch.randn(*shape, device=device).to(dtype)
    out = rope(x, cos, sin, out=poisoned(shape, dtype, device))
    assert not out.isnan().any()
    assert rel_err(out.float(), rope_ref(x, cos, sin).float()) < tol
    with torch.enable_grad():  # the model's PyTorch rotation (the kernel is for no-grad calls only)
        model = apply_rope(x.requires_grad_(), cos, sin).detach()
    assert rel_err(out.float(), model.float()) < tol


def test_rotates_slices_of_a_projection_in_place():
    """MLA's query: q_pe = q[..., d_c:] of [batch, 1, heads, d_c + d_r], rotated in place; the other columns stay."""
    from egmla.kernels.rope import rope
    from egmla.kernels.rope_ref import rope_ref

    device = kernel_device()
    q = torch.randn(3, 1, 4, 24 + 16, device=device)
    before = q.clone()
    q_pe = q[..., 24:]
    cos, sin = tables(3, 1, 8, device)
    rope(q_pe, cos, sin, out=q_pe)
    assert torch.equal(q[..., :24], before[..., :24])
    assert rel_err(q[..., 24:], rope_ref(before[..., 24:], cos, sin)) < 1e-6


def test_bad_inputs_name_the_field():
    from egmla.kernels.rope import rope

    x = torch.randn(2, 1, 3, 16)
    cos, sin = tables(2, 1, 8, "cpu")
    with pytest.raises(ValueError, match="even D"):
        rope(torch.randn(2, 1, 3, 15), cos, sin)
    with pytest.raises(ValueError, match="cos"):
        rope(x, cos.double(), sin)
    with pytest.raises(ValueError, match="contiguous last dim"):
        rope(x.mT.contiguous().mT, cos, sin)


@needs_cuda
def test_decode_rotates_with_the_kernel_and_training_does_not(monkeypatch):
    """On the GPU: a no-grad call (decode) goes through the kernel, a call that needs gradients through PyTorch."""
    import egmla.kernels.rope as kernel
    from egmla.attention.rope import apply_rope

    calls = []
    original = kernel.rope
    monkeypatch.setattr(kernel, "rope", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 1, 4, 16, device="cuda", dtype=torch.bfloat16)
    cos, sin = tables(2, 1, 8, "cuda")
    with torch.no_grad():
        apply_rope(x, cos, sin)
    assert calls == [1]
    apply_rope(x.clone().requires_grad_(), cos, sin).sum().backward()
    assert calls == [1]
