"""An fp8 KV cache (dtype torch.float8_e4m3fn, egmla/attention/cache.py): what it stores (saturated at +-448, rounded
once), every row operation keeping it, the model's decode paths reading the same stored values (so they agree with
each other as they do on a bf16 cache; EG-MLA's cached norm statistics come from the latents as rounded), and its
distance from an unquantized cache."""
import pytest
import torch

from egmla.attention import allocate_cache
from egmla.attention.cache import FP8, FP8_KEEP_ROPE, ROPE_TENSORS, Fp8KeepRope, quantize
from egmla.model import Transformer
from tests.conftest import perturbed, small_config

MLA = dict(attention="mla")
MHA = dict(attention="mha")
GQA = dict(attention="gqa", n_kv_heads=2)
EGMLA = dict(attention="eg-mla")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_saturates_then_rounds():
    x = torch.tensor([1000.0, -1e9, 448.0, 0.3, -0.0, 1e-4, float("inf")])
    q = quantize(x, FP8)
    assert q.dtype == FP8
    assert q.float()[:3].tolist() == [448.0, -448.0, 448.0]  # no NaN: e4m3fn has no infinity to overflow into
    assert q.float()[3].item() == torch.tensor(0.3).to(FP8).float().item()
    assert q.float()[6].item() == 448.0
    assert torch.equal(quantize(x[:4], torch.bfloat16), x[:4].to(torch.bfloat16))


@pytest.mark.parametrize("kind", [MLA, GQA])
def test_fp8_cache_stores_one_byte_and_every_row_operation_keeps_it(kind):
    config = small_config(**kind)
    cache = allocate_cache(config, 4, 12, dtype=FP8)
    bf16 = allocate_cache(config, 4, 12, dtype=torch.bfloat16)
    assert cache.nbytes() * 2 == bf16.nbytes()
    layer = cache.layers[0]
    names = list(layer.buffers)
    values = {name: 30 * torch.randn(4, 5, *layer.buffers[name].shape[2:]) for name in names}
    values[names[0]][0, 0].fill_(1e6)  # saturates
    positions = torch.arange(5).expand(4, 5)
    layer.write(positions, **values)
    cache.advance(torch.full((4,), 5))
    for name in names:
        stored = layer.read(name, 5)
        assert stored.dtype == FP8 and layer.tensor(name).shape[:2] == (4, 12)
        assert torch.equal(stored.float(), quantize(values[name], FP8).float())
    assert layer.read(names[0], 5)[0, 0].float().eq(448).all()

    def row(c, b):
        return [c.layers[0].read(name, 5)[b].float() for name in names]

    expected = [row(cache, b) for b in range(4)]
    cache.copy_rows(torch.tensor([3]), torch.tensor([1]))
    assert all(torch.equal(a, b) for a, b in zip(row(cache, 1), expected[3]))
    cache.select_rows(torch.tensor([2, 0, 3]))
    assert all(torch.equal(a, b) for a, b in zip(row(cache, 0), expected[2]))
    cache.grow(20)
    assert cache.layers[0].tensor(names[0]).shape[1] == 20 and cache.layers[0].tensor(names[0]).dtype == FP8
    cache.compact(torch.tensor([2, 1]))
    assert all(torch.equal(a, b) for a, b in zip(row(cache, 0), expected[3]))
    view = cache.rows(1, 2)
    assert all(torch.equal(a, b) for a, b in zip(row(view, 0), expected[0]))
    cache.copy_prefix(0, 1, 3)
    assert torch.equal(cache.layers[0].read(names[0], 3)[1].float(), expected[3][0][:3])
    target = allocate_cache(config, 3, 12, dtype=FP8)
    target.take_rows(cache, 1, 2, 5)
    assert all(torch.equal(a, b) for a, b in zip(row(target, 1), row(cache, 0)))
    cache.reset_rows_at(torch.tensor([0]))
    assert cache.lengths.tolist() == [0, 3]


def decode_logits(model, tokens, prompt, path, dtype):
    """Prefill `prompt` tokens, then decode the rest one token at a time: the logits of every decoded position."""
    model.set_decode_path(path)
    cache = model.new_cache(tokens.shape[0], max_len=tokens.shape[1] + 2, dtype=dtype)
    model(tokens[:, :prompt], cache)
    steps = [model(tokens[:, t:t + 1], cache)[:, 0] for t in range(prompt, tokens.shape[1])]
    return torch.stack(steps, 1)


@pytest.mark.parametrize("kind,cache_dtype", [
    *((kind, FP8) for kind in (MLA, MHA, GQA, dict(attention="mla", q_lora_rank=24), EGMLA,
                               dict(EGMLA, gate_norm="rmsnorm"), dict(EGMLA, gate_op="add"),
                               dict(EGMLA, gate_placement="latent"), dict(EGMLA, gate_op="bias"),
                               dict(EGMLA, gate_op="bias-v"))),
    *((kind, FP8_KEEP_ROPE) for kind in (MLA, GQA, EGMLA, dict(EGMLA, gate_op="bias")))])
def test_every_decode_path_reads_the_same_fp8_values(kind, cache_dtype, monkeypatch):
    """Naive, absorbed and the Triton kernels (in the interpreter on a CPU, as `make test` runs it; EG-MLA's 'kernel'
    and 'grouped' and the same-table controls' 'absorbed' too) read one stored fp8 cache: they agree as closely as on an
    fp32 cache, and the fp8 cache stays close to the fp32 one. The kernels are handed the fp8 cache itself, not a
    widened copy. EG-MLA's paths agree only if the cached norm statistics come from the latents as rounded, as every
    path reads them. fp8-keep-rope: the same, the kernels handed its fp8 latent (MHA's V) beside RoPE keys in fp32."""
    from egmla.kernels import bias_decode, egmla_decode, gqa_decode, grouped_decode, interpreting, mla_decode

    seen = []
    for module, name, at in ((mla_decode, "mla_decode", 2), (gqa_decode, "gqa_decode", 2),
                             (egmla_decode, "egmla_decode", 2), (grouped_decode, "grouped_decode", 2),
                             (bias_decode, "bias_decode", 3)):
        def spy(*args, _kernel=getattr(module, name), _at=at, **kwargs):
            seen.append(args[_at].dtype)  # the cache's first tensor (latent, or k)
            return _kernel(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    config = small_config(**kind)
    model = perturbed(Transformer(config)).eval()
    for layer in model.layers:  # EG-MLA's 'grouped' and the controls' 'absorbed' through Triton on a CPU too
        layer.attn.grouped_backend = layer.attn.absorbed_backend = "kernel"
    tokens = torch.randint(0, config.vocab_size, (3, 14))
    with torch.no_grad():
        paths = model.layers[0].attn.paths
        exact = decode_logits(model, tokens, 6, next(iter(paths)), torch.float32)
        fp8 = {path: decode_logits(model, tokens, 6, path, cache_dtype) for path in paths}
    if interpreting():
        assert seen and FP8 in seen and set(seen) <= {torch.float32, FP8}
        assert seen.count(FP8) >= len(seen) // 2, seen  # every kernel path is handed the fp8 cache
    naive = fp8[next(iter(paths))]
    assert naive.isfinite().all()
    for path, logits in fp8.items():
        assert rel_err(logits, naive) < 1e-4, path
    assert 0 < rel_err(naive, exact) < 0.05  # rounded once, at e4m3's 3 mantissa bits


@pytest.mark.parametrize("kind", [MLA, MHA, EGMLA])
def test_a_cache_with_some_tensors_in_fp8(kind):
    """fp8_tensors (a measurement: which tensor's rounding costs what, `egmla bench fp8-loss --fp8-tensors`): only the
    named tensors in fp8, the rest in the model's dtype; every decode path reads such a cache to the same logits;
    naming every tensor gives the fp8 cache's logits exactly, one of them something between it and the exact ones; a
    name the cache does not keep is refused with the ones it does."""
    config = small_config(**kind)
    model = perturbed(Transformer(config)).eval()
    tokens = torch.randint(0, config.vocab_size, (3, 14))
    names = sorted(name for name, (_, dtype) in model.layers[0].attn.cache_spec(config, "naive").tensors.items()
                   if dtype is None)
    cache = model.new_cache(3, max_len=16, fp8_tensors=names[:1])
    assert cache.layers[0].fp8 == {names[0]} and cache.layers[0].tensor(names[1]).dtype == torch.float32
    assert cache.layers[0].tensor(names[0]).dtype == FP8
    with pytest.raises(ValueError, match=r"fp8_tensors=\['ln_stats'\]: this cache keeps .* in the model's dtype"):
        model.new_cache(3, max_len=16, fp8_tensors=["ln_stats"])

    def logits(path, **cache_kwargs):
        model.set_decode_path(path)
        cache = model.new_cache(3, max_len=16, **cache_kwargs)
        model(tokens[:, :6], cache)
        return torch.stack([model(tokens[:, t:t + 1], cache)[:, 0] for t in range(6, 14)], 1)

    with torch.no_grad():
        paths = list(model.layers[0].attn.paths)
        exact, fp8 = logits(paths[0]), logits(paths[0], dtype=FP8)
        every = logits(paths[0], fp8_tensors=names)
        one = {path: logits(path, fp8_tensors=names[:1]) for path in paths}
    assert torch.allclose(every, fp8, rtol=1e-6, atol=1e-6)
    for path, value in one.items():
        assert value.isfinite().all() and rel_err(value, one[paths[0]]) < 1e-4, path
    assert 0 < rel_err(one[paths[0]], exact) < rel_err(fp8, exact) * 1.5


@pytest.mark.parametrize("kind", [MLA, MHA, EGMLA])
def test_fp8_keep_rope_keeps_the_rope_keys_wide(kind):
    """cache_dtype "fp8-keep-rope": every tensor in fp8 but the RoPE keys (MLA's k_rope, MHA's k), kept in the model's
    dtype; EG-MLA's statistics stay fp32. Its logits are exactly those of a cache in the model's dtype with the other
    tensors in fp8 (fp8_tensors), on every path; its bytes lie between fp8's and the model dtype's, and it survives
    the row operations as an fp8 cache does."""
    config = small_config(**kind)
    model = perturbed(Transformer(config)).eval()
    model.set_decode_path(list(model.layers[0].attn.paths)[-1])
    cache = model.new_cache(3, max_len=16, dtype=FP8_KEEP_ROPE)
    assert cache.dtype == Fp8KeepRope(torch.float32) and str(cache.dtype) == "fp8-keep-rope"
    layer = cache.layers[0]
    rope, = set(layer.buffers) & ROPE_TENSORS
    assert layer.tensor(rope).dtype == torch.float32 and layer.fp8 == set(layer.buffers) - {rope, "ln_stats"}
    fp8, wide = model.new_cache(3, max_len=16, dtype="fp8"), model.new_cache(3, max_len=16)
    assert fp8.bytes_per_token() < cache.bytes_per_token() < wide.bytes_per_token()
    rounded = model.new_cache(3, max_len=16, fp8_tensors=sorted(layer.fp8))
    tokens = torch.randint(0, config.vocab_size, (3, 12))
    with torch.no_grad():
        for c in (cache, rounded):
            model(tokens[:, :6], c)
        for t in range(6, 12):
            assert torch.equal(model(tokens[:, t:t + 1], cache), model(tokens[:, t:t + 1], rounded))
    cache.select_rows(torch.tensor([2, 0]))
    cache.grow(20)
    assert cache.layers[0].tensor(rope).dtype == torch.float32 and cache.layers[0].fp8 == layer.fp8
    assert torch.equal(cache.layers[1].read(rope, 12)[0], rounded.layers[1].read(rope, 12)[2])


def test_eg_mla_keeps_fp32_statistics_beside_an_fp8_cache():
    """EG-MLA's 'grouped' cache in fp8: the latents and RoPE keys one byte each, the norm statistics fp32 (8 B per
    position and layer), and the statistics those of the rounded latents (what `norm_stats` gives for them)."""
    config = small_config()
    model = perturbed(Transformer(config)).eval()
    model.set_decode_path("grouped")
    cache = model.new_cache(2, max_len=12, dtype=FP8)
    layer = cache.layers[0]
    assert layer.tensor("latent").dtype == FP8 and layer.tensor("ln_stats").dtype == torch.float32
    tokens = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        model(tokens, cache)
    attn = model.layers[0].attn
    stored = layer.read("latent", 7).float()
    assert torch.allclose(layer.read("ln_stats", 7), attn.norm_stats(stored, tokens), rtol=1e-5, atol=1e-6)


def test_generation_with_an_fp8_cache():
    from egmla.infer import GenerationEngine

    config = small_config(**MLA)
    model = perturbed(Transformer(config)).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    engine = GenerationEngine(model, cache_dtype=FP8)
    results = engine.generate(prompts, max_new_tokens=6)
    assert [len(r.token_ids) for r in results] == [6, 6]
    assert engine._cache.dtype == FP8 and engine._cache.layers[0].read("latent", 4).dtype == FP8
    again = engine.generate(prompts, max_new_tokens=6)  # the kept cache is reused, not rebuilt
    assert [r.token_ids for r in again] == [r.token_ids for r in results]
    assert GenerationEngine(model, cache_dtype="fp8").cache_dtype == FP8  # the command line's spelling
    keep_rope = GenerationEngine(model, cache_dtype="fp8-keep-rope")
    assert [len(r.token_ids) for r in keep_rope.generate(prompts, max_new_tokens=6)] == [6, 6]
    assert keep_rope._cache.dtype == Fp8KeepRope(torch.float32)
    assert keep_rope._cache.layers[0].read("k_rope", 4).dtype == torch.float32
    with pytest.raises(ValueError, match="cache_dtype='fp4': a torch dtype .*'fp8-keep-rope'"):
        GenerationEngine(model, cache_dtype="fp4")
