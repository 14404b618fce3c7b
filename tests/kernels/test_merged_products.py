"""The merged products of a cached call without autograd on a GPU (MLA's wkv_a and the query's first projection as
one GEMM, SwiGLU's w1 and w3 as one), on the CPU made to take the GPU's route as the tests of the other no-grad routes
do (fp32): the logits equal the separate products' and the full forward's, alone and with the one-launch append and
the other decode kernels (in the interpreter); the concatenated weights are built once and again after a weight
changes; a forward that wants gradients never takes them."""
import pytest
import torch

from tests.kernels.conftest import kernel_device, needs_cuda, rel_err, requires_triton

pytestmark = requires_triton

# kv_lora_rank 6 <= qk_nope_head_dim, v_head_dim: MLA's 'absorbed' / 'kernel' fold W_UK into the query, whose folded
# weight then joins wkv_a's product
LATENT = dict(kv_lora_rank=6)
VARIANTS = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_heads=2),
    "mla": dict(attention="mla", **LATENT),
    "mla-qlora": dict(attention="mla", q_lora_rank=24, **LATENT),
    "egmla": dict(attention="eg-mla", **LATENT),
    "egmla-latent": dict(attention="eg-mla", gate_placement="latent", **LATENT),
    "egmla-bias-v": dict(attention="eg-mla", gate_op="bias-v", **LATENT),  # the V table (egmla-kv64-bias-v)
}


def model_for(variant: str, path: str, device: str):
    from egmla.model import Transformer
    from tests.conftest import small_config

    model = Transformer(small_config(**VARIANTS[variant])).to(device).eval()
    model.set_decode_path(path)
    return model


def take_merged_products(monkeypatch, merged: bool = True) -> None:
    """The merged products alone (not the kernels) take the GPU's route without autograd (merged) or never, whatever
    the device."""
    from egmla.attention.mla import MultiHeadLatentAttention
    from egmla.model import SwiGLU

    def merges(self, x):  # merged: what a GPU tensor answers
        return merged and self.merge_products and not torch.is_grad_enabled()

    monkeypatch.setattr(MultiHeadLatentAttention, "merges_input_products", merges)
    monkeypatch.setattr(SwiGLU, "merges_gate_up", merges)


def count_merged_products(monkeypatch) -> dict:
    """Counts of the merged products' calls, by method."""
    from egmla.attention.mla import MultiHeadLatentAttention
    from egmla.model import SwiGLU

    calls = {"input_products": 0, "gate_up_weight": 0}
    for cls, method in ((MultiHeadLatentAttention, "input_products"), (SwiGLU, "gate_up_weight")):
        original = getattr(cls, method)

        def counted(self, *args, _original=original, _method=method):
            calls[_method] += 1
            return _original(self, *args)

        monkeypatch.setattr(cls, method, counted)
    return calls


def force_gpu_routes(monkeypatch) -> None:
    """Every no-grad GPU route of the model and its attention (merged products, one-launch append, add + norm, SwiGLU's
    activation, the addmm residual) as tests/kernels/test_latent_append.py and test_decode_elementwise.py force them."""
    import egmla.attention.mla as mla
    import egmla.model as model_module

    for module in (mla, model_module):
        monkeypatch.setattr(module, "no_grad_kernel_can_run", lambda x: not torch.is_grad_enabled())


def decode(model, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of the steps after a ragged prompt: `prompt` tokens into the first row and 2 fewer into the others (an
    empty cache), then a call of 2 tokens that brings the others level (over the cache), then one token per step."""
    batch, total = tokens.shape
    cache = model.new_cache(batch, max_len=total + 2)
    short = [0] + [2] * (batch - 1)
    with torch.no_grad():
        model(tokens[:, :prompt], cache, n_new=torch.tensor([prompt - s for s in short], device=tokens.device))
        model(tokens[:, prompt - 2: prompt], cache, n_new=torch.tensor(short, device=tokens.device))
        return torch.cat([model(tokens[:, i:i + 1], cache) for i in range(prompt, total)], dim=1)


CASES = [("mha", "naive"), ("gqa", "naive"), ("mla", "naive"), ("mla", "absorbed"), ("mla-qlora", "naive"),
         ("mla-qlora", "absorbed"), ("egmla", "gate-table"), ("egmla-latent", "absorbed"), ("egmla-bias-v", "absorbed")]


@pytest.mark.parametrize("variant,path", CASES)
def test_merged_products_give_the_separate_products_logits(monkeypatch, variant, path):
    """Fresh random weights and tokens: the cached steps through the merged products alone (PyTorch ops otherwise)
    equal the same steps through the separate products and the full forward."""
    device = kernel_device()
    model = model_for(variant, path, device)
    tokens = torch.randint(0, model.config.vocab_size, (3, 12), device=device)
    with torch.no_grad():
        full = model(tokens)
    take_merged_products(monkeypatch, merged=False)
    separate = decode(model, tokens, prompt=7)
    take_merged_products(monkeypatch)
    calls = count_merged_products(monkeypatch)
    merged = decode(model, tokens, prompt=7)
    layers, latent = model.config.n_layers, variant.startswith(("mla", "egmla"))
    # the catch-up call and each of the 5 steps read the cache (the prompt into empty rows does not); every cached
    # call merges the FFN's products
    assert calls["input_products"] == (6 * layers if latent else 0) and calls["gate_up_weight"] == 7 * layers
    assert rel_err(merged, separate) < 1e-5
    assert rel_err(merged, full[:, 7:]) < 1e-4


GPU_CASES = [("mha", "kernel"), ("gqa", "naive"), ("mla", "kernel"), ("mla", "naive"), ("mla-qlora", "kernel"),
             ("egmla", "kernel"), ("egmla", "grouped"), ("egmla-latent", "kernel"), ("egmla-bias-v", "absorbed")]


@pytest.mark.parametrize("variant,path", GPU_CASES)
def test_merged_products_compose_with_the_one_launch_append(monkeypatch, variant, path):
    """Every no-grad GPU route at once (the kernels in the interpreter): the one-launch append reads wkv_a's slice of
    the merged product (MLA, and EG-MLA with the gate after W_UKV), and the steps equal the full forward."""
    import egmla.kernels.latent_append as kernel

    device = kernel_device()
    appends = []
    original = kernel.latent_append
    monkeypatch.setattr(kernel, "latent_append", lambda *a, **k: appends.append(a[0]) or original(*a, **k))
    force_gpu_routes(monkeypatch)
    model = model_for(variant, path, device)
    for layer in model.layers:  # the bias control's and the grouped decode's Triton kernels, as on a GPU
        for backend in ("absorbed_backend", "grouped_backend"):
            if hasattr(layer.attn, backend):
                setattr(layer.attn, backend, "kernel")
    tokens = torch.randint(0, model.config.vocab_size, (3, 10), device=device)
    with torch.no_grad():
        full = model(tokens)
    merged = decode(model, tokens, prompt=7)
    fused = variant in ("mla", "mla-qlora", "egmla", "egmla-bias-v")
    assert len(appends) == (4 * model.config.n_layers if fused else 0)
    kv_width = model.config.kv_lora_rank + model.config.qk_rope_head_dim
    # a slice of the wider merged product (row stride past its width), not a product of its own
    assert all(a.shape[-1] == kv_width and a.stride(1) > kv_width for a in appends)
    assert rel_err(merged, full[:, 7:]) < 1e-4


@pytest.mark.parametrize("variant,path", [("mla", "absorbed"), ("mla", "naive"), ("mla-qlora", "absorbed"),
                                          ("egmla", "gate-table"), ("mha", "naive")])
def test_merged_weights_follow_weight_changes(monkeypatch, variant, path):
    """The concatenated weights are built once (a second step reads the same tensors) and again after a source weight
    changes in place (an optimizer step) or is loaded (load_state_dict): the next step equals the full forward of the
    changed model, and the generation engine's list of what its CUDA graphs read shows the new tensors."""
    from egmla.infer.engine import precomputed_tensors
    from egmla.model import Transformer

    take_merged_products(monkeypatch)
    device = kernel_device()
    model = model_for(variant, path, device)
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), device=device)

    def step_matches_full_forward():
        with torch.no_grad():
            assert rel_err(decode(model, tokens, prompt=8), model(tokens)[:, 8:]) < 1e-4

    step_matches_full_forward()
    built = model.merged_product_weights()
    assert all(a is b for a, b in zip(built, model.merged_product_weights())), "built once, not per call"
    assert all(a is b for a, b in zip(precomputed_tensors(model, True)[-len(built):], built))
    assert not any("merged" in name for name in model.state_dict()), "derived, not saved"
    changes = [lambda layer: layer.ffn.w3.weight.mul_(-1.5), lambda layer: layer.ffn.w1.weight.add_(0.05)]
    if variant != "mha":
        changes += [lambda layer: layer.attn.wkv_a.weight.mul_(1.5),
                    lambda layer: (layer.attn.wq_a if hasattr(layer.attn, "wq_a") else layer.attn.wq).weight.add_(0.05)]
        if path == "absorbed" and variant == "mla":  # the folded query joins wkv_a's product: its sources count too
            changes.append(lambda layer: layer.attn.wkv_b.weight.mul_(1.25))
    for change in changes:
        before = model.merged_product_weights()
        with torch.no_grad():
            for layer in model.layers:  # in place, as an optimizer step does
                change(layer)
        step_matches_full_forward()
        after = model.merged_product_weights()
        assert sum(a is not b for a, b in zip(before, after)) == model.config.n_layers, "the changed ones, rebuilt"
    other = Transformer(model.config).to(device)  # other weights, loaded in place
    before = model.merged_product_weights()
    model.load_state_dict(other.state_dict())
    step_matches_full_forward()
    after = precomputed_tensors(model, True)[-len(before):]
    assert all(a is not b for a, b in zip(before, after))


def test_a_forward_that_wants_gradients_merges_nothing(monkeypatch):
    """On a GPU (here: every tensor taken for one) a call with autograd on runs the separate products, even on inputs
    that want no gradient (the weights do, and the concatenated copy has none); without autograd it merges."""
    import egmla.attention.mla as mla
    import egmla.model as model_module
    from egmla.model import Transformer
    from tests.conftest import small_config

    for module in (mla, model_module):
        monkeypatch.setattr(module, "no_grad_kernel_can_run", lambda x: True)
    model = Transformer(small_config(attention="mla"))
    attn, ffn = model.layers[0].attn, model.layers[0].ffn
    x = torch.randn(2, 1, model.config.d_model)
    assert not attn.merges_input_products(x) and not ffn.merges_gate_up(x)
    with torch.no_grad():
        assert attn.merges_input_products(x) and ffn.merges_gate_up(x)


@pytest.mark.parametrize("variant,path,fewer", [("mha", "kernel", 1), ("gqa", "naive", 1), ("mla", "absorbed", 2),
                                                ("mla-qlora", "naive", 2), ("egmla-bias-v", "absorbed", 2)])
def test_a_decode_step_runs_fewer_products(monkeypatch, variant, path, fewer):
    """A decode step through the merged products runs `fewer` GEMMs per layer (the FFN's one; the latent variants'
    input products one more): each pair becomes one product, and neither of its operands is computed again."""
    from torch.profiler import ProfilerActivity, profile

    device = kernel_device()
    model = model_for(variant, path, device)
    tokens = torch.randint(0, model.config.vocab_size, (2, 8), device=device)
    cache = model.new_cache(2, max_len=10)

    def gemms_of_a_step(position: int) -> int:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(tokens[:, position:position + 1], cache)
        return sum(event.name in ("aten::mm", "aten::addmm") for event in prof.events())

    with torch.no_grad():
        model(tokens[:, :6], cache)
    take_merged_products(monkeypatch, merged=False)
    separate = gemms_of_a_step(6)
    take_merged_products(monkeypatch)
    assert separate - gemms_of_a_step(7) == fewer * model.config.n_layers


@needs_cuda
@pytest.mark.parametrize("variant", ["mha", "mla", "eg-mla"])
def test_graphs_read_the_merged_weights_of_the_current_weights(variant):
    """On the GPU: the engine's CUDA-graph steps take the merged products (built before the capture) and keep their
    graphs while the weights stay; after the weights change in place between calls, the next call gives an eager
    engine's tokens for the changed model (the graphs of the old concatenated weights dropped)."""
    from egmla.infer import GenerationEngine
    from tests.infer.helpers import tiny_model

    model = tiny_model(variant, seed=5).cuda()
    engine = GenerationEngine(model)
    prompts = [[5, 17, 42, 99, 3], [120, 8], list(range(30, 50))]
    first = engine.generate(prompts, max_new_tokens=8)
    assert engine.last_stats.cuda_graphs and hasattr(model.layers[0].ffn, "merged_gate_up_weight")
    steps = dict(engine._steps)
    assert [r.token_ids for r in engine.generate(prompts, max_new_tokens=8)] == [r.token_ids for r in first]
    assert all(engine._steps[key] is step for key, step in steps.items()), "unchanged weights: graphs kept"
    with torch.no_grad():
        for layer in model.layers:  # in place, as an optimizer step does
            layer.ffn.w3.weight.mul_(-1.0)
            if hasattr(layer.attn, "wkv_a"):
                layer.attn.wkv_a.weight.mul_(1.5)
    got = engine.generate(prompts, max_new_tokens=8)
    expected = GenerationEngine(model, cuda_graphs=False).generate(prompts, max_new_tokens=8)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.token_ids for r in got] != [r.token_ids for r in first], "the change should change the tokens"


def test_merged_products_can_be_turned_off_and_drop_their_copies(monkeypatch):
    """GenerationEngine(merged_products=False) / Transformer.set_merged_products(False): the route is never taken,
    the copies already built are dropped, and the logits are the same."""
    from egmla.infer.engine import GenerationEngine

    take_merged_products(monkeypatch)
    model = model_for("mla", "absorbed", kernel_device())
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), device=kernel_device())
    with torch.no_grad():
        cache = model.new_cache(2, max_len=12)
        model(tokens[:, :8], cache)
        merged = model(tokens[:, 8:9], cache)
        first = model.layers[0]
        assert "merged_input_weight" in vars(first.attn) and "merged_gate_up_weight" in vars(first.ffn)
        GenerationEngine(model, decode_path=None, cuda_graphs=False, merged_products=False)
        assert not any(name.startswith("merged_") for layer in model.layers
                       for module in (layer.attn, layer.ffn) for name in vars(module))
        assert model.merged_product_weights() == []
        cache = model.new_cache(2, max_len=12)
        model(tokens[:, :8], cache)
        separate = model(tokens[:, 8:9], cache)
    assert not any(name.startswith("merged_") for name in vars(model.layers[0].attn))  # not built again
    assert rel_err(separate, merged) < 1e-5
