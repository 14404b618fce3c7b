"""The kernels' PyTorch references (egmla/kernels/*_ref.py) against the plain math of docs/design.md §1 and
/work/shared/DESIGN.md, written out here the slow obvious way in fp64 (per head, LayerNorm and softmax by hand):
a reference that drifted from the equations would pass every kernel test, since those compare kernel and reference
only. Random fp64 inputs of tests/attention/fp64_case.py, one query per sequence, ragged lengths."""
import pytest
import torch

from tests.attention.fp64_case import D_C, D_N, D_R, D_V, HEADS, SCALE, distinct_and_slots, random_case

LENGTHS = torch.tensor([37, 1, 20])
EPS = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def plain_norm(x: torch.Tensor, norm: str, gamma, beta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Norm(x) over the whole n_h (d_n + d_v) vector, mean, rstd) by the definitions: LayerNorm (x - mean) / sqrt(var +
    eps) gamma + beta with the biased variance; RMSNorm x / sqrt(mean(x^2) + eps) gamma; none: x."""
    width = x.shape[-1]
    if norm == "none":
        return x, torch.zeros_like(x[..., 0]), torch.ones_like(x[..., 0])
    mean = x.sum(-1) / width if norm == "layernorm" else torch.zeros_like(x[..., 0])
    spread = ((x - mean[..., None]) ** 2).sum(-1) / width
    rstd = 1 / torch.sqrt(spread + EPS)
    f = (x - mean[..., None]) * rstd[..., None] * gamma
    return (f + beta if beta is not None else f), mean, rstd


def plain_attention(q_c, q_r, k_c, k_r, v, lengths) -> torch.Tensor:
    """o [b, h, d_v]: per sequence and head, softmax over t < length of SCALE (q^C . k^C_t + q^R . k^R_t), then the
    weighted sum of v_t (0 for a sequence with no position). k_c [b, T, h, d_n], k_r [b, T, d_r], v [b, T, h, d_v]."""
    batch, heads = q_c.shape[:2]
    out = torch.zeros(batch, heads, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        n = int(lengths[b])
        for h in range(heads):
            if n == 0:
                continue
            scores = SCALE * (k_c[b, :n, h] @ q_c[b, h] + k_r[b, :n] @ q_r[b, h])
            weights = torch.exp(scores - scores.max())
            out[b, h] = (weights[:, None] * v[b, :n, h]).sum(0) / weights.sum()
    return out


def gated_case(n_ids: int, norm: str, gate_op: str, bias_control: bool = False) -> tuple[dict, torch.Tensor]:
    """The fp64 case and the plain EG-MLA decode output: x_t = (W_UKV c_t) ⊙ g_t (or + g_t), f_t = Norm(x_t) split
    per head into [k^C ; v] (the bias control: f_t = Norm(W_UKV c_t) + g_t), attention of the first query."""
    case = random_case(n_ids, norm, batch=len(LENGTHS))
    case["table"] = case["table"] * 0.5 + 1.0  # gates around 1, as a trained table
    kv = case["latent"] @ case["wkv_b"].T
    gates = case["table"][case["ids"]]
    x = kv if bias_control else (kv * gates if gate_op == "mul" else kv + gates)
    f, mean, rstd = plain_norm(x, norm, case["gamma"], case["beta"])
    if bias_control:
        f = f + gates
    k_c, v = f.unflatten(-1, (HEADS, D_N + D_V)).split([D_N, D_V], -1)
    case.update(stats=torch.stack([mean, rstd], -1), q_c=case["q"][:, 0], q_r=case["q_pe"][:, 0])
    return case, plain_attention(case["q_c"], case["q_r"], k_c, case["k_pe"], v, LENGTHS)


@pytest.mark.parametrize("gate_op,norm", [("mul", "layernorm"), ("add", "layernorm"), ("mul", "rmsnorm"),
                                          ("mul", "none")])
def test_egmla_reference_and_its_statistics_are_the_design_equations(gate_op, norm):
    from egmla.kernels.egmla_decode_ref import egmla_decode_ref, layernorm_stats

    case, expected = gated_case(7, norm, gate_op)
    out = egmla_decode_ref(case["q_c"], case["q_r"], case["latent"], case["k_pe"], case["ids"], LENGTHS,
                           case["table"], case["wkv_b"], case["gamma"], case["beta"], SCALE, EPS, gate_op, norm)
    assert rel_err(out, expected) < 1e-5  # (the reference computes in fp32)
    stats = layernorm_stats(case["latent"], case["table"][case["ids"]], case["wkv_b"], EPS, gate_op, norm)
    assert rel_err(stats, case["stats"]) < 1e-5


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("n_ids", [2, 50])  # heavy repetition / mostly distinct
def test_grouped_reference_is_the_design_equations(norm, n_ids):
    from egmla.kernels.grouped_decode_ref import grouped_decode_ref

    case, expected = gated_case(n_ids, norm, "mul")
    distinct, slots = distinct_and_slots(case["ids"])
    out = grouped_decode_ref(case["q_c"], case["q_r"], case["latent"], case["k_pe"], case["stats"], slots, distinct,
                             LENGTHS, case["table"], case["wkv_b"], case["gamma"], case["beta"], SCALE)
    assert rel_err(out, expected) < 1e-5


def test_mla_reference_with_the_absorbed_weights_is_mla():
    """MLA: k^C_t = W_UK,h c_t and v_t = W_UV,h c_t per head; the reference attends over the latents with
    q_latent = W_UK,h^T q^C and the caller applies W_UV,h to its output (docs/design.md §1, absorbed decode)."""
    from egmla.kernels.mla_decode_ref import mla_decode_ref

    case = random_case(3, "none", batch=len(LENGTHS))
    w = case["wkv_b"].view(HEADS, D_N + D_V, D_C)
    w_uk, w_uv = w[:, :D_N], w[:, D_N:]
    k_c = torch.einsum("hdc,btc->bthd", w_uk, case["latent"])
    v = torch.einsum("hdc,btc->bthd", w_uv, case["latent"])
    q_c, q_r = case["q"][:, 0], case["q_pe"][:, 0]
    expected = plain_attention(q_c, q_r, k_c, case["k_pe"], v, LENGTHS)
    o_latent = mla_decode_ref(torch.einsum("hdc,bhd->bhc", w_uk, q_c), q_r, case["latent"], case["k_pe"], LENGTHS,
                              SCALE)
    assert rel_err(torch.einsum("hdc,bhc->bhd", w_uv, o_latent.double()), expected) < 1e-5


def test_gqa_reference_is_attention_per_kv_group():
    """Query head h reads KV head h // (heads / kv_heads); a sequence with no position gets 0."""
    from egmla.kernels.gqa_decode_ref import gqa_decode_ref

    lengths = torch.tensor([37, 1, 0])
    q = torch.randn(3, 6, 8, dtype=torch.float64)
    k, v = torch.randn(2, 3, 37, 2, 8, dtype=torch.float64).unbind(0)
    group_of = torch.arange(6) // 3
    scale = SCALE
    expected = torch.zeros(3, 6, 8, dtype=torch.float64)
    for b in range(3):
        n = int(lengths[b])
        for h in range(6):
            if n:
                weights = torch.softmax(scale * k[b, :n, group_of[h]] @ q[b, h], 0)
                expected[b, h] = weights @ v[b, :n, group_of[h]]
    out = gqa_decode_ref(q, k, v, lengths, scale)
    assert not out.isnan().any() and rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "none"])
def test_bias_reference_finished_by_its_caller_is_the_control(norm):
    """The bias control f_t = Norm(W_UKV c_t) + g_{i_t}: the reference's (out_latent, mean, mass), from the
    inputs its docstring defines (qa_h = W^K_h^T (gamma^K_h ⊙ q^C_h), alpha_h = gamma^K_h . q^C_h, b0_h =
    beta^K_h . q^C_h, e_{h,u} = q^C_h . g^K_{h,u}) and finished as it says (o_h = gamma^V_h ⊙ (W^V_h out_latent_h -
    mean_h) + beta^V_h + sum_u mass_{h,u} g^V_{h,u}), give the plain attention over the rebuilt K/V."""
    from egmla.kernels.bias_decode_ref import bias_decode_ref

    case, expected = gated_case(7, norm, "mul", bias_control=True)
    distinct, slots = distinct_and_slots(case["ids"])
    width = HEADS * (D_N + D_V)
    gamma = case["gamma"] if case["gamma"] is not None else torch.ones(width, dtype=torch.float64)
    beta = case["beta"] if case["beta"] is not None else torch.zeros(width, dtype=torch.float64)
    w = case["wkv_b"].view(HEADS, D_N + D_V, D_C)
    gamma_k, gamma_v = gamma.view(HEADS, -1).split([D_N, D_V], -1)
    beta_k, beta_v = beta.view(HEADS, -1).split([D_N, D_V], -1)
    gate_k, gate_v = case["table"][distinct].unflatten(-1, (HEADS, D_N + D_V)).split([D_N, D_V], -1)  # [b, U, h, .]
    q_c = case["q_c"]
    q_absorbed = torch.einsum("hdc,bhd->bhc", w[:, :D_N], gamma_k * q_c)
    q_terms = torch.stack([(gamma_k * q_c).sum(-1), (beta_k * q_c).sum(-1)], -1)
    per_id = torch.einsum("bhd,buhd->bhu", q_c, gate_k)
    out_latent, mean, mass = bias_decode_ref(q_absorbed, case["q_r"], q_terms, case["latent"], case["k_pe"],
                                             case["stats"], slots, per_id, LENGTHS, SCALE)
    assert rel_err(mass.sum(-1), torch.ones(3, HEADS, dtype=torch.float64)) < 1e-6
    out = (gamma_v * (torch.einsum("hdc,bhc->bhd", w[:, D_N:], out_latent.double()) - mean.double()[..., None])
           + beta_v + torch.einsum("bhu,buhd->bhd", mass.double(), gate_v))
    assert rel_err(out, expected) < 1e-5


def test_row_adam_reference_is_torch_adam_on_the_touched_rows():
    """Every row touched: the lazy reference takes torch.optim.Adam's steps (no weight decay); a row whose gradient
    is all zero keeps its weights and moments, where dense Adam would still move it by its momentum."""
    from egmla.kernels.row_adam_ref import row_adam_ref

    torch.manual_seed(0)
    table = torch.randn(6, 10, dtype=torch.float64)
    dense = table.clone().requires_grad_()
    adam = torch.optim.Adam([dense], lr=0.03, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    exp_avg, exp_avg_sq = torch.zeros_like(table), torch.zeros_like(table)
    for step in range(1, 4):
        grad = torch.randn(6, 10, dtype=torch.float64)
        dense.grad = grad.clone()
        adam.step()
        assert row_adam_ref(table, grad, exp_avg, exp_avg_sq, 0.03, 0.9, 0.95, 1e-8, step) == 6
    assert rel_err(table, dense.detach()) < 1e-12
    assert rel_err(exp_avg_sq, adam.state[dense]["exp_avg_sq"]) < 1e-12
    before = [t.clone() for t in (table, exp_avg, exp_avg_sq)]
    grad = torch.randn(6, 10, dtype=torch.float64)
    grad[2] = 0
    row_adam_ref(table, grad, exp_avg, exp_avg_sq, 0.03, 0.9, 0.95, 1e-8, 4)
    for now, then in zip((table, exp_avg, exp_avg_sq), before):
        assert torch.equal(now[2], then[2]) and not torch.equal(now[3], then[3])
