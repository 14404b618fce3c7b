"""HF generate() over EgmlaCache: the same greedy tokens as egmla's GenerationEngine, a cache holding
only the compressed latent (its bytes are what `egmla kv-report` measures), beam search consistent."""
import json

import pytest
import torch

import egmla.hf  # noqa: F401
from egmla.cli import main as egmla_main
from egmla.hf import EgmlaCache, EgmlaForCausalLM
from egmla.hf.modeling_egmla import CACHE_ARG  # `cache` in transformers >= 5.24, else `past_key_values`
from egmla.infer import GenerationEngine
from egmla.runs import load_model

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [12, 250, 3], [99, 98, 97, 96, 95]]


def left_padded(prompts, pad_id=0):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("variant", ["mha", "gqa", "mla", "eg-mla", "eg-mla-latent"])
def test_greedy_generate_matches_egmla_engine(variant, make_run):
    model, _ = load_model(make_run(variant))
    engine_out = GenerationEngine(model).generate(PROMPTS, max_new_tokens=12)
    hf_model = EgmlaForCausalLM.from_egmla(model, pad_token_id=0)  # no eos: both run all 12 steps
    ids, mask = left_padded(PROMPTS)
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            return_dict_in_generate=True)
    assert isinstance(getattr(out, CACHE_ARG), EgmlaCache)
    for row, generation in enumerate(engine_out):
        assert out.sequences[row, ids.shape[1]:].tolist() == generation.token_ids


@pytest.mark.parametrize("variant", ["mha", "gqa", "mla", "eg-mla", "eg-mla-latent", "eg-mla-bias"])
def test_an_fp8_cache_gives_the_engines_fp8_tokens(variant, make_run):
    """set_cache_dtype("fp8"): generate() keeps its cache in float8_e4m3fn (a quarter of this fp32 model's bytes) and
    gives the greedy tokens of egmla's engine over an fp8 cache, which both round the same way when written."""
    from egmla.attention.cache import FP8

    model, _ = load_model(make_run(variant))
    engine_out = GenerationEngine(model, cache_dtype="fp8").generate(PROMPTS, max_new_tokens=12)
    hf_model = EgmlaForCausalLM.from_egmla(model, pad_token_id=0)
    ids, mask = left_padded(PROMPTS)
    wide = getattr(hf_model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                     return_dict_in_generate=True), CACHE_ARG)
    assert hf_model.set_cache_dtype("fp8") is hf_model and hf_model.cache_dtype == FP8
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, CACHE_ARG)
    assert cache.kv.dtype == FP8
    if variant in ("mha", "gqa", "mla", "eg-mla-latent"):  # (EG-MLA's also keeps token ids, some paths statistics)
        assert 4 * cache.bytes_per_token() == pytest.approx(wide.bytes_per_token(), rel=0.05)
    assert cache.bytes_per_token() < wide.bytes_per_token() / 2
    for row, generation in enumerate(engine_out):
        assert out.sequences[row, ids.shape[1]:].tolist() == generation.token_ids
    assert hf_model.set_cache_dtype(None).cache_dtype is None


@pytest.mark.parametrize("variant", ["mha", "eg-mla"])
def test_an_fp8_keep_rope_cache_gives_the_engines_tokens(variant, make_run):
    """set_cache_dtype("fp8-keep-rope"): the RoPE keys in the model's dtype, the rest fp8, the engine's greedy tokens
    over the same format; its bytes lie between fp8's and the model dtype's."""
    from egmla.attention.cache import Fp8KeepRope

    model, _ = load_model(make_run(variant))
    engine_out = GenerationEngine(model, cache_dtype="fp8-keep-rope").generate(PROMPTS, max_new_tokens=12)
    hf_model = EgmlaForCausalLM.from_egmla(model, pad_token_id=0)
    ids, mask = left_padded(PROMPTS)
    out = hf_model.set_cache_dtype("fp8-keep-rope").generate(ids, attention_mask=mask, max_new_tokens=12,
                                                             do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, CACHE_ARG)
    assert cache.kv.dtype == Fp8KeepRope(torch.float32)
    fp8 = getattr(hf_model.set_cache_dtype("fp8").generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                                           return_dict_in_generate=True), CACHE_ARG)
    assert fp8.bytes_per_token() < cache.bytes_per_token()
    for row, generation in enumerate(engine_out):
        assert out.sequences[row, ids.shape[1]:].tolist() == generation.token_ids


def test_a_cache_dtype_that_is_not_one_is_refused(make_run):
    model, _ = load_model(make_run("mla"))
    hf_model = EgmlaForCausalLM.from_egmla(model, pad_token_id=0)
    with pytest.raises(ValueError, match="cache_dtype='fp4': a torch dtype"):
        hf_model.set_cache_dtype("fp4")
    assert hf_model.cache_dtype is None


def test_generate_past_the_rope_tables_stops_at_them_with_a_warning(make_run):
    """max_new_tokens past max_position_embeddings: the tokens up to the limit, not an error midway that loses them."""
    model, _ = load_model(make_run("mla"))
    hf_model = EgmlaForCausalLM.from_egmla(model, pad_token_id=0)
    limit = hf_model.config.max_position_embeddings
    prompt = torch.tensor([PROMPTS[0]])
    with pytest.warns(UserWarning, match=f"passes max_position_embeddings={limit}.*stops at {limit} positions"):
        out = hf_model.generate(prompt, max_new_tokens=limit, do_sample=False)
    assert out.shape == (1, limit)
    within = hf_model.generate(prompt, max_new_tokens=limit - prompt.shape[1], do_sample=False)
    assert torch.equal(out, within)


@pytest.mark.parametrize("variant", ["mla", "eg-mla"])
def test_cache_stores_only_the_latent_and_matches_kv_report(variant, make_run, capsys):
    model, _ = load_model(make_run(variant), dtype=torch.bfloat16)
    config = model.config
    hf_model = EgmlaForCausalLM.from_egmla(model, pad_token_id=0)
    ids, mask = left_padded(PROMPTS)
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, CACHE_ARG)
    for layer in cache.kv.layers:
        assert set(layer.buffers) == {"latent", "k_rope"}
        assert layer.buffers["latent"].shape[-1] == config.kv_lora_rank
        assert layer.buffers["k_rope"].shape[-1] == config.qk_rope_head_dim
    assert cache.nbytes() == sum(t.numel() * t.element_size() for layer in cache.kv.layers
                                 for t in layer.buffers.values()) + (
        cache.kv.token_ids.numel() * 4 if cache.kv.token_ids is not None else 0)
    # `egmla kv-report` for this very shape (the model's config is one of its rows)
    overrides = [f"{name}={value}" for name, value in config.to_dict().items() if name != "attention"]
    assert egmla_main(["kv-report", "--preset", "tiny", "--set", f"attention={config.attention}",
                       *[a for o in overrides for a in ("--set", o)], "--json"]) == 0
    rows = {row["variant"]: row for row in json.loads(capsys.readouterr().out)}
    reported = rows[config.variant_name()]["measured_bytes_per_token"]
    assert cache.bytes_per_token() == reported
    full_kv_bytes = 2 * config.n_layers * config.n_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)
    assert cache.bytes_per_token() < full_kv_bytes / 3  # not the rebuilt K/V
    assert cache.bytes_per_token() == 2 * config.n_layers * (config.kv_lora_rank + config.qk_rope_head_dim) + (
        4 if config.attention == "eg-mla" else 0)


def test_beam_search_reorders_the_cache(make_run):
    model, _ = load_model(make_run("eg-mla"))
    hf_model = EgmlaForCausalLM.from_egmla(model, pad_token_id=0)
    ids, mask = left_padded(PROMPTS[:2])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, num_return_sequences=2)
    cached = hf_model.generate(ids, **kwargs)
    recomputed = hf_model.generate(ids, use_cache=False, **kwargs)  # full forward every step, no cache
    assert cached.shape == (4, ids.shape[1] + 6)
    assert torch.equal(cached, recomputed)


def test_cache_grows_past_its_first_allocation(make_run):
    model, _ = load_model(make_run("mla"))
    hf_model = EgmlaForCausalLM.from_egmla(model)
    cache = EgmlaCache(model.config, 1, initial_length=4)
    ids = torch.tensor([PROMPTS[0]])
    out = hf_model.generate(ids, **{CACHE_ARG: cache}, max_new_tokens=10, do_sample=False)
    assert cache.kv.max_len >= 16 and cache.get_seq_length() == ids.shape[1] + 9
    reference = GenerationEngine(model).generate([PROMPTS[0]], max_new_tokens=10)[0].token_ids
    assert out[0, ids.shape[1]:].tolist() == reference
    with pytest.raises(ValueError, match="max_length"):
        EgmlaCache(model.config, 1, max_length=model.config.max_seq_len + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["mla", "eg-mla"])
def test_generate_on_cuda_matches_engine(variant, make_run):
    model, _ = load_model(make_run(variant), device="cuda")
    engine_out = GenerationEngine(model).generate(PROMPTS, max_new_tokens=12)
    hf_model = EgmlaForCausalLM.from_egmla(model, pad_token_id=0)
    ids, mask = left_padded(PROMPTS)
    out = hf_model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, do_sample=False)
    for row, generation in enumerate(engine_out):
        assert out[row, ids.shape[1]:].tolist() == generation.token_ids


def test_generate_takes_the_devices_fastest_path_unless_one_was_set(make_run, monkeypatch):
    """A model whose decode path was never set generates on the fastest path for its device (a stand-in rule here:
    'gate-table'; on CUDA the Triton kernel), with the tokens of that path in egmla's engine; a path set with
    set_decode_path, or on the model wrapped by from_egmla, is kept."""
    import egmla.hf.modeling_egmla as modeling

    monkeypatch.setattr(modeling, "fastest_decode_path", lambda config, device: "gate-table")
    model, _ = load_model(make_run("eg-mla"))
    expected = GenerationEngine(model, decode_path="gate-table").generate(PROMPTS[:1], max_new_tokens=6)[0].token_ids
    hf_model = EgmlaForCausalLM(EgmlaForCausalLM.from_egmla(model).config)
    hf_model.model.load_state_dict(model.state_dict())
    assert not hf_model.model.decode_path_chosen and hf_model.model.decode_path == "naive"
    ids = torch.tensor(PROMPTS[:1])
    out = hf_model.eval().generate(ids, max_new_tokens=6, do_sample=False)
    assert hf_model.model.decode_path == "gate-table" and out[0, ids.shape[1]:].tolist() == expected
    hf_model.model.set_decode_path("naive")
    hf_model.generate(ids, max_new_tokens=2, do_sample=False)
    assert hf_model.model.decode_path == "naive"
    model.set_decode_path("naive")  # chosen on the wrapped model: from_egmla keeps it
    wrapped = EgmlaForCausalLM.from_egmla(model)
    wrapped.generate(ids, max_new_tokens=2, do_sample=False)
    assert wrapped.model.decode_path == "naive" and wrapped.model.decode_path_chosen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_on_cuda_takes_the_kernel_path_by_default(make_run):
    model, _ = load_model(make_run("eg-mla"), device="cuda")
    hf_model = EgmlaForCausalLM(EgmlaForCausalLM.from_egmla(model).config).cuda()
    hf_model.model.load_state_dict(model.state_dict())
    expected = GenerationEngine(model).generate(PROMPTS[:1], max_new_tokens=8)[0].token_ids  # auto: the kernel
    ids = torch.tensor(PROMPTS[:1], device="cuda")
    out = hf_model.eval().generate(ids, max_new_tokens=8, do_sample=False)
    assert hf_model.model.decode_path == "kernel" and out[0, ids.shape[1]:].tolist() == expected


@pytest.mark.parametrize("variant", ["mla", "eg-mla"])
def test_assisted_decoding_gives_the_greedy_tokens(variant, make_run):
    """transformers' assisted decoding (a draft model; prompt lookup) needs the cache before its first step and crops
    it after each rejected draft: greedy tokens equal plain greedy generation. A draft model of another seed rejects
    most of its drafts, so the crops are exercised."""
    model, _ = load_model(make_run(variant))
    hf_model = EgmlaForCausalLM.from_egmla(model, pad_token_id=0)
    torch.manual_seed(1)
    draft = EgmlaForCausalLM.from_egmla(type(model)(model.config), pad_token_id=0)
    ids = torch.tensor([PROMPTS[0] + PROMPTS[2]])
    plain = hf_model.generate(ids, max_new_tokens=14, do_sample=False)
    for options in (dict(assistant_model=draft), dict(prompt_lookup_num_tokens=3)):
        out = hf_model.generate(ids, max_new_tokens=14, do_sample=False, return_dict_in_generate=True, **options)
        assert out.sequences.tolist() == plain.tolist(), options
        assert isinstance(getattr(out, CACHE_ARG), EgmlaCache)
    cache = getattr(out, CACHE_ARG)
    seen, lengths = cache.seen, cache.kv.lengths.clone()
    cache.crop(0)  # what transformers calls after a fully accepted draft: nothing dropped
    assert cache.seen == seen and torch.equal(cache.kv.lengths, lengths)
