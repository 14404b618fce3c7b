"""The bias control's absorbed decode kernel (egmla/kernels/bias_decode.py) against its reference, and the
model's 'absorbed' path through it against the PyTorch equations."""
import pytest
import torch

from egmla.kernels.bias_decode_ref import bias_decode_ref
from tests.kernels.conftest import kernel_device, needs_cuda, rel_err, requires_triton

pytestmark = requires_triton


def inputs(dtype, device, batch=3, heads=3, d_c=16, d_r=16, max_len=40, cache_len=48, n_ids=7, seed=0,
           ids="random"):
    """Random decode inputs over a cache longer than max_len (strided views, as the model passes them). ids:
    'random' slots among n_ids, 'one' (one id fills the context), 'distinct' (every position its own id)."""
    torch.manual_seed(seed)
    if ids == "distinct":
        n_ids = cache_len
        slots = torch.arange(cache_len, dtype=torch.int32).expand(batch, -1).contiguous()
    elif ids == "one":
        n_ids, slots = 1, torch.zeros(batch, cache_len, dtype=torch.int32)
    else:
        slots = torch.randint(0, n_ids, (batch, cache_len), dtype=torch.int32)
    cache = dict(latent=torch.randn(batch, cache_len, d_c), k_rope=torch.randn(batch, cache_len, d_r),
                 ln_stats=torch.stack([torch.randn(batch, cache_len), torch.rand(batch, cache_len) + 0.5], -1),
                 slots=slots)
    cache = {name: t[:, :max_len].to(device) for name, t in cache.items()}
    for name in ("latent", "k_rope"):
        cache[name] = cache[name].to(dtype)
    query = dict(q_absorbed=torch.randn(batch, heads, d_c).to(device, dtype),
                 q_pe=torch.randn(batch, heads, d_r).to(device, dtype),
                 q_terms=torch.randn(batch, heads, 2, device=device), per_id=torch.randn(batch, heads, n_ids, device=device))
    lengths = torch.tensor(([max_len, 17, 0] + [max_len // 2] * batch)[:batch], device=device)  # full, ragged, empty
    return dict(q_absorbed=query["q_absorbed"], q_pe=query["q_pe"], q_terms=query["q_terms"], latent=cache["latent"],
                k_rope=cache["k_rope"], ln_stats=cache["ln_stats"], slots=cache["slots"], per_id=query["per_id"],
                lengths=lengths, scale=0.25)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("num_splits,ids", [(1, "random"), (3, "random"), (3, "one"), (3, "distinct")])
def test_kernel_matches_the_reference(dtype, tolerance, num_splits, ids):
    """Ids repeated at random, one id filling the context, every id distinct; full, ragged and empty sequences."""
    from egmla.kernels.bias_decode import bias_decode

    device = kernel_device()
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16  # bf16 on the GPU (the interpreter gives garbage for bf16)
    args = inputs(dtype, device, ids=ids)
    out = bias_decode(**args, num_splits=num_splits, block_t=16)
    ref = bias_decode_ref(**args)
    for name, o, r in zip(("out_latent", "mean", "mass"), out, ref):
        assert o.isfinite().all(), name
        assert rel_err(o[:2], r[:2]) < tolerance, name
        assert torch.equal(o[2], torch.zeros_like(o[2])), name  # the empty sequence attends to nothing
    assert torch.allclose(out[2][:2].sum(-1), torch.ones(2, 3, device=device), atol=1e-4)  # mass sums to 1


@pytest.mark.gpu
@needs_cuda
def test_kernel_in_bf16_at_paper_base_shapes():
    from egmla.kernels.bias_decode import bias_decode

    args = inputs(torch.bfloat16, "cuda", batch=8, heads=12, d_c=64, d_r=64, max_len=2048, cache_len=2100, n_ids=300)
    out, ref = bias_decode(**args), bias_decode_ref(**args)
    for name, o, r in zip(("out_latent", "mean", "mass"), out, ref):
        assert o.isfinite().all() and rel_err(o, r) < 1e-2, name


def test_kernel_refuses_bad_shapes_by_name():
    from egmla.kernels.bias_decode import bias_decode

    args = inputs(torch.float32, kernel_device())
    args["per_id"] = args["per_id"][:, :2]
    with pytest.raises(ValueError, match=r"bias_decode: per_id.shape=\(3, 2, 7\), expected \(3, 3, 7\)"):
        bias_decode(**args)


@pytest.mark.parametrize("gate_op", ["bias", "bias-v"])
def test_model_path_through_the_kernel_equals_the_pytorch_equations(gate_op):
    """The kernel path takes the per-id terms through the gate embedding (W_UE absorbed; the V-only control has
    no score term); the PyTorch path through the gate table's rows."""
    from tests.conftest import small_config
    from egmla.model import Transformer

    config = small_config(attention="eg-mla", gate_op=gate_op, kv_lora_rank=16, qk_rope_head_dim=16)
    torch.manual_seed(4)
    model = Transformer(config).eval().to(kernel_device())
    model.set_decode_path("absorbed")
    tokens = torch.randint(0, 9, (3, 20), device=kernel_device())
    logits = {}
    with torch.no_grad():
        for backend in ("pytorch", "kernel"):
            for layer in model.layers:
                layer.attn.absorbed_backend = backend
            cache = model.new_cache(3, max_len=24)
            model(tokens[:, :6], cache, n_new=torch.tensor([6, 3, 1], device=kernel_device()))
            logits[backend] = torch.cat([model(tokens[torch.arange(3), cache.lengths][:, None], cache)
                                         for _ in range(6)], dim=1)
    assert rel_err(logits["kernel"], logits["pytorch"]) < 1e-5
