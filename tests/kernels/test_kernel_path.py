"""The model's `kernel` decode path: same logits as `naive` through prefill and ragged decode steps,
a one-time warning and the reference where the kernel cannot run, same greedy tokens on the GPU."""
import warnings

import pytest
import torch

from egmla.attention import decode_paths
from egmla.model import Transformer
from tests.conftest import VARIANTS, perturbed, small_config
from tests.kernels.conftest import kernel_device, needs_cuda, rel_err, requires_triton

KERNEL_VARIANTS = ["mla", "eg-mla", "eg-mla-latent", "eg-mla-add", "eg-mla-rmsnorm", "eg-mla-no-norm"]


def decode_logits(model, tokens, path, prompt_lens, steps):
    """Ragged prefill (right-padded prompts) then `steps` one-token decode steps; logits of each step."""
    model.set_decode_path(path)
    cache = model.new_cache(tokens.shape[0], max_len=tokens.shape[1])
    prompt = tokens[:, : int(prompt_lens.max())].clone()
    outs = [model(prompt, cache, n_new=prompt_lens)[torch.arange(len(prompt_lens)), prompt_lens - 1]]
    for _ in range(steps):
        pos = cache.lengths.clone()
        outs.append(model(tokens[torch.arange(tokens.shape[0]), pos][:, None], cache)[:, 0])
    return torch.stack(outs, dim=1)


@requires_triton
@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_kernel_path_equals_naive(variant):
    config = small_config(**VARIANTS[variant])
    assert "kernel" in decode_paths(config)
    device = kernel_device()
    model = perturbed(Transformer(config)).to(device).eval()
    tokens = torch.randint(0, config.vocab_size, (3, 16), device=device)
    prompt_lens = torch.tensor([7, 1, 4], device=device)
    with torch.no_grad():
        naive = decode_logits(model, tokens, "naive", prompt_lens, steps=3)
        kernel = decode_logits(model, tokens, "kernel", prompt_lens, steps=3)
    assert not kernel.isnan().any()
    assert rel_err(kernel, naive) < 1e-4


@pytest.mark.parametrize("variant", ["mla", "eg-mla"])
def test_fallback_warns_once_and_matches_naive(variant, monkeypatch):
    import egmla.kernels

    monkeypatch.setattr(egmla.kernels, "kernel_unavailable_reason", lambda device: "no GPU in this test")
    monkeypatch.setattr(egmla.kernels, "_warned", set())
    config = small_config(**VARIANTS[variant])
    model = Transformer(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 10))
    with torch.no_grad():
        naive = decode_logits(model, tokens, "naive", torch.tensor([5, 3]), steps=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kernel = decode_logits(model, tokens, "kernel", torch.tensor([5, 3]), steps=3)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no GPU in this test" in messages[0]
    assert rel_err(kernel, naive) < 1e-5


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", ["mla", "eg-mla", "eg-mla-latent"])
def test_gpu_greedy_tokens_equal_naive(variant):
    """Greedy generation on the GPU (fp32, tiny preset shapes): kernel tokens == naive tokens."""
    from egmla.config import preset

    config = preset("tiny", **VARIANTS[variant])
    torch.manual_seed(0)
    model = Transformer(config).cuda().eval()
    prompts = torch.randint(0, config.vocab_size, (4, 24), device="cuda")
    prompt_lens = torch.tensor([24, 5, 13, 1], device="cuda")
    generated = {}
    with torch.no_grad():
        for path in ("naive", "kernel"):
            model.set_decode_path(path)
            cache = model.new_cache(4, max_len=96)
            logits = model(prompts, cache, n_new=prompt_lens)[torch.arange(4), prompt_lens - 1]
            tokens = []
            for _ in range(48):
                next_ids = logits.argmax(-1)
                tokens.append(next_ids)
                logits = model(next_ids[:, None], cache)[:, 0]
            generated[path] = torch.stack(tokens, 1)
    assert torch.equal(generated["kernel"], generated["naive"])


def test_kernel_path_caches_norm_statistics_at_append(monkeypatch):
    """The fused kernel reads (mu, rho) from the cache, computed once per appended token: the statistics pass
    (layernorm_stats_triton) sees only each step's new position, never the whole context again, and the cached
    values equal the statistics of the rebuilt K/V."""
    import egmla.kernels.egmla_decode
    from egmla.kernels.egmla_decode_ref import layernorm_stats

    seen = []
    real = egmla.kernels.egmla_decode.layernorm_stats_triton

    def spy(latent, *args, **kwargs):
        seen.append(latent.shape[1])
        return real(latent, *args, **kwargs)

    monkeypatch.setattr(egmla.kernels.egmla_decode, "layernorm_stats_triton", spy)
    config = small_config(**VARIANTS["eg-mla"])
    model = Transformer(config).eval()
    model.set_decode_path("kernel")
    cache = model.new_cache(2, max_len=12)
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        model(tokens[:, :6], cache)
        for i in range(6, 9):
            model(tokens[:, i:i + 1], cache)
        attn = model.layers[1].attn
        latent = cache.layers[1].buffers["latent"][:, :9]
        expected = layernorm_stats(latent, attn.gate(tokens), attn.wkv_b.weight, attn.gate_norm.eps)
    assert seen == [1] * 3 * config.n_layers  # one new position per step and layer; the prefill in PyTorch
    assert cache.layers[1].buffers["ln_stats"].dtype == torch.float32
    assert torch.allclose(cache.layers[1].buffers["ln_stats"][:, :9], expected, rtol=1e-5, atol=1e-6)


@requires_triton
@pytest.mark.parametrize("variant,path", [("mha", "kernel"), ("mla-kv64", "kernel"), ("egmla-kv64", "kernel"),
                                          ("egmla-kv64", "grouped"), ("egmla-kv64-bias-v", "absorbed")])
def test_a_decode_step_builds_its_indices_once_not_per_layer(variant, path, monkeypatch):
    """What every layer needs of a step's indices (the cache writes' row index, the kernels' lengths, the bias
    controls' registered lengths) is built once with the context: a one-token step of 4 layers calls torch.arange
    and torch.minimum as often as one of 2 (each call is a launch inside a CUDA-graph step)."""
    from egmla.variants import variant_config

    counts = []
    for layers in (2, 4):
        config = variant_config(variant, "tiny", n_layers=layers)
        torch.manual_seed(0)
        model = Transformer(config).eval().to(kernel_device())
        model.set_decode_path(path)
        for layer in model.layers:
            for backend in ("grouped_backend", "absorbed_backend"):
                if hasattr(layer.attn, backend):
                    setattr(layer.attn, backend, "kernel")
        cache = model.new_cache(2, max_len=12)
        tokens = torch.randint(0, config.vocab_size, (2, 5), device=kernel_device())
        with torch.no_grad():
            model(tokens, cache)
            calls = []
            for name in ("arange", "minimum"):
                monkeypatch.setattr(torch, name, lambda *a, _f=getattr(torch, name), _n=name, **k:
                                    calls.append(_n) or _f(*a, **k))
            model(tokens[:, :1], cache)
            monkeypatch.undo()
        counts.append(sorted(calls))
    assert counts[0] == counts[1], f"torch.arange and torch.minimum per step with 2 and 4 layers: {counts}"


@pytest.mark.parametrize("variant", ["mla", "eg-mla"])
def test_a_kernel_step_builds_no_mask_and_a_naive_step_builds_one(monkeypatch, variant):
    """The causal mask over the cache is built on first read (AttnContext.mask): a `kernel` decode step never reads
    it (two launches fewer per step on a GPU), a `naive` one builds it once for all its layers (EG-MLA's layers read
    copies of the context made by dataclasses.replace, which share it)."""
    import egmla.attention.context as context

    built = []
    original = context.attention_mask
    monkeypatch.setattr(context, "attention_mask", lambda *a: built.append(1) or original(*a))
    model = Transformer(small_config(**VARIANTS[variant])).to(kernel_device()).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), device=kernel_device())
    logits = {}
    for path in ("kernel", "naive"):
        model.set_decode_path(path)
        cache = model.new_cache(2, max_len=12)
        with torch.no_grad():
            model(tokens[:, :8], cache)
            built.clear()
            logits[path] = model(tokens[:, 8:9], cache)
        assert len(built) == (0 if path == "kernel" else 1), (path, len(built))
    assert rel_err(logits["kernel"], logits["naive"]) < 1e-4
