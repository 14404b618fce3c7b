"""The bias control's absorbed decode (`bias_absorbed_attention`, decode path 'absorbed' of gate_op='bias'):
the equations against a direct rebuild in fp64, the model's path against naive with heavily repeated ids and
with the cache holding another path's positions."""
import pytest
import torch
import torch.nn.functional as F

from egmla.attention.egmla import bias_absorbed_attention
from egmla.model import Transformer
from tests.conftest import distinct_and_slots, small_config


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "none"])
@pytest.mark.parametrize("n_ids", [2, 50])  # heavy repetition / mostly distinct
def test_equations_match_rebuild_in_fp64(norm, n_ids):
    torch.manual_seed(n_ids)
    dt, batch, seq, heads, d_n, d_v, d_c, d_r, length = torch.float64, 2, 3, 3, 5, 4, 6, 4, 37
    q, q_pe = torch.randn(batch, seq, heads, d_n, dtype=dt), torch.randn(batch, seq, heads, d_r, dtype=dt)
    latent, k_pe = torch.randn(batch, length, d_c, dtype=dt), torch.randn(batch, length, d_r, dtype=dt)
    ids = torch.randint(0, n_ids, (batch, length))
    table = torch.randn(n_ids, heads * (d_n + d_v), dtype=dt)
    wkv_b = torch.randn(heads * (d_n + d_v), d_c, dtype=dt)
    gamma = torch.randn(heads * (d_n + d_v), dtype=dt) if norm != "none" else None
    beta = torch.randn(heads * (d_n + d_v), dtype=dt) if norm == "layernorm" else None
    mask = torch.rand(batch, seq, length) < 0.7
    mask[..., 0] = True
    x = latent @ wkv_b.T  # the control: f_t = Norm(kv_t) + g_t
    if norm == "layernorm":
        f = F.layer_norm(x, x.shape[-1:], gamma, beta, 1e-6)
        stats = torch.stack([x.mean(-1), (x.var(-1, unbiased=False) + 1e-6).rsqrt()], -1)
    elif norm == "rmsnorm":
        f = F.rms_norm(x, x.shape[-1:], gamma, 1e-6)
        stats = torch.stack([torch.zeros_like(x[..., 0]), (x.square().mean(-1) + 1e-6).rsqrt()], -1)
    else:
        f, stats = x, torch.stack([torch.zeros_like(x[..., 0]), torch.ones_like(x[..., 0])], -1)
    k, v = (f + table[ids]).unflatten(-1, (heads, -1)).split([d_n, d_v], -1)
    scores = (torch.einsum("bshd,bthd->bsht", q, k) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * 0.3
    expected = torch.einsum("bsht,bthd->bshd", scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1), v)
    distinct, slots = distinct_and_slots(ids)  # distinct ids in order of first appearance
    w = wkv_b.view(heads, d_n + d_v, d_c)
    out = bias_absorbed_attention(q, q_pe, latent, k_pe, stats, slots, table[distinct], mask, w[:, :d_n], w[:, d_n:],
                                  gamma, beta, 0.3)
    assert (out - expected).abs().max().item() < 1e-10


def test_model_path_equals_naive_on_repeated_ids_and_refuses_a_cache_without_statistics():
    config = small_config(attention="eg-mla", gate_op="bias")
    torch.manual_seed(4)
    model = Transformer(config).eval()
    tokens = torch.randint(0, 5, (3, 20))  # 5 of 61 ids: every sequence repeats them
    logits = {}
    with torch.no_grad():
        for path in ("naive", "absorbed"):
            model.set_decode_path(path)
            cache = model.new_cache(3, max_len=24)
            model(tokens[:, :6], cache, n_new=torch.tensor([6, 3, 1]))  # ragged prefill
            steps = [model(tokens[torch.arange(3), cache.lengths][:, None], cache) for _ in range(10)]
            logits[path] = torch.cat(steps, dim=1)
        assert cache.token_groups is not None and cache.layers[0].buffers.get("ln_stats") is not None
        err = ((logits["absorbed"] - logits["naive"]).norm() / logits["naive"].norm()).item()
        assert err < 1e-5 and logits["absorbed"].isfinite().all()

        model.set_decode_path("naive")  # a cache filled under 'naive' has no statistics for 'absorbed'
        cache = model.new_cache(1, max_len=8)
        model.set_decode_path("absorbed")
        with pytest.raises(ValueError, match="decode_path='absorbed' needs a cache with LayerNorm statistics"):
            model(tokens[:1, :1], cache)


def test_capturable_steps_read_up_to_the_host_bound_and_give_the_same_logits():
    """A capturable step (CUDA-graph shapes, no host sync) reads the distinct ids up to the engine's bound."""
    config = small_config(attention="eg-mla", gate_op="bias")
    torch.manual_seed(4)
    model = Transformer(config).eval()
    model.set_decode_path("absorbed")
    tokens = torch.randint(0, 5, (3, 20))
    out = {}
    with torch.no_grad():
        for capturable in (False, True):
            cache = model.new_cache(3, max_len=24)
            model(tokens[:, :6], cache)
            cache.token_groups.host.plan_distinct = 8  # as GenerationEngine sizes its graphs
            out[capturable] = torch.cat([model(tokens[:, 6 + i:7 + i], cache, capturable=capturable)
                                         for i in range(8)], dim=1)
    assert ((out[True] - out[False]).norm() / out[False].norm()).item() < 1e-5
