"""The grouped EG-MLA decode (docs/design.md §4b) in the decode benchmark.

`grouped_cases` builds the cases `egmla bench decode` times for path 'grouped' (the model's
`attend_grouped` with a cache that holds the norm statistics and the token groups), plus 'grouped-plan'
(the per-step layout, shared by all layers of a step). `distinct_ratios` measures how often ids repeat
in windows of real text, the quantity the method's cost follows. `egmla bench grouped`
(egmla/bench/grouped_study.py) runs both on two corpora, with kernel variants and a correctness check
against the fused rebuild kernel.

Floor of 'grouped' (bytes / HBM, FLOPs / peak, as for the other paths): bytes = the cache (c_t, k^R_t),
per position the norm statistics (2 x fp32), slot and sorted-order entries (2 x int32), and one gate
row per distinct id of the batch; FLOPs = MLA's absorbed attention (2 d_c + d_r per head and position)
plus, per distinct id of each sequence, the absorption W^K_h^T(...) and the up-projection W^V_h s.
"""
from __future__ import annotations

import dataclasses

import torch

GROUPED_NOTES = {
    "grouped": "model attend_grouped: Triton absorb + attend + upproj over the token groups (cached norm stats)",
    "grouped-graph": "attend_grouped as the engine's CUDA-graph steps run it: kernels sized by host bounds "
                     "(the distinct ids rounded up to 256, the cache length), no host sync",
    "grouped-plan": "per-step layout (positions sorted by id, rows per chunk): once per step for all layers, "
                    "eager with its host sync",
    "grouped-plan-graph": "the per-step layout as the engine's CUDA graph builds it (host bounds, no sync): "
                          "once per step for all layers",
}


def grouped_inputs(config, batch: int, max_len: int, token_ids: torch.Tensor, device, dtype,
                   lengths: torch.Tensor | None = None):
    """(attn, call args, groups): a one-layer EG-MLA module on path 'grouped' (its gate table built) and a
    full cache of max_len positions per sequence with token_ids [batch, max_len] (ragged: sequence b holds
    its first lengths[b]; the rest is padding, never registered); norm statistics exact for the random latents."""
    from egmla.attention.context import AttnContext
    from egmla.bench.decode_cases import last_positions, one_layer, registered_groups  # (imports this module)

    attn = one_layer(config, "grouped", device, dtype)
    heads, d_n, d_r, d_c = config.n_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.kv_lora_rank
    q_nope = torch.randn(batch, 1, heads, d_n, device=device, dtype=dtype)
    q_pe = torch.randn(batch, 1, heads, d_r, device=device, dtype=dtype)
    latent = torch.randn(batch, max_len, d_c, device=device, dtype=dtype)
    k_pe = torch.randn(batch, max_len, d_r, device=device, dtype=dtype)
    positions = last_positions(batch, max_len, lengths, device)
    groups = registered_groups(token_ids, positions)
    stats = norm_stats(attn, latent, token_ids)
    ctx = AttnContext(token_ids.gather(1, positions), positions, torch.empty(0), torch.empty(0), kv_len=max_len,
                      kv_token_ids=token_ids, kv_groups=groups,
                      kv_ln_stats=stats)
    return attn, (q_nope, q_pe, latent, k_pe, token_ids, ctx), groups


def kernel_inputs(attn, args) -> dict:
    """The keyword inputs of grouped_decode (and grouped_fused's kernel) but the plan, for the module and call
    args of grouped_inputs."""
    q_nope, q_pe, latent, k_pe, _, ctx = args
    norm = attn.gate_norm
    return dict(q_nope=q_nope[:, 0], q_pe=q_pe[:, 0], latent=latent, k_rope=k_pe, ln_stats=ctx.kv_ln_stats,
                gate_table=attn.gate_table_like(latent), wkv_b=attn.wkv_b.weight, norm_weight=norm.weight,
                norm_bias=getattr(norm, "bias", None), scale=attn.softmax_scale)


def fp32_reference(attn, args, groups) -> torch.Tensor:
    """grouped_decode_ref in fp32 on the same inputs: [batch, heads, d_v]."""
    from egmla.kernels.grouped_decode_ref import grouped_decode_ref

    inputs = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in kernel_inputs(attn, args).items()}
    return grouped_decode_ref(slots=groups.slots, distinct_ids=groups.distinct_ids,
                              lengths=args[5].positions[:, 0] + 1, **inputs)


def norm_stats(attn, latent: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[batch, T, 2] fp32 (mu, rho) of every position, as appends write them (attn.norm_stats). On CUDA the
    Triton pass of the same statistics: attn.norm_stats holds three fp32 [batch, T, heads * (d_n + d_v)]
    tensors at once, about 40 GB at paper-base, B = 128, T = 16,384. Under TRITON_INTERPRET=1 the same Triton
    pass on the CPU, so the tests run what the GPU runs."""
    from egmla.kernels import interpreting

    if not (latent.is_cuda or interpreting()):
        return attn.norm_stats(latent, token_ids)
    from egmla.kernels.egmla_decode import layernorm_stats_triton

    return layernorm_stats_triton(latent, token_ids, attn.gate_table_like(latent), attn.wkv_b.weight, attn.n_heads,
                                  attn.qk_nope_head_dim, getattr(attn.gate_norm, "eps", 0.0) or 0.0,
                                  gate_op=attn.gate_op, norm=attn.norm_kind)


def grouped_cost(config, batch: int, max_len: int, groups, dtype) -> tuple[float, float, dict]:
    """(bytes, FLOPs, extra columns) of the grouped path's floor at this shape (the positions the groups hold)."""
    heads, d_n, d_r, d_v, d_c = (config.n_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                                 config.v_head_dim, config.kv_lora_rank)
    es = torch.finfo(dtype).bits // 8
    ids = groups.distinct_ids
    known = torch.arange(ids.shape[1], device=ids.device)[None, :] < groups.n_distinct[:, None]
    batch_distinct = int(ids[known].unique().numel())
    pairs = int(groups.n_distinct.sum())  # (sequence, distinct id) pairs
    held = int(groups.lengths.sum())
    bytes_ = held * ((d_c + d_r) * es + 8 + 8) + batch_distinct * config.gate_out_dim * es
    flops = 2 * heads * held * (2 * d_c + d_r) + 2 * pairs * heads * d_c * (d_n + d_v)
    return bytes_, flops, {"distinct_ids_batch": batch_distinct, "id_pairs": pairs}


def grouped_cases(config, batch: int, max_len: int, token_ids: torch.Tensor, device, dtype,
                  paths=("grouped", "grouped-plan", "grouped-graph", "grouped-plan-graph"),
                  variants: dict | None = None,
                  lengths: torch.Tensor | None = None) -> list:
    """Cases for `egmla bench decode`: 'grouped' (attend_grouped, the plan built beforehand, as every layer
    but the first of a step finds it), its kernel variants {label: grouped_decode kwargs}, 'grouped-plan'
    (eager, host sync); 'grouped-graph' and 'grouped-plan-graph' the same as the engine's CUDA-graph steps
    run them (sizes from host bounds, no sync);
    lengths [batch] for a ragged batch (grouped_inputs)."""
    from egmla.bench.decode_cases import Case  # decode_cases imports this module
    from egmla.kernels.grouped_decode import CHUNK, make_plan

    attn, args, groups = grouped_inputs(config, batch, max_len, token_ids, device, dtype, lengths)
    bytes_, flops, extra = grouped_cost(config, batch, max_len, groups, dtype)
    variant, cases = config.variant_name(), []
    bounds = (max_len, groups.host.plan_distinct)  # as generation's CUDA graphs size the plan (registered_groups)
    graph_args = (*args[:5], dataclasses.replace(args[5], capturable=True))
    if "grouped" in paths:
        attn.attend_grouped(*args)  # builds the gate table and the plan once
        cases.append(Case(variant, "grouped", lambda: attn.attend_grouped(*args), bytes_, flops, extra))
    if "grouped-graph" in paths:
        attn.attend_grouped(*graph_args)  # its bounded plan, once
        cases.append(Case(variant, "grouped-graph", lambda: attn.attend_grouped(*graph_args), bytes_, flops, extra))
    for label, kwargs in (variants or {}).items():
        cases.append(Case(variant, label, _variant_call(attn, args, groups, kwargs), bytes_, flops, extra))
    from egmla.kernels import kernel_unavailable_reason

    plan_bytes = int(groups.lengths.sum()) * 4 * 4  # slots read, sort keys, order written, row map
    if "grouped-plan" in paths and not kernel_unavailable_reason(device):  # the plan is the kernels' layout
        cases.append(Case(variant, "grouped-plan", lambda: make_plan(groups), plan_bytes, 0, extra))
    if "grouped-plan-graph" in paths and not kernel_unavailable_reason(device):
        cases.append(Case(variant, "grouped-plan-graph", lambda: make_plan(groups, CHUNK, bounds=bounds), plan_bytes, 0,
                          extra))
    return cases


def _variant_call(attn, args, groups, kwargs: dict):
    """grouped_decode (three launches) with other launch settings (chunk `block_t`, ids / rows per program,
    warps), or with kwargs["kernel"] = "fused" the one-launch kernel of grouped_fused.py and its settings,
    "gluon" the persistent Gluon kernel of grouped_gluon.py, "scratch" grouped_scratch.py's one launch (plus a
    combine) over ranges of grouped positions, or "cuda" the fused CUDA kernel of studies/grouped_decode_cuda.py."""
    from egmla.kernels.grouped_decode import CHUNK, grouped_decode, make_plan
    from egmla.kernels.studies.grouped_fused import grouped_decode_fused

    kwargs = dict(kwargs)
    which = kwargs.pop("kernel", "three")
    three = which == "three"
    plan = make_plan(groups, kwargs.pop("block_t", CHUNK) if which in ("three", "scratch", "cuda") else 32)
    kernel = grouped_decode if three else grouped_decode_fused
    if which == "gluon":
        from egmla.kernels.studies.grouped_gluon import grouped_decode_gluon as kernel
    if which == "scratch":
        from egmla.kernels.studies.grouped_scratch import grouped_decode_scratch as kernel
    if which == "cuda":
        from egmla.kernels.studies.grouped_decode_cuda import grouped_decode_cuda as kernel
    inputs = kernel_inputs(attn, args)
    return lambda: kernel(plan=plan, **inputs, **kwargs)


def distinct_ratios(ids: torch.Tensor, contexts) -> list[dict]:
    """Per context length T: distinct ids in windows of T consecutive tokens of ids [windows, >= T]
    (median and mean over the rows) and positions per distinct id."""
    rows = []
    for length in contexts:
        counts = torch.tensor([float(row[:length].unique().numel()) for row in ids])
        rows.append({"context": length, "windows": len(counts), "distinct_median": counts.median().item(),
                     "distinct_mean": counts.mean().item(), "positions_per_distinct": length / counts.mean().item()})
    return rows
