"""MHA / GQA / MQA decode kernel vs its PyTorch reference: fresh random inputs, poisoned outputs, ragged
lengths (1 and 0 included), every group size, cache views of a longer buffer, a head dim that is no power of 2."""
import pytest
import torch

from tests.kernels.conftest import kernel_device, nan_past, needs_cuda, poisoned, rel_err, requires_triton

pytestmark = requires_triton


def make_inputs(batch, heads, kv_heads, head_dim, max_len, lengths, dtype, device, spare=5):
    q = torch.randn(batch, heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, max_len + spare, kv_heads, head_dim, dtype=dtype, device=device)[:, :max_len]
    v = torch.randn(batch, max_len + spare, kv_heads, head_dim, dtype=dtype, device=device)[:, :max_len]
    return q, k, v, torch.tensor(lengths, device=device)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (4, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_matches_reference(heads, kv_heads, dtype, tol, num_splits):
    from egmla.kernels.gqa_decode import gqa_decode
    from egmla.kernels.gqa_decode_ref import gqa_decode_ref

    device = kernel_device()
    q, k, v, lengths = make_inputs(3, heads, kv_heads, 24, 50, [1, 50, 29], dtype, device)
    out = gqa_decode(q, k, v, lengths, 0.2, num_splits=num_splits, block_t=16,
                     out=poisoned((3, heads, 24), dtype, device))
    assert not out.isnan().any()
    assert rel_err(out, gqa_decode_ref(q, k, v, lengths, 0.2)) < tol


@pytest.mark.parametrize("num_splits", [1, 9])
def test_padding_is_never_read(num_splits):
    """NaN in K and V at every position past a sequence's length (and past T) stays out of the sums: lengths 0, 1, a
    whole number of tiles and not; one split and more splits than tiles (9, the combine's padded slots masked)."""
    from egmla.kernels.gqa_decode import gqa_decode
    from egmla.kernels.gqa_decode_ref import gqa_decode_ref

    device = kernel_device()
    q, k, v, lengths = make_inputs(4, 6, 2, 24, 40, [0, 1, 32, 37], torch.float32, device)
    out = gqa_decode(q, nan_past(k, lengths), nan_past(v, lengths), lengths, 0.2, num_splits=num_splits, block_t=16,
                     out=poisoned((4, 6, 24), torch.float32, device))
    assert out.isfinite().all() and not out[0].any()
    assert rel_err(out, gqa_decode_ref(q, k, v, lengths, 0.2)) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
@pytest.mark.parametrize("heads,kv_heads", [(16, 16), (16, 4)])  # paper-1b MHA (head dim 2048 / 16) and GQA-4
def test_largest_preset_head_dim_at_batch_one(dtype, tol, heads, kv_heads):
    from egmla.kernels.gqa_decode import gqa_decode
    from egmla.kernels.gqa_decode_ref import gqa_decode_ref

    device = kernel_device()
    q, k, v, lengths = make_inputs(1, heads, kv_heads, 128, 45, [45], dtype, device)
    out = gqa_decode(q, k, v, lengths, 128 ** -0.5, out=poisoned((1, heads, 128), dtype, device))
    assert out.isfinite().all()
    assert rel_err(out, gqa_decode_ref(q, k, v, lengths, 128 ** -0.5)) < tol


def test_empty_sequence_gives_zero_and_bad_inputs_are_clear():
    from egmla.kernels.gqa_decode import gqa_decode

    device = kernel_device()
    q, k, v, lengths = make_inputs(2, 2, 2, 16, 20, [0, 7], torch.float32, device)
    out = gqa_decode(q, k, v, lengths, 0.3, num_splits=2, block_t=16, out=poisoned((2, 2, 16), torch.float32, device))
    assert out[0].abs().max() == 0 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="kv_heads dividing heads"):
        gqa_decode(torch.randn(2, 3, 16), k.cpu(), v.cpu(), lengths.cpu(), 0.3)
    with pytest.raises(ValueError, match="lengths"):
        gqa_decode(q, k, v, lengths.float(), 0.3)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kv_heads", [12, 4])
def test_on_gpu_paper_base_shapes(kv_heads):
    from egmla.kernels.gqa_decode import gqa_decode
    from egmla.kernels.gqa_decode_ref import gqa_decode_ref

    q, k, v, lengths = make_inputs(8, 12, kv_heads, 64, 4096, [1, 17, 700, 2049, 4096, 4095, 64, 3000],
                                   torch.bfloat16, "cuda")
    out = gqa_decode(q, k, v, lengths, 0.125)
    assert rel_err(out, gqa_decode_ref(q, k, v, lengths, 0.125)) < 1e-2
