"""EG-MLA really gates by token id, and the ablation switches change exactly what they say."""
import torch
import torch.nn.functional as F

from egmla.model import Transformer
from tests.conftest import small_config


def _attn(**kw):
    return Transformer(small_config(attention="eg-mla", **kw)).layers[0].attn


def test_same_latent_different_ids_give_different_kv():
    attn = _attn()
    latent = torch.randn(1, 5, attn.kv_lora_rank).expand(2, -1, -1)
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 30, 4, 5]])
    k, v = attn.expand_kv(latent, ids)
    same = [0, 1, 3, 4]
    assert torch.allclose(k[0, same], k[1, same]) and torch.allclose(v[0, same], v[1, same])
    assert (k[0, 2] - k[1, 2]).abs().max() > 1e-3 and (v[0, 2] - v[1, 2]).abs().max() > 1e-3


def test_mul_layernorm_matches_the_equation():
    attn = _attn()
    latent, ids = torch.randn(2, 6, attn.kv_lora_rank), torch.randint(0, 61, (2, 6))
    kv = latent @ attn.wkv_b.weight.T
    gate = attn.gate_embed.weight[ids] @ attn.wue.weight.T  # g = W_UE E[id]
    f = F.layer_norm(kv * gate, (kv.shape[-1],), attn.gate_norm.weight, attn.gate_norm.bias, attn.gate_norm.eps)
    f = f.view(2, 6, attn.n_heads, -1)
    k, v = attn.expand_kv(latent, ids)
    assert torch.allclose(k, f[..., :attn.qk_nope_head_dim], atol=1e-6)
    assert torch.allclose(v, f[..., attn.qk_nope_head_dim:], atol=1e-6)


def test_gate_op_add_and_norm_none_change_exactly_that():
    add, none = _attn(gate_op="add"), _attn(gate_norm="none")
    latent, ids = torch.randn(1, 4, add.kv_lora_rank), torch.randint(0, 61, (1, 4))
    for attn, expected in ((add, lambda kv, g: attn_norm(add, kv + g)), (none, lambda kv, g: kv * g)):
        kv = latent @ attn.wkv_b.weight.T
        gate = attn.gate(ids)
        k, v = attn.expand_kv(latent, ids)
        got = torch.cat([k, v], dim=-1).flatten(2)
        assert torch.allclose(got, expected(kv, gate), atol=1e-6)
    assert isinstance(none.gate_norm, torch.nn.Identity)


def attn_norm(attn, x):
    return attn.gate_norm(x)


def test_latent_placement_gates_the_cached_latent():
    attn = _attn(gate_placement="latent")
    assert attn.wue.out_features == attn.kv_lora_rank  # g in R^{d_c}
    from egmla.attention.context import AttnContext
    from egmla.attention.rope import rope_tables

    cos, sin = rope_tables(attn.qk_rope_head_dim, 8, 10000.0)
    x = torch.randn(1, 1, 48).expand(2, 3, 48).contiguous()
    ids = torch.tensor([[3, 3, 3], [3, 9, 3]])
    pos = torch.arange(3).expand(2, 3)
    f, _ = attn.latent(x, AttnContext(ids, pos, cos[pos], sin[pos]))
    assert torch.allclose(f[0, 0], f[1, 0]) and not torch.allclose(f[0, 1], f[1, 1])


def test_gate_table_equals_computed_gates():
    attn = _attn()
    table = attn.build_gate_table()
    ids = torch.randint(0, 61, (3, 7))
    assert table.shape == (61, attn.wue.out_features)
    assert torch.allclose(attn.gate(ids, use_table=True), attn.gate(ids), atol=1e-6)


def test_bias_control_adds_the_table_after_the_norm_and_gates_nothing():
    attn = _attn(gate_op="bias")
    latent, ids = torch.randn(2, 5, attn.kv_lora_rank), torch.randint(0, 61, (2, 5))
    kv = latent @ attn.wkv_b.weight.T
    k, v = attn.expand_kv(latent, ids)
    assert torch.allclose(torch.cat([k, v], dim=-1).flatten(2), attn.gate_norm(kv) + attn.gate(ids), atol=1e-6)
    # the table still tells tokens apart, but only as a shift: K/V minus the token's vector no longer depend on it
    other = torch.where(ids == 7, 8, 7)
    k2, v2 = attn.expand_kv(latent, other)
    assert (v - v2).abs().max() > 1e-3
    assert torch.allclose(torch.cat([k, v], -1).flatten(2) - attn.gate(ids),
                          torch.cat([k2, v2], -1).flatten(2) - attn.gate(other), atol=1e-6)


def test_v_only_control_adds_the_table_to_v_alone():
    """gate_op='bias-v': Norm(kv) with W_UE e added to each head's V part; K is MLA's normed K, the same for any
    token id; W_UE is n_h d_v wide and the norm still covers all of kv."""
    attn = _attn(gate_op="bias-v")
    assert attn.wue.out_features == attn.n_heads * attn.v_head_dim
    assert attn.gate_norm.weight.shape[0] == attn.n_heads * (attn.qk_nope_head_dim + attn.v_head_dim)
    latent, ids = torch.randn(2, 5, attn.kv_lora_rank), torch.randint(0, 61, (2, 5))
    other = torch.where(ids == 7, 8, 7)
    k, v = attn.expand_kv(latent, ids)
    k2, v2 = attn.expand_kv(latent, other)
    assert torch.equal(k, k2) and (v - v2).abs().max() > 1e-3
    normed = attn.gate_norm(latent @ attn.wkv_b.weight.T).unflatten(-1, (attn.n_heads, -1))
    table_v = (attn.gate_embed.weight[ids] @ attn.wue.weight.T).unflatten(-1, (attn.n_heads, attn.v_head_dim))
    assert torch.allclose(v, normed[..., attn.qk_nope_head_dim:] + table_v, atol=1e-5)
    assert torch.allclose(k, normed[..., :attn.qk_nope_head_dim], atol=1e-6)


def test_identity_gate_starts_at_one_and_stays_one_plus_w_ue_e():
    model = Transformer(small_config(attention="eg-mla", gate_init="identity"))
    attn = model.layers[0].attn
    ids = torch.randint(0, 61, (2, 6))
    assert torch.equal(attn.wue.weight, torch.zeros_like(attn.wue.weight))
    assert torch.equal(attn.gate(ids), torch.ones(2, 6, attn.wue.out_features))
    with torch.no_grad():
        attn.wue.weight.normal_()
    expected = 1 + attn.gate_embed.weight[ids] @ attn.wue.weight.T
    assert torch.allclose(attn.gate(ids), expected, atol=1e-5)
    attn.build_gate_table()
    assert torch.allclose(attn.gate(ids, use_table=True), expected, atol=1e-5)  # what decode and kernels read
    # the paper's start is unchanged: W_UE ~ N(0, 1/d_e), so each gate entry starts ~N(0, 1)
    paper = Transformer(small_config(attention="eg-mla", gate_dim=256)).layers[0].attn
    assert abs(float(paper.gate(torch.arange(61)[None]).detach().std()) - 1.0) < 0.1


def test_controls_have_exactly_egmla_kv64s_parameters():
    from egmla.model import count_params
    from egmla.variants import variant_config

    full = count_params(variant_config("egmla-kv64", "paper-base"))
    for name in ("egmla-kv64-bias", "egmla-kv64-identity"):
        config = variant_config(name, "paper-base")
        assert count_params(config) == full == 316_202_496  # the committed record's count (docs/RESULTS.md)
        assert count_params(config, include_gate_tables=False) == count_params(
            variant_config("egmla-kv64", "paper-base"), include_gate_tables=False)
        small = Transformer(variant_config(name, "tiny", n_layers=1, vocab_size=300))
        assert small.num_params() == Transformer(variant_config("egmla-kv64", "tiny", n_layers=1,
                                                                vocab_size=300)).num_params()


def test_controls_decode_only_on_the_paths_that_compute_them():
    import pytest

    from egmla.attention import check_decode_path, decode_paths

    bias = small_config(attention="eg-mla", gate_op="bias")
    assert decode_paths(bias) == ("naive", "gate-table", "absorbed")  # the Triton kernels gate inside: mul or add
    assert decode_paths(small_config(attention="eg-mla", gate_op="bias-v")) == decode_paths(bias)
    for path in ("kernel", "grouped"):
        with pytest.raises(ValueError, match=f"decode_path='{path}' is not available for EG-MLA kv10 gate-bias"):
            check_decode_path(bias, path)
    # the identity start is still a multiplying gate: every path reads the same table, 1 + E W_UE^T
    identity = small_config(attention="eg-mla", gate_init="identity")
    assert decode_paths(identity) == ("naive", "gate-table", "kernel", "grouped")
    assert identity.variant_name() == "EG-MLA kv10 identity-init"
    with pytest.raises(ValueError, match="gate_init='identity': an identity start .* not gate_op='add'"):
        small_config(attention="eg-mla", gate_op="add", gate_init="identity")
    with pytest.raises(ValueError, match="gate_init='identity': gate options apply only to attention='eg-mla'"):
        small_config(attention="mla", gate_init="identity")


def test_identity_gate_decodes_exactly_once_w_ue_has_moved():
    """With W_UE away from 0, every decode path (the grouped one included) must carry the + 1 of the gate."""
    model = Transformer(small_config(attention="eg-mla", gate_init="identity")).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.wue.weight.normal_(std=0.3)
        tokens = torch.randint(0, 61, (2, 12))
        full = model(tokens)
        for path in ("naive", "gate-table", "grouped"):
            model.set_decode_path(path)
            cache = model.new_cache(2, max_len=16)
            steps = [model(tokens[:, :6], cache)] + [model(tokens[:, i:i + 1], cache) for i in range(6, 12)]
            got = torch.cat(steps, dim=1)
            assert ((got - full).norm() / full.norm()).item() < 1e-4, path


def test_default_cuda_path_is_each_variants_triton_path(monkeypatch):
    """On CUDA `auto` takes the Triton 'kernel' path, and the same-table control (which has none) its Triton
    'absorbed' decode; elsewhere the variant's first path. Checked without a GPU: only the device's type and the
    kernels' availability decide."""
    import egmla.kernels
    from egmla.attention import fastest_decode_path
    from egmla.config import preset
    from egmla.variants import variant_config

    monkeypatch.setattr(egmla.kernels, "kernel_unavailable_reason", lambda device: None)
    expected = {"mha": "kernel", "mla-kv64": "kernel", "egmla-kv64": "kernel", "egmla-kv64-latent": "kernel",
                "egmla-kv64-bias": "absorbed"}
    for name, path in expected.items():
        config = variant_config(name, preset("tiny"))
        assert fastest_decode_path(config, "cuda") == path, name
        assert fastest_decode_path(config, "cpu") == "naive", name
    monkeypatch.setattr(egmla.kernels, "kernel_unavailable_reason", lambda device: "no Triton")
    assert fastest_decode_path(variant_config("egmla-kv64-bias", preset("tiny")), "cuda") == "naive"


def test_default_cuda_path_of_egmla_is_grouped_from_a_step_of_16k_positions(monkeypatch):
    """EG-MLA's `auto` takes the grouped decode once batch x context reaches GROUPED_MIN_POSITIONS (where it ties
    the fused kernel on an H200), the fused kernel below or when the call's shape is not given; variants without
    a grouped decode keep their path at any size."""
    import egmla.kernels
    from egmla.attention import GROUPED_MIN_POSITIONS, fastest_decode_path
    from egmla.config import preset
    from egmla.variants import variant_config

    monkeypatch.setattr(egmla.kernels, "kernel_unavailable_reason", lambda device: None)
    egmla_kv64 = variant_config("egmla-kv64", preset("tiny"))
    assert GROUPED_MIN_POSITIONS == 16_384
    assert fastest_decode_path(egmla_kv64, "cuda", 32, 512) == "grouped"
    assert fastest_decode_path(egmla_kv64, "cuda", 2, 8192) == "grouped"
    assert fastest_decode_path(egmla_kv64, "cuda", 31, 512) == "kernel"
    assert fastest_decode_path(egmla_kv64, "cuda", 1, 16_383) == "kernel"
    assert fastest_decode_path(egmla_kv64, "cuda") == "kernel"
    assert fastest_decode_path(egmla_kv64, "cpu", 128, 4096) == "naive"
    for name, path in {"mla-kv64": "kernel", "egmla-kv64-latent": "kernel", "egmla-kv64-bias": "absorbed"}.items():
        assert fastest_decode_path(variant_config(name, preset("tiny")), "cuda", 128, 4096) == path, name


def test_v_only_controls_precomputed_table_is_planned_at_its_real_width():
    """`egmla plan --gate-table` counts G's rows as built (beside the embeddings E it is built from): the V-only
    control's gate vector keeps the [k; v] layout (zeros in K), so its table is as wide as the others' though W_UE
    is half as wide."""
    from egmla.infer.plan import gate_table_params

    config = small_config(attention="eg-mla", gate_op="bias-v")
    attn = Transformer(config).layers[0].attn
    built = attn.build_gate_table()
    embeddings = gate_table_params(config)
    assert embeddings == config.n_layers * attn.gate_embed.weight.numel()
    assert gate_table_params(config, precomputed=True) == embeddings + config.n_layers * built.numel()
    assert attn.wue.out_features == config.n_heads * config.v_head_dim < built.shape[1] == config.kv_up_dim
