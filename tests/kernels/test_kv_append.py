"""MHA / GQA's cache append in one launch vs its PyTorch reference (the two rotations and the two index writes the
model runs otherwise): fresh random inputs, ragged positions, several new tokens, q / k / v as views of one [q ; k ;
v] product, caches that are views of larger allocations (other strides for V) and poisoned with NaN so a write to a wrong place
shows; the model's decode through it equals the full forward (MHA, GQA, MQA, with and without the merged product);
and on a GPU, in bf16."""
import pytest
import torch

from tests.kernels.conftest import kernel_device, needs_cuda, poisoned, rel_err, requires_triton

pytestmark = requires_triton


def inputs(batch, seq, heads, kv_heads, dim, max_len, dtype, device):
    product = torch.randn(batch, seq, (heads + 2 * kv_heads) * dim + 3, device=device).to(dtype)[..., 3:]
    q, k, v = (t.unflatten(-1, (-1, dim)) for t in product.split([heads * dim, kv_heads * dim, kv_heads * dim], -1))
    angles = torch.rand(max_len, dim // 2, device=device) * 6.0
    positions = torch.stack([torch.randperm(max_len - seq, device=device)[:1] + torch.arange(seq, device=device)
                             for _ in range(batch)])  # ragged starts
    return product, q, k, v, angles.cos()[positions], angles.sin()[positions], positions


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("batch,seq,heads,kv_heads,dim", [(3, 1, 4, 4, 8), (2, 3, 6, 2, 12), (2, 1, 5, 1, 6),
                                                           (1, 1, 16, 4, 128)])  # paper-1b's head dim, batch 1
def test_kv_append_matches_the_reference(dtype, tol, batch, seq, heads, kv_heads, dim):
    from egmla.kernels.kv_append import kv_append
    from egmla.kernels.kv_append_ref import kv_append_ref

    device = kernel_device()
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16
    max_len = 10
    product, q, k, v, cos, sin, positions = inputs(batch, seq, heads, kv_heads, dim, max_len, dtype, device)
    ref_product = product.clone()
    ref_q, ref_k, ref_v = (t.unflatten(-1, (-1, dim)) for t in ref_product.split(
        [heads * dim, kv_heads * dim, kv_heads * dim], -1))
    k_cache = poisoned((batch + 2, max_len, kv_heads, dim), dtype, device)[1:batch + 1]
    v_cache = poisoned((batch + 2, max_len + 1, kv_heads, dim + 2), dtype, device)[1:batch + 1, :max_len, :, :dim]
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    kv_append(q, k, v, cos, sin, positions, k_cache, v_cache)
    kv_append_ref(ref_q, ref_k, ref_v, cos, sin, positions, ref_k_cache, ref_v_cache)
    assert rel_err(q, ref_q) < tol and not q.isnan().any()
    assert torch.equal(product[..., heads * dim:], ref_product[..., heads * dim:]), "changed k or v in the product"
    written = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
    written[torch.arange(batch, device=device)[:, None], positions] = True
    assert k_cache[~written].isnan().all() and v_cache[~written].isnan().all(), "wrote outside the new positions"
    assert rel_err(k_cache[written], ref_k_cache[written]) < tol and not k_cache[written].isnan().any()
    assert torch.equal(v_cache[written], ref_v_cache[written])


def test_bad_inputs_name_the_field():
    from egmla.kernels.kv_append import kv_append

    _, q, k, v, cos, sin, positions = inputs(2, 1, 4, 2, 8, 6, torch.float32, "cpu")
    k_cache, v_cache = torch.zeros(2, 6, 2, 8), torch.zeros(2, 6, 2, 8)
    with pytest.raises(ValueError, match="k_cache"):
        kv_append(q, k, v, cos, sin, positions, torch.zeros(2, 6, 4, 8), v_cache)
    with pytest.raises(ValueError, match="cos"):
        kv_append(q, k, v, cos.double(), sin, positions, k_cache, v_cache)
    with pytest.raises(ValueError, match="positions"):
        kv_append(q, k, v, cos, sin, positions.float(), k_cache, v_cache)
    with pytest.raises(ValueError, match="v "):
        kv_append(q, k, v[..., :6], cos, sin, positions, k_cache, v_cache)


@pytest.mark.parametrize("n_kv_heads,merged", [(4, True), (2, True), (1, True), (2, False)])
def test_the_model_decodes_through_it_as_the_full_forward(monkeypatch, n_kv_heads, merged):
    """The model's cached steps (on the CPU made to run the kernel in the interpreter, as on a GPU without gradients)
    take one launch for RoPE and the cache writes, and [q ; k ; v] as one GEMM unless the merged products are off;
    they give the full forward's logits, and rotate or index-write nothing else; a fresh prompt and a step that wants
    gradients do not take it."""
    import egmla.attention.mha as mha
    import egmla.kernels.kv_append as kernel
    from egmla.model import Transformer
    from tests.conftest import small_config

    device = kernel_device()
    calls, rotations = [], []
    original, original_rope = kernel.kv_append, mha.apply_rope
    monkeypatch.setattr(kernel, "kv_append", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(mha, "apply_rope", lambda *a, **k: rotations.append(1) or original_rope(*a, **k))
    monkeypatch.setattr(mha, "no_grad_kernel_can_run", lambda x: not torch.is_grad_enabled())
    attention = "mha" if n_kv_heads == 4 else "gqa"
    extra = {} if attention == "mha" else {"n_kv_heads": n_kv_heads}
    model = Transformer(small_config(attention=attention, **extra)).to(device).eval()
    model.set_decode_path("kernel")
    model.set_merged_products(merged)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), device=device)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2)
        model(tokens[:, :6], cache)  # a fresh prompt: causal attention over its own K/V
        assert calls == []
        rotations.clear()
        steps = [model(tokens[:, i: i + 1], cache) for i in range(6, 9)]
    assert len(calls) == 3 * model.config.n_layers and rotations == []
    assert ("merged_input_weight" in vars(model.layers[0].attn)) == merged
    assert rel_err(torch.cat(steps, dim=1), full[:, 6:]) < 1e-4
    calls.clear()
    cache = model.new_cache(1)
    model(tokens[:1, :3], cache)
    model(tokens[:1, 3:4], cache).sum().backward()  # a step that wants gradients: the kernel has no backward
    assert calls == []


@needs_cuda
def test_the_model_appends_in_one_launch_on_a_gpu(monkeypatch):
    """On the GPU in bf16: MHA's and GQA's cached no-grad steps go through the kernel and give the full forward's
    numbers."""
    import egmla.kernels.kv_append as kernel
    from egmla.model import Transformer
    from tests.conftest import small_config

    calls = []
    original = kernel.kv_append
    monkeypatch.setattr(kernel, "kv_append", lambda *a, **k: calls.append(1) or original(*a, **k))
    for extra in ({"attention": "mha"}, {"attention": "gqa", "n_kv_heads": 2}):
        calls.clear()
        model = Transformer(small_config(**extra)).cuda().to(torch.bfloat16).eval()
        model.set_decode_path("kernel")
        tokens = torch.randint(0, model.config.vocab_size, (2, 7), device="cuda")
        with torch.no_grad():
            full = model(tokens)
            cache = model.new_cache(2)
            model(tokens[:, :5], cache)
            steps = [model(tokens[:, i: i + 1], cache) for i in (5, 6)]
        assert calls, extra
        assert rel_err(torch.cat(steps, dim=1).float(), full[:, 5:].float()) < 2e-2
