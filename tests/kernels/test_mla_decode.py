"""MLA absorbed decode kernel vs its PyTorch reference: fresh random inputs, poisoned outputs,
ragged lengths (1 included), cache views of longer buffers, awkward head counts and widths."""
import pytest
import torch

from tests.kernels.conftest import kernel_device, nan_past, needs_cuda, poisoned, rel_err, requires_triton

pytestmark = requires_triton


def make_inputs(batch, heads, d_c, d_r, max_len, lengths, dtype, device, spare=7):
    """Queries and a cache that is a view [:, :max_len] of a longer buffer, as the model passes it."""
    q_latent = torch.randn(batch, heads, d_c, dtype=dtype, device=device)
    q_pe = torch.randn(batch, heads, d_r, dtype=dtype, device=device)
    latent = torch.randn(batch, max_len + spare, d_c, dtype=dtype, device=device)[:, :max_len]
    k_rope = torch.randn(batch, max_len + spare, d_r, dtype=dtype, device=device)[:, :max_len]
    return q_latent, q_pe, latent, k_rope, torch.tensor(lengths, device=device)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_matches_reference(dtype, tol, num_splits):
    from egmla.kernels.mla_decode import mla_decode
    from egmla.kernels.mla_decode_ref import mla_decode_ref

    device = kernel_device()
    inputs = make_inputs(3, 5, 24, 8, 70, [1, 70, 33], dtype, device)
    out = mla_decode(*inputs, scale=0.3, num_splits=num_splits, block_t=16, out=poisoned((3, 5, 24), dtype, device))
    ref = mla_decode_ref(*inputs, scale=0.3)
    assert not out.isnan().any()
    assert rel_err(out, ref) < tol


def test_every_length_from_one():
    """All prefix lengths of one cache: catches off-by-one split ranges and empty splits."""
    from egmla.kernels.mla_decode import mla_decode
    from egmla.kernels.mla_decode_ref import mla_decode_ref

    device = kernel_device()
    lengths = list(range(1, 21))
    inputs = make_inputs(len(lengths), 2, 16, 16, 20, lengths, torch.float32, device)
    out = mla_decode(*inputs, scale=0.25, num_splits=4, block_t=16, out=poisoned((20, 2, 16), torch.float32, device))
    assert rel_err(out, mla_decode_ref(*inputs, scale=0.25)) < 1e-4


@pytest.mark.parametrize("num_splits", [1, 9])
def test_padding_is_never_read(num_splits):
    """NaN at every cached position past a sequence's length (and past T) stays out of the sums; lengths 0 (output
    0), 1, a whole number of tiles (32) and not (37); one split, and 9 (more than any sequence has tiles, most of
    them empty, not a power of two: the combine masks its padded split slots) merged by the combine."""
    from egmla.kernels.mla_decode import mla_decode
    from egmla.kernels.mla_decode_ref import mla_decode_ref

    device = kernel_device()
    q_latent, q_pe, latent, k_rope, lengths = make_inputs(4, 5, 24, 8, 40, [0, 1, 32, 37], torch.float32, device)
    out = mla_decode(q_latent, q_pe, nan_past(latent, lengths), nan_past(k_rope, lengths), lengths, scale=0.3,
                     num_splits=num_splits, block_t=16, out=poisoned((4, 5, 24), torch.float32, device))
    ref = mla_decode_ref(q_latent, q_pe, latent, k_rope, lengths, scale=0.3)  # (NaN for the empty sequence)
    assert out.isfinite().all() and not out[0].any()
    assert rel_err(out[1:], ref[1:]) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
@pytest.mark.parametrize("heads,d_c,d_r", [(16, 128, 64), (12, 256, 64)])  # paper-1b; paper-base MLA kv256
def test_largest_preset_widths_at_batch_one(dtype, tol, heads, d_c, d_r):
    """The widest tiles the presets use, one sequence, the launch's default tile and split count."""
    from egmla.kernels.mla_decode import mla_decode
    from egmla.kernels.mla_decode_ref import mla_decode_ref

    device = kernel_device()
    inputs = make_inputs(1, heads, d_c, d_r, 45, [45], dtype, device)
    out = mla_decode(*inputs, scale=(d_c + d_r) ** -0.5, out=poisoned((1, heads, d_c), dtype, device))
    assert out.isfinite().all()
    assert rel_err(out, mla_decode_ref(*inputs, scale=(d_c + d_r) ** -0.5)) < tol


def test_query_views_of_a_projection_are_read_in_place(monkeypatch):
    """q_latent and q_pe sliced per head out of one [batch, 1, heads, d_c + d_r] projection, as the folded path
    passes them: read through their strides, with no copy (a `.contiguous()` here would cost a launch per layer)."""
    from egmla.kernels.mla_decode import mla_decode
    from egmla.kernels.mla_decode_ref import mla_decode_ref

    device = kernel_device()
    _, _, latent, k_rope, lengths = make_inputs(3, 5, 24, 8, 40, [1, 40, 17], torch.float32, device)
    q = torch.randn(3, 1, 5, 24 + 8, device=device)
    q_latent, q_pe = q[:, 0, :, :24], q[:, 0, :, 24:]
    assert not q_latent.is_contiguous() and not q_pe.is_contiguous()
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: pytest.fail("a query was copied"))
    out = mla_decode(q_latent, q_pe, latent, k_rope, lengths, scale=0.3, num_splits=2, block_t=16)
    monkeypatch.undo()
    assert rel_err(out, mla_decode_ref(q_latent.contiguous(), q_pe.contiguous(), latent, k_rope, lengths, 0.3)) < 1e-4


def test_bad_inputs_raise_value_error():
    from egmla.kernels.mla_decode import mla_decode

    q_latent, q_pe, latent, k_rope, lengths = make_inputs(2, 3, 16, 16, 10, [4, 10], torch.float32, "cpu")
    with pytest.raises(ValueError, match="q_pe"):
        mla_decode(q_latent, q_pe[:, :2], latent, k_rope, lengths, 0.1)
    with pytest.raises(ValueError, match="lengths"):
        mla_decode(q_latent, q_pe, latent, k_rope, lengths.float(), 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        mla_decode(q_latent, q_pe, latent.mT.contiguous().mT, k_rope, lengths, 0.1)


@pytest.mark.parametrize("d_c", [64, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("num_splits", [None, 1])
@pytest.mark.gpu
@needs_cuda
def test_gpu_paper_base_shapes(d_c, dtype, num_splits):
    """paper-base MLA (12 heads, d_r 64), ragged lengths up to 4096, low precision vs fp32 reference."""
    from egmla.kernels.mla_decode import mla_decode
    from egmla.kernels.mla_decode_ref import mla_decode_ref

    lengths = [1, 4096, 2049, 17, 4000, 640, 3, 1000]
    inputs = make_inputs(8, 12, d_c, 64, 4096, lengths, dtype, "cuda")
    out = mla_decode(*inputs, scale=128 ** -0.5, num_splits=num_splits, out=poisoned((8, 12, d_c), dtype, "cuda"))
    assert not out.isnan().any()
    assert rel_err(out, mla_decode_ref(*inputs, scale=128 ** -0.5)) < 1e-2


def test_launch_falls_back_to_a_configuration_that_fits():
    """A configuration that needs more shared memory than the device has is skipped, and remembered."""
    from triton.runtime.errors import OutOfResources

    from egmla.kernels.split_combine import launch_first_fitting

    tried = []

    def launch(tile):
        tried.append(tile)
        if tile > 32:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return tile

    key = ("test", object())
    assert launch_first_fitting(key, [128, 64, 32, 16], launch) == 32
    assert launch_first_fitting(key, [128, 64, 32, 16], launch) == 32
    assert tried == [128, 64, 32, 32]
    with pytest.raises(OutOfResources):
        launch_first_fitting(("test", object()), [128, 64], launch)
