"""What `egmla bench decode` times: one layer's decode attention for one new token per sequence over
a full cache of T positions (or ragged: sequence b holds lengths[b] <= T), per variant and path, with the
bytes and FLOPs each path must spend.

Every path except the MHA/GQA baselines calls the model's own code (the attention module's method for
the path), so the numbers are what a model layer spends, including any K/V rebuild. The baselines are
SDPA on contiguous [batch, heads, T, head_dim] K/V without a mask (the strongest SDPA case); with ragged
lengths, the padded batch and a boolean key mask, as transformers' stock models run a ragged batch.

Floors (docs/design.md §4): bytes = what the path must read from HBM at least (the cache; for EG-MLA also
token ids, norm statistics and one gate row per distinct id in the batch), FLOPs = the attention dots
plus any rebuild; floor = max(bytes / HBM bandwidth, FLOPs / matmul peak).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from egmla.bench.grouped import GROUPED_NOTES, norm_stats

# Cases beside the model's own decode paths (egmla.attention.decode_paths), each isolating a part of one.
PATH_NOTES = {
    "sdpa": "F.scaled_dot_product_attention on contiguous K/V, no mask (ragged: padded, key mask; MHA/GQA baseline)",
    "naive": "model path naive: rebuild K/V (and gates) for every position, then SDPA",
    "absorbed": "model path absorbed: einsums over the latent",
    "gate-table": "model path gate-table: gather gate rows, rebuild K/V, SDPA",
    "kernel": "model path kernel (MLA: W_UK/W_UV einsums + kernel; EG-MLA: kernel with cached norm stats)",
    "kernel-core": "mla_decode kernel alone (query absorbed beforehand)",
    "kernel+stats": "model path kernel recomputing every position's norm stats each step (no stats cache)",
    **GROUPED_NOTES,  # decode grouped by token id (egmla/bench/grouped.py)
}
MODEL_PATH = {"kernel-core": "kernel", "kernel+stats": "kernel", "grouped-plan": "grouped", "grouped-graph": "grouped",
              "grouped-plan-graph": "grouped"}  # case -> path


def bench_paths(config) -> tuple[str, ...]:
    """What `egmla bench decode` times for a config: SDPA for MHA/GQA; for the latent variants every decode
    path of the model, each followed by the case that isolates a part of it (PATH_NOTES)."""
    from egmla.attention import decode_paths

    if not config.is_latent:
        return ("sdpa",)
    extra = {"kernel": ("kernel+stats" if reads_gate_rows(config) else "kernel-core",),
             "grouped": ("grouped-plan", "grouped-graph", "grouped-plan-graph")}
    return tuple(case for path in decode_paths(config) for case in (path, *extra.get(path, ())))


def reads_gate_rows(config) -> bool:
    """EG-MLA with the gate on the up-projected K/V reads gate rows and norm statistics while decoding;
    with the gate on the latent, the cache holds the gated latent and decoding is MLA's."""
    return config.is_gated and config.gate_placement == "up"


@dataclass
class Case:
    variant: str
    path: str
    run: Callable[[], object]
    bytes: float
    flops: float
    extra: dict = field(default_factory=dict)


def build_cases(variant: str, config, batch: int, max_len: int, token_ids: torch.Tensor, device, dtype,
                paths: tuple[str, ...], lengths: torch.Tensor | None = None) -> list[Case]:
    """Cases of one variant (its label in the tables) at (batch, T = max_len); token_ids [batch, T] int32
    on device; paths from bench_paths(config); lengths [batch] (each <= T) for a ragged batch, else every
    sequence holds T positions. Bytes count the positions held, not the padding."""
    if not config.is_latent:
        return [_sdpa_case(variant, config, batch, max_len, device, dtype, lengths)]
    grouped = tuple(p for p in paths if p.startswith("grouped"))  # built by egmla/bench/grouped.py
    if grouped:
        from egmla.bench.grouped import grouped_cases

        others = build_cases(variant, config, batch, max_len, token_ids, device, dtype,
                             tuple(p for p in paths if p not in grouped), lengths)
        return others + grouped_cases(config, batch, max_len, token_ids, device, dtype, grouped, lengths=lengths)
    from egmla.attention.context import AttnContext

    heads, d_n, d_r, d_v, d_c = (config.n_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                                 config.v_head_dim, config.kv_lora_rank)
    torch.manual_seed(1)
    q_nope = torch.randn(batch, 1, heads, d_n, device=device, dtype=dtype)
    q_pe = torch.randn(batch, 1, heads, d_r, device=device, dtype=dtype)
    latent = torch.randn(batch, max_len, d_c, device=device, dtype=dtype)  # RMS-normed: about unit scale
    k_pe = torch.randn(batch, max_len, d_r, device=device, dtype=dtype)
    positions = last_positions(batch, max_len, lengths, device)
    ctx = AttnContext(token_ids.gather(1, positions), positions, torch.empty(0), torch.empty(0), kv_len=max_len,
                      kv_token_ids=token_ids)
    es = torch.finfo(dtype).bits // 8
    held = positions_held(batch, max_len, lengths)
    cache_bytes = held * (d_c + d_r) * es
    attention_flops = 2 * heads * held * (d_n + d_v + d_r)
    rebuild_flops = 2 * held * d_c * heads * (d_n + d_v)
    cases = []
    for path in paths:
        attn = one_layer(config, MODEL_PATH.get(path, path), device, dtype)
        args = (q_nope, q_pe, latent, k_pe, token_ids, ctx)
        if path == attn.path.name and attn.path.keeps_stats:  # what the path's cache holds: EG-MLA's 'kernel' the
            # norm statistics (not 'kernel+stats', which computes them); the bias control's 'absorbed' its (ungated)
            # statistics and the token groups, read as the engine's CUDA-graph steps read them (capturable, no host
            # sync, ids up to the bound)
            groups = registered_groups(token_ids, positions) if attn.path.keeps_token_groups else None
            args = (*args[:5], dataclasses.replace(ctx, kv_ln_stats=norm_stats(attn, latent, token_ids),
                                                   kv_groups=groups, capturable=groups is not None))
        call = functools.partial(getattr(attn, attn.path.method), *args)
        if not reads_gate_rows(config):
            if path == "naive":
                cases.append(Case(variant, path, call, cache_bytes, attention_flops + rebuild_flops))
            else:  # absorbed: an MQA over the latent, d_c + d_r wide keys, d_c wide values
                flops = 2 * heads * held * (2 * d_c + d_r)
                cases.append(Case(variant, path, _core_call(attn, q_nope, q_pe, latent, k_pe, positions)
                                  if path == "kernel-core" else call, cache_bytes, flops))
            continue
        distinct = int(held_ids(token_ids, lengths).unique().numel())
        bytes_ = cache_bytes + held * (4 + 8)  # + token ids (int32) + norm stats (2 x fp32)
        if path == "naive":  # gate rebuilt from the embedding row: d_e wide rows, a d_e x gate_out product each
            gate_bytes, flops = distinct * config.gate_dim * es, 2 * held * config.gate_dim * config.gate_out_dim
        else:
            gate_bytes, flops = distinct * config.gate_out_dim * es, 0
        if path == "absorbed":  # the bias control: MLA's absorbed attention, + per (sequence, id) a score dot and a
            # value accumulate over the embedding row (d_e wide; W_UE absorbed into the query and the value sum)
            pairs, d_e = int(groups.n_distinct.sum()), config.gate_dim
            gate_bytes = distinct * d_e * es
            flops = (2 * heads * held * (2 * d_c + d_r) + 2 * 2 * pairs * heads * d_e
                     + 2 * batch * heads * d_e * (d_n + d_v))
        else:
            flops += attention_flops + rebuild_flops * (2 if path == "kernel+stats" else 1)
        cases.append(Case(variant, path, call, bytes_ + gate_bytes, flops, {"distinct_ids_batch": distinct}))
    return cases


def ragged_lengths(batch: int, max_len: int, device=None) -> torch.Tensor:
    """[batch] lengths spread evenly from max_len // 2 to max_len (the last sequence is full): a ragged batch
    of the same largest context, for rows beside equal lengths."""
    spread = max_len - max_len // 2
    return max_len // 2 + torch.arange(batch, device=device) * spread // max(batch - 1, 1) + (batch == 1) * spread


def last_positions(batch: int, max_len: int, lengths: torch.Tensor | None, device) -> torch.Tensor:
    """[batch, 1]: the position of each sequence's newest token (T - 1, or lengths - 1 for a ragged batch)."""
    if lengths is None:
        return torch.full((batch, 1), max_len - 1, device=device)
    if lengths.shape != (batch,) or int(lengths.min()) < 1 or int(lengths.max()) > max_len:
        raise ValueError(f"lengths={lengths.tolist()}: expected {batch} lengths in [1, {max_len}]")
    return (lengths.to(device, torch.long) - 1)[:, None]


def positions_held(batch: int, max_len: int, lengths: torch.Tensor | None) -> int:
    return batch * max_len if lengths is None else int(lengths.sum())


def held_ids(token_ids: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """The token ids of the positions the sequences hold (all of token_ids without lengths)."""
    if lengths is None:
        return token_ids
    held = torch.arange(token_ids.shape[1], device=token_ids.device)[None, :] < lengths.to(token_ids.device)[:, None]
    return token_ids[held]


def registered_groups(token_ids: torch.Tensor, positions: torch.Tensor):
    """TokenGroups of token_ids [batch, T] with each sequence's first positions[b] + 1 ids registered (the rest
    padding), as a cache on the 'grouped' path (or the bias control's 'absorbed') holds them; capturable steps
    are sized for the distinct ids as a generation call's CUDA graph is (GenerationEngine._step)."""
    from egmla.attention.cache import TokenGroups

    batch, max_len = token_ids.shape
    groups = TokenGroups(batch, max_len, token_ids.device)
    groups.append(token_ids, torch.arange(max_len, device=token_ids.device).expand(batch, -1), n_new=positions[:, 0] + 1)
    groups.host.plan_distinct = groups.graph_distinct_bound(max_len, 0)
    return groups


def one_layer(config, path: str, device, dtype):
    """The attention module of a one-layer model on decode path `path` (seed 0: every path gets the same
    weights; a module per path, so each holds only what its path precomputes)."""
    from egmla.model import Transformer

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(config.replace(n_layers=1)).to(dtype).eval()
    model.set_decode_path(path)
    return model.layers[0].attn


def _core_call(attn, q_nope, q_pe, latent, k_pe, positions):
    from egmla.kernels.mla_decode import mla_decode

    w_uk, _ = attn.up_weights()
    q_latent = torch.einsum("bhd,hdc->bhc", q_nope[:, 0], w_uk)
    q_pe1, lengths = q_pe[:, 0].contiguous(), positions[:, 0] + 1
    return lambda: mla_decode(q_latent, q_pe1, latent, k_pe, lengths, attn.softmax_scale)


def _sdpa_case(variant: str, config, batch: int, max_len: int, device, dtype,
               lengths: torch.Tensor | None = None) -> Case:
    heads, kv_heads, head_dim = config.n_heads, config.kv_heads, config.mha_head_dim
    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    gqa = kv_heads != heads
    es = torch.finfo(dtype).bits // 8
    mask = None  # ragged: the padded batch with a key mask, what a user's padded batch runs
    if lengths is not None:
        positions = last_positions(batch, max_len, lengths, device)
        mask = (torch.arange(max_len, device=device)[None, :] <= positions)[:, None, None, :]
    held = positions_held(batch, max_len, lengths)
    return Case(variant, "sdpa", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa),
                2 * held * kv_heads * head_dim * es, 4 * heads * held * head_dim)


def kernel_paths_available(device) -> str | None:
    """None if the kernel paths (Triton) can run here, else why not (they are then skipped, not faked)."""
    from egmla.kernels import kernel_unavailable_reason

    return kernel_unavailable_reason(device)
