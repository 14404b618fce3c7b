"""The bias control's absorbed decode (`bias_absorbed_attention`, decode path 'absorbed' of gate_op='bias'):
the equations against a direct rebuild in fp64, the model's path against naive with heavily repeated ids and
with the cache holding another path's positions."""
import pytest
import torch

from egmla.attention.egmla_equations import bias_absorbed_attention
from egmla.model import Transformer
from tests.attention.fp64_case import attend, grouped_arguments, norm_with_stats, random_case
from tests.conftest import small_config


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "none"])
@pytest.mark.parametrize("n_ids", [2, 50])  # heavy repetition / mostly distinct
def test_equations_match_rebuild_in_fp64(norm, n_ids):
    torch.manual_seed(n_ids)
    case = random_case(n_ids, norm)
    f, stats = norm_with_stats(case["latent"] @ case["wkv_b"].T, norm, case["gamma"], case["beta"])
    expected = attend(case, f + case["table"][case["ids"]])  # the control: f_t = Norm(kv_t) + g_t
    out = bias_absorbed_attention(*grouped_arguments(case, stats))
    assert (out - expected).abs().max().item() < 1e-10


@pytest.mark.parametrize("gate_op", ["bias", "bias-v"])
def test_model_path_equals_naive_on_repeated_ids_and_refuses_a_cache_without_statistics(gate_op):
    config = small_config(attention="eg-mla", gate_op=gate_op)
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


@pytest.mark.parametrize("gate_op", ["bias", "bias-v"])
def test_the_engine_sees_the_folded_decode_weights_rebuilt(gate_op):
    """A kept CUDA graph reads the table controls' folded decode weights by address: after an in-place weight change
    the engine's list of precomputed tensors must hold the rebuilt ones, so that it drops the stale graphs."""
    from egmla.infer.engine import precomputed_tensors

    model = Transformer(small_config(attention="eg-mla", gate_op=gate_op)).eval()
    model.set_decode_path("absorbed")
    before = precomputed_tensors(model, cuda_graphs=False)
    assert any(t is model.layers[0].attn.absorbed_weights().query for t in before)
    assert all(a is b for a, b in zip(before, precomputed_tensors(model, cuda_graphs=False)))  # nothing changed: kept
    with torch.no_grad():
        model.layers[1].attn.wkv_b.weight.mul_(1.5)  # as an optimizer step does
    after = precomputed_tensors(model, cuda_graphs=False)
    assert len(after) == len(before) and any(a is not b for a, b in zip(before, after))
    assert any(t is model.layers[1].attn.absorbed_weights().output for t in after)
