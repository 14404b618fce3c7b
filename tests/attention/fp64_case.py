"""The random fp64 decode case that the grouped and bias-control equations are checked on: inputs, a direct
rebuild (norm with its statistics, softmax attention) and the token groups written out by hand."""
import torch
import torch.nn.functional as F

HEADS, D_N, D_V, D_C, D_R, SCALE = 3, 5, 4, 6, 4, 0.3


def random_case(n_ids: int, norm: str, batch: int = 2, seq: int = 3, length: int = 37) -> dict:
    """q [b, s, h, d_n], q_pe, latent [b, T, d_c], k_pe, ids [b, T] < n_ids, a gate table, wkv_b, the norm's affine
    (None where the norm has none) and a mask [b, s, T] that always shows position 0."""
    dt, width = torch.float64, HEADS * (D_N + D_V)
    mask = torch.rand(batch, seq, length) < 0.7
    mask[..., 0] = True
    return dict(q=torch.randn(batch, seq, HEADS, D_N, dtype=dt), q_pe=torch.randn(batch, seq, HEADS, D_R, dtype=dt),
                latent=torch.randn(batch, length, D_C, dtype=dt), k_pe=torch.randn(batch, length, D_R, dtype=dt),
                ids=torch.randint(0, n_ids, (batch, length)), table=torch.randn(n_ids, width, dtype=dt),
                wkv_b=torch.randn(width, D_C, dtype=dt),
                gamma=torch.randn(width, dtype=dt) if norm != "none" else None,
                beta=torch.randn(width, dtype=dt) if norm == "layernorm" else None, mask=mask)


def norm_with_stats(x: torch.Tensor, norm: str, gamma, beta) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm(x) and the (mu, rho) per position a cache would store for it."""
    zeros = torch.zeros_like(x[..., 0])
    if norm == "layernorm":
        return (F.layer_norm(x, x.shape[-1:], gamma, beta, 1e-6),
                torch.stack([x.mean(-1), (x.var(-1, unbiased=False) + 1e-6).rsqrt()], -1))
    if norm == "rmsnorm":
        return F.rms_norm(x, x.shape[-1:], gamma, 1e-6), torch.stack([zeros, (x.square().mean(-1) + 1e-6).rsqrt()], -1)
    return x, torch.stack([zeros, torch.ones_like(zeros)], -1)


def attend(case: dict, f: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the case's queries over rebuilt f [b, T, h*(d_n+d_v)] (per head [k; v])."""
    k, v = f.unflatten(-1, (HEADS, -1)).split([D_N, D_V], -1)
    scores = (torch.einsum("bshd,bthd->bsht", case["q"], k)
              + torch.einsum("bshr,btr->bsht", case["q_pe"], case["k_pe"])) * SCALE
    return torch.einsum("bsht,bthd->bshd", scores.masked_fill(~case["mask"][:, :, None], float("-inf")).softmax(-1), v)


def distinct_and_slots(ids):
    """A [batch, T] id tensor's distinct ids per row in order of first appearance ([batch, U], zero-padded) and
    each position's slot among them ([batch, T]): the token groups, written out the slow obvious way."""
    uniq = [list(dict.fromkeys(row.tolist())) for row in ids]
    width = max(len(u) for u in uniq)
    distinct = torch.tensor([u + [0] * (width - len(u)) for u in uniq])
    slots = torch.tensor([[u.index(i) for i in row.tolist()] for u, row in zip(uniq, ids)])
    return distinct, slots


def grouped_arguments(case: dict, stats: torch.Tensor) -> tuple:
    """The arguments of grouped_attention / bias_absorbed_attention for the case: the token groups by hand."""
    distinct, slots = distinct_and_slots(case["ids"])  # distinct ids in order of first appearance
    w = case["wkv_b"].view(HEADS, D_N + D_V, D_C)
    return (case["q"], case["q_pe"], case["latent"], case["k_pe"], stats, slots, case["table"][distinct],
            case["mask"], w[:, :D_N], w[:, D_N:], case["gamma"], case["beta"], SCALE)
