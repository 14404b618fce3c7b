"""apply_rope (fp32 products, four launches, in place when asked) is the rotate_half rotation of Llama/transformers."""
import pytest
import torch

from egmla.attention.rope import apply_rope, rope_tables


def rotate_half_reference(x, cos, sin):
    """x cos + rotate_half(x) sin with the tables repeated over both halves, as transformers writes it, in fp64."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    x, cos, sin = x.double(), torch.cat([cos, cos], -1).double(), torch.cat([sin, sin], -1).double()
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def tables(dim=16, batch=2, seq=7, dtype=torch.float32):
    cos, sin = rope_tables(dim, 32, 10000.0)
    positions = torch.randint(0, 32, (batch, seq))
    return cos[positions].to(dtype), sin[positions].to(dtype)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads", [None, 3])  # k^R [batch, seq, dim] and q [batch, seq, heads, dim]
def test_matches_rotate_half(dtype, tolerance, heads):
    cos, sin = tables()
    x = torch.randn(2, 7, *([heads] if heads else []), 16, dtype=dtype)
    out = apply_rope(x, cos, sin)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), rotate_half_reference(x, cos, sin), rtol=tolerance, atol=tolerance)


def test_bf16_tables_multiply_in_fp32():
    """model.to(bf16) casts the tables: the products stay fp32, as with fp32 copies of the same (bf16) values."""
    cos, sin = tables(dtype=torch.bfloat16)
    x = torch.randn(2, 7, 3, 16)
    assert torch.equal(apply_rope(x, cos, sin), apply_rope(x, cos.float(), sin.float()))


def test_in_place_into_a_slice_of_the_projection():
    """MLA rotates q^R inside q [batch, seq, heads, d_n + d_r]: the slice gets the rotation, q^C is untouched."""
    cos, sin = tables()
    q = torch.randn(2, 7, 3, 8 + 16, dtype=torch.bfloat16)
    original = q.clone()
    apply_rope(q[..., 8:], cos, sin, out=q[..., 8:])
    assert torch.equal(q[..., :8], original[..., :8])
    assert torch.equal(q[..., 8:], apply_rope(original[..., 8:], cos, sin))


def test_in_place_rotation_keeps_autograd_exact():
    """The training forward rotates a projection's output in place: gradients are those of the out-of-place cat."""
    cos, sin = tables()
    proj = torch.nn.Linear(5, 3 * (8 + 16), dtype=torch.float64)
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)

    def grads(in_place: bool):
        q = proj(x).view(2, 7, 3, -1)
        if in_place:
            apply_rope(q[..., 8:], cos, sin, out=q[..., 8:])
        else:
            q = torch.cat([q[..., :8], rotate_half_reference(q[..., 8:], cos, sin)], dim=-1)
        return torch.autograd.grad(q.sin().sum(), (x, proj.weight))

    for got, want in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
