"""The decode-context kernel (a capturable one-token step's positions, row index, lengths, RoPE angles and token-id
write in one launch) against its PyTorch reference, and the model's graph step through it: the same logits as the
step built in PyTorch, for every cache layout (token ids kept or not, token groups)."""
import pytest
import torch

from tests.kernels.conftest import kernel_device, rel_err, requires_triton

pytestmark = requires_triton


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_ids", [True, False])
def test_decode_context_matches_reference(table_dtype, with_ids):
    from egmla.kernels.decode_context import decode_context
    from egmla.kernels.decode_context_ref import decode_context_ref

    device = kernel_device()
    torch.manual_seed(0)
    batch, max_len, half = 5, 20, 12  # half not a power of two: a masked tail
    lengths = torch.tensor([0, 3, 19, 20, 7], device=device)  # 20: a full row that appends nothing stays inside
    tokens = torch.randint(0, 1000, (batch, 1), device=device)
    cos_table, sin_table = (torch.randn(max_len + 4, half, device=device).to(table_dtype) for _ in range(2))
    ids = torch.randint(0, 1000, (batch, max_len), dtype=torch.int32, device=device) if with_ids else None
    ids_ref = ids.clone() if with_ids else None
    got = decode_context(lengths, tokens, ids, cos_table, sin_table, max_len)
    want = decode_context_ref(lengths, tokens, ids_ref, cos_table, sin_table, max_len)
    for name, g, w in zip(("positions", "rows", "decode_lengths", "cos", "sin"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w), name
    assert got[0][:, 0].tolist() == [0, 3, 19, 19, 7]
    if with_ids:
        assert torch.equal(ids, ids_ref)


def test_decode_context_rejects_a_prompt_and_wide_tables():
    from egmla.kernels.decode_context import decode_context

    lengths, table = torch.zeros(2, dtype=torch.long), torch.zeros(8, 4)
    with pytest.raises(ValueError, match="one new token"):
        decode_context(lengths, torch.zeros(2, 3, dtype=torch.long), None, table, table, 8)
    with pytest.raises(ValueError, match="rope tables"):
        decode_context(lengths, torch.zeros(2, 1, dtype=torch.long), None, table.double(), table.double(), 8)


@pytest.mark.parametrize("variant,path", [("mla-kv64", "kernel"), ("egmla-kv64", "grouped"),
                                          ("egmla-kv64-bias-v", "absorbed"), ("mha", "naive")])
def test_graph_step_through_the_kernel_gives_the_same_logits(variant, path, monkeypatch):
    """Capturable one-token steps (as the engine's CUDA graphs run them) with the context built by the kernel equal
    the same steps with it built in PyTorch, and the cache ends up the same."""
    import egmla.kernels.decode_context as kernel
    import egmla.model as model_module
    from egmla.model import Transformer
    from egmla.variants import variant_config

    device = kernel_device()
    torch.manual_seed(0)
    model = Transformer(variant_config(variant, "tiny", n_layers=2)).eval().to(device)
    model.set_decode_path(path)
    for layer in model.layers:
        for backend in ("grouped_backend", "absorbed_backend"):
            if hasattr(layer.attn, backend):
                setattr(layer.attn, backend, "kernel")
    tokens = torch.randint(0, model.config.vocab_size, (3, 9), device=device)
    n_new = torch.tensor([1, 1, 0], device=device)  # the last row appends nothing (a finished sequence)
    results, calls = [], []
    real = kernel.decode_context
    monkeypatch.setattr(kernel, "decode_context", lambda *a: calls.append(1) or real(*a))
    for forced in (False, True):
        if forced:
            monkeypatch.setattr(model_module, "no_grad_kernel_can_run", lambda x: not torch.is_grad_enabled())
        cache = model.new_cache(3, max_len=10)
        with torch.no_grad():
            model(tokens[:, :6], cache)
            steps = [model(tokens[:, i:i + 1], cache, n_new=n_new, capturable=True) for i in range(6, 9)]
        results.append((torch.cat(steps, dim=1), cache))
    assert len(calls) == 3  # one launch per forced step, none in the PyTorch route
    (plain, plain_cache), (fused, fused_cache) = results
    assert not fused.isnan().any() and rel_err(fused, plain) < 1e-5
    assert torch.equal(fused_cache.lengths, plain_cache.lengths)
    if plain_cache.token_ids is not None:
        assert torch.equal(fused_cache.token_ids, plain_cache.token_ids)
