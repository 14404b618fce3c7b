"""Cached decode (prefill + token-by-token, ragged batches) must equal the full forward, for every
variant and every decode path; fast paths must equal the naive path."""
import pytest
import torch

from egmla.attention import decode_paths
from egmla.model import Transformer
from tests.conftest import VARIANTS, perturbed, small_config

CASES = [(name, path) for name, kw in VARIANTS.items() for path in decode_paths(small_config(**kw))
         if path not in ("kernel", "grouped")]  # kernel paths are tested against these in tests/kernels


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant,path", CASES)
def test_prefill_then_decode_matches_full_forward(variant, path):
    config = small_config(**VARIANTS[variant])
    model = perturbed(Transformer(config)).eval()
    batch, total = 3, 21
    tokens = torch.randint(0, config.vocab_size, (batch, total))
    prompt_lens = torch.tensor([9, 4, 1])  # ragged prompts, right-padded in one prefill call
    with torch.no_grad():
        full = model(tokens)
        model.set_decode_path(path)
        cache = model.new_cache(batch, max_len=40)
        padded = tokens[:, :9].clone()
        padded[1, 4:] = 0
        padded[2, 1:] = 0
        logits = model(padded, cache, n_new=prompt_lens)
        for b in range(batch):
            n = prompt_lens[b]
            assert rel_err(logits[b, :n], full[b, :n]) < 1e-4
        while int(cache.lengths.min()) < total:
            pos = cache.lengths.clone()  # finished sequences keep appending padding (not compared)
            step = model(tokens[torch.arange(batch), pos.clamp(max=total - 1)][:, None], cache)
            for b in range(batch):
                if pos[b] < total:
                    assert rel_err(step[b, 0], full[b, pos[b]]) < 1e-4, (variant, path, b, int(pos[b]))
    assert not torch.isnan(logits).any()


@pytest.mark.parametrize("variant", [v for v in VARIANTS if small_config(**VARIANTS[v]).is_latent])
def test_the_causal_pass_and_the_naive_decode_build_the_same_keys_and_values(variant):
    """Two methods build K/V from the latents: `keys_values` for the causal pass (training, full forwards, fresh
    prompts) and `expand_kv` for the naive decode. A variant that changes K/V in one only trains one model and decodes
    another; the test above sees that as a relative error, this one names the two methods."""
    config = small_config(**VARIANTS[variant])
    attn = perturbed(Transformer(config)).layers[0].attn
    latent = torch.randn(2, 7, config.kv_lora_rank)
    k_pe, ids = torch.randn(2, 7, config.qk_rope_head_dim), torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        k, v = attn.keys_values(latent, k_pe, ids)
        k_nope, v_naive = attn.expand_kv(latent, ids)
    d_n, d_v = config.qk_nope_head_dim, config.v_head_dim
    assert rel_err(k[..., :d_n], k_nope) < 1e-5, "keys_values and expand_kv differ in K: override both"
    assert rel_err(v[..., :d_v], v_naive) < 1e-5, "keys_values and expand_kv differ in V: override both"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if len(set(decode_paths(small_config(**VARIANTS[v])))
                                                               - {"kernel", "grouped"}) > 1])
def test_fast_paths_equal_naive_on_fresh_inputs(variant):
    config = small_config(**VARIANTS[variant])
    model = perturbed(Transformer(config)).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 17))
    results = {}
    with torch.no_grad():
        for path in decode_paths(config):
            if path in ("kernel", "grouped"):
                continue
            model.set_decode_path(path)
            cache = model.new_cache(2, max_len=20)
            model(tokens[:, :11], cache)
            results[path] = torch.cat([model(tokens[:, i:i + 1], cache) for i in range(11, 17)], dim=1)
    naive = results.pop("naive")
    assert results, "variant should have a fast path"
    for path, out in results.items():
        assert rel_err(out, naive) < 1e-5, path


def test_absorbed_attention_function_equals_naive_directly():
    """MLA absorbed == naive at the attention-module level, on random latents (not via the model)."""
    from egmla.attention.context import AttnContext
    from egmla.attention.rope import rope_tables

    config = small_config(attention="mla")
    attn = Transformer(config).layers[0].attn
    batch, seq, kv_len = 2, 3, 13
    positions = torch.tensor([[10, 11, 12], [4, 5, 6]])
    cos, sin = rope_tables(config.qk_rope_head_dim, 64, config.rope_theta)
    ctx = AttnContext(torch.zeros(batch, seq, dtype=torch.long), positions, cos[positions], sin[positions],
                      kv_len=kv_len)
    q_nope = torch.randn(batch, seq, config.n_heads, config.qk_nope_head_dim)
    q_pe = torch.randn(batch, seq, config.n_heads, config.qk_rope_head_dim)
    latent = torch.randn(batch, kv_len, config.kv_lora_rank)
    k_pe = torch.randn(batch, kv_len, config.qk_rope_head_dim)
    naive = attn.attend_naive(q_nope, q_pe, latent, k_pe, None, ctx)
    absorbed = attn.attend_absorbed(q_nope, q_pe, latent, k_pe, None, ctx)
    assert rel_err(absorbed, naive) < 1e-5


def test_decode_in_bf16_stays_close_to_fp32():
    config = small_config(attention="eg-mla")
    model = Transformer(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(tokens)
        model_bf16 = Transformer(config).eval()
        model_bf16.load_state_dict(model.state_dict())
        model_bf16 = model_bf16.to(torch.bfloat16)
        model_bf16.set_decode_path("gate-table")
        cache = model_bf16.new_cache(2, max_len=16)
        model_bf16(tokens[:, :6], cache)
        steps = torch.cat([model_bf16(tokens[:, i:i + 1], cache) for i in range(6, 12)], dim=1)
    assert not torch.isnan(steps).any()
    assert rel_err(steps.float(), ref[:, 6:]) < 3e-2  # bf16 weights and activations end to end



@pytest.mark.parametrize("variant,path", [("mla", "absorbed"), ("mla-qlora", "absorbed"), ("eg-mla-latent", "absorbed"),
                                          ("eg-mla", "gate-table"), ("eg-mla-rmsnorm", "gate-table"),
                                          ("eg-mla-bias", "absorbed"), ("eg-mla-bias", "gate-table")])
def test_precomputed_weights_follow_weight_changes(variant, path):
    """What a decode path precomputes from the weights ('absorbed' folds W_UK / W_UV into the projections, EG-MLA's
    table paths build G_l = E_l W_UE^T, the bias control folds its norm and W_UE): after an in-place change of the
    weights (an optimizer step, load_state_dict) the next cached step must build them again and equal the full
    forward of the changed model."""
    config = small_config(**VARIANTS[variant], kv_lora_rank=6)  # d_c <= d_n, d_v: MLA's 'absorbed' folds
    model = Transformer(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    model.set_decode_path(path)
    attn = model.layers[0].attn
    before = (attn.folded, getattr(attn, "gate_table", None))
    assert any(t is not None for t in before) or path == "absorbed"
    for change in range(2):
        if change:
            with torch.no_grad():
                for layer in model.layers:  # in place, as an optimizer step does
                    (layer.attn.wq_b if hasattr(layer.attn, "wq_b") else layer.attn.wq).weight.add_(0.05)
                    layer.attn.wo.weight.mul_(-1.5)
                    layer.attn.wkv_b.weight.mul_(1.25)
                    if hasattr(layer.attn, "gate_embed"):
                        layer.attn.gate_embed.weight.mul_(-0.5)
                        layer.attn.wue.weight.add_(0.1)
        with torch.no_grad():
            cache = model.new_cache(2, max_len=12)
            model(tokens[:, :8], cache)
            step = model(tokens[:, 8:9], cache)
            full = model(tokens)[:, 8:9]
        assert rel_err(step, full) < 1e-4, change
    after = (attn.folded, getattr(attn, "gate_table", None))
    assert all(a is not b for a, b in zip(before, after) if b is not None)  # built again


def same_model(model, config, dtype=None):
    """A fresh model of `config` holding `model`'s weights (what a restart would load)."""
    fresh = Transformer(config).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh.to(dtype) if dtype is not None else fresh


@pytest.mark.parametrize("variant,path", [("eg-mla", "gate-table"), ("eg-mla-bias", "absorbed")])
def test_training_after_a_table_path_was_set_reaches_the_gate_weights(variant, path):
    """A table path builds G_l = E_l W_UE^T without autograd (HF loading, an engine, lm-eval set one): a training
    forward must still compute the gates from E_l and W_UE, so both get gradients, and an evaluation forward
    after the optimizer step must read the new gates, not the table of before."""
    config = small_config(**VARIANTS[variant])
    model = Transformer(config)
    model.set_decode_path(path)
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    model(tokens).float().pow(2).mean().backward()
    attn = model.layers[0].attn
    assert attn.gate_embed.weight.grad is not None and attn.gate_embed.weight.grad.abs().sum() > 0
    assert attn.wue.weight.grad is not None and attn.wue.weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    with torch.no_grad():
        assert rel_err(model.eval()(tokens), same_model(model, config)(tokens)) < 1e-5


@pytest.mark.parametrize("variant,path", [("mla", "absorbed"), ("eg-mla", "gate-table"), ("eg-mla-bias", "absorbed"),
                                          ("mha", "naive")])
def test_fused_and_row_sparse_optimizer_steps_are_seen_by_the_decode_paths(variant, path):
    """AdamW's fused kernel (the trainer's on CUDA) writes the weights without bumping their versions; the trainer's
    optimizer marks its steps (egmla.train.optim.mark_steps_in_place), so what a decode path precomputed is built
    again and a cached step after training equals the changed model's full forward."""
    from egmla.train.optim import RowSparseAdamW, gate_tables, mark_steps_in_place, param_groups

    config = small_config(**VARIANTS[variant], kv_lora_rank=6)  # d_c <= d_n, d_v: MLA's 'absorbed' folds
    model = Transformer(config)
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    model.eval().set_decode_path(path)
    with torch.no_grad():
        model(tokens[:, :8], model.new_cache(2, max_len=12))  # precompute, as an engine would
    params = [p for p in model.parameters()]
    optimizers = [torch.optim.AdamW(params, lr=0.05, fused=True)]
    if gate_tables(model):  # the Triton row-sparse step (the CUDA default for train.gate_table_update="row-sparse")
        optimizers.append(RowSparseAdamW(param_groups(model, 0.0), row_sparse=gate_tables(model), kernel=True, lr=0.05))
    for optimizer in optimizers:
        mark_steps_in_place(optimizer, params)  # as build_optimizer does
        model.train()(tokens).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            cache = model.eval().new_cache(2, max_len=12)
            model(tokens[:, :8], cache)
            step = model(tokens[:, 8:9], cache)
            assert rel_err(step, same_model(model, config)(tokens)[:, 8:9]) < 1e-4


@pytest.mark.parametrize("variant,path", [("eg-mla", "gate-table"), ("eg-mla-bias", "absorbed"), ("mla", "absorbed")])
def test_a_model_cast_or_moved_rebuilds_what_its_path_precomputed(variant, path):
    """`.to(dtype)` / `.to(device)` after a path was set: the precomputed tensors follow the weights (a gate table
    left in the old dtype mixed dtypes in the forward; on the old device it held memory there)."""
    config = small_config(**VARIANTS[variant], kv_lora_rank=6)
    model = Transformer(config).eval()
    model.set_decode_path(path)
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    model.to(torch.float64)
    attn = model.layers[0].attn
    held = [t for t in (getattr(attn, "gate_table", None), *(attn.folded or ())) if t is not None]
    assert held and all(t.dtype == torch.float64 for t in held)
    with torch.no_grad():
        cache = model.new_cache(2, max_len=12)
        model(tokens[:, :8], cache)
        step = model(tokens[:, 8:9], cache)
        full = same_model(model, config, torch.float64)(tokens)[:, 8:9]
    assert step.dtype == torch.float64 and rel_err(step, full) < 1e-6  # (the foldings are made in fp32)
    model.to("meta")
    held = [t for t in (getattr(attn, "gate_table", None), *(attn.folded or ())) if t is not None]
    assert held and all(t.device.type == "meta" for t in held)
