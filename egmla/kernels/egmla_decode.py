"""EG-MLA fused decode in Triton, gate placement `up` (reference: egmla_decode_ref.py).

The paper's LayerNorm sits after the gate, so MLA's absorption does not apply: every cached position's
K/V must be rebuilt. This kernel rebuilds each head's slice on chip and never writes K/V to HBM.
One program owns (head h, piece of one sequence); per tile of BLOCK_T positions:

    kv^K = C W^K_h^T,  kv^V = C W^V_h^T           two tensor-core dots, [BLOCK_T, d_n] / [BLOCK_T, d_v]
    x    = kv ⊙ G[ids, head h slice]               gate rows gathered by token id (frequent ids hit L2; or, with an
                                                   id -> row map, G[id_to_row[ids]]: an offload's resident rows)
    LayerNorm with the position's cached (mu_t, rho_t), folded into the query and the accumulator:
      q^C . k^C_t = rho_t (x^K_t . (gamma^K ⊙ q^C) - mu_t sum(gamma^K ⊙ q^C)) + beta^K . q^C
      (the last term is the same for every t, so softmax drops it exactly)
      sum_t p_t v_t = gamma^V ⊙ (sum_t p_t rho_t x^V_t - sum_t p_t rho_t mu_t) / sum_t p_t + beta^V

(mu_t, rho_t) need the whole n_h*(d_n+d_v) vector of a position, so they come from a separate pass
(`layernorm_stats`, run once per token when it is appended, or over a whole cache here).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from egmla.kernels import block, computes_like
from egmla.kernels.mla_decode import LOG2E, _check_decode_inputs, _output
from egmla.kernels.pdl import launch_flags, wait as pdl_wait
from egmla.kernels.split_combine import (choose_num_splits, combine_splits, launch_first_fitting, partial_buffers,
                                         split_range)

NORM_CODES = {"none": 0, "layernorm": 1, "rmsnorm": 2}


@triton.jit
def _load_w_t(wkv_b_ptr, stride_w, cols, col_mask, offs_c, c_mask):
    """W^T [BLOCK_C, len(cols)]: rows `cols` of wkv_b [n_h*(d_n+d_v), d_c], transposed."""
    return tl.load(wkv_b_ptr + cols[None, :] * stride_w + offs_c[:, None],
                   mask=c_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _gated(c_tile, w_t, gate_ptr, ids, stride_g, cols, col_mask, t_mask,
           GATE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """x = (C W^T) ⊙ G[ids, cols] (GATE 0: mul; 1: add; 2: no gate, the bias control's norm input),
    fp32 [BLOCK_T, len(cols)]; 0 outside the masks."""
    kv = tl.dot(c_tile, w_t, input_precision=DOT_PRECISION)
    if GATE == 2:
        x = kv
    else:
        gate = tl.load(gate_ptr + ids[:, None] * stride_g + cols[None, :],
                       mask=t_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        x = kv + gate if GATE == 1 else kv * gate
    return x


@triton.jit
def gate_rows(ids, id_to_row_ptr, mask, ROW_MAP: tl.constexpr):
    """The gate-table rows of token ids (int64): the ids themselves, or with ROW_MAP id_to_row[ids] (a gate-table
    offload's slots, egmla.infer.offload: the table is then the rows resident on the device). ROW_MAP off compiles
    to no load at all."""
    if ROW_MAP:
        ids = tl.load(id_to_row_ptr + ids, mask=mask, other=0).to(tl.int64)
    return ids


@triton.jit
def _head_columns(head0, N_HEADS: tl.constexpr, HEADS: tl.constexpr, BLOCK: tl.constexpr,
                  D: tl.constexpr, OFFSET: tl.constexpr, WIDTH: tl.constexpr):
    """Columns [HEADS*BLOCK] of heads head0..head0+HEADS-1, slice [OFFSET, OFFSET+D) of each head's WIDTH
    columns, head-major (reshaped to [HEADS, BLOCK] one row per head), and their mask."""
    j = tl.arange(0, HEADS * BLOCK)
    head, within = head0 + j // BLOCK, j % BLOCK
    return head * WIDTH + OFFSET + within, (within < D) & (head < N_HEADS)


@triton.jit
def _egmla_decode_kernel(
    q_nope_ptr, q_pe_ptr, latent_ptr, k_rope_ptr, ids_ptr, stats_ptr, lengths_ptr, gate_ptr, id_to_row_ptr, wkv_b_ptr,
    weight_ptr, bias_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_lb, stride_lt, stride_kb, stride_kt,
    stride_ib, stride_it, stride_sb, stride_st, stride_g, stride_w, stride_ob, stride_oh,
    max_len, num_splits, qk_scale,
    N_HEADS: tl.constexpr, D_N: tl.constexpr, D_V: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr, HEADS: tl.constexpr, GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, ONE_SPLIT: tl.constexpr, PDL: tl.constexpr,
    ROW_MAP: tl.constexpr,
):
    """One program: HEADS consecutive heads x one split of one sequence. Per tile of BLOCK_T positions:

        X^K = (C W_K^T ⊙ G[ids, k cols]) - mu      [BLOCK_T, HEADS*d_n]   (X^V likewise on the v cols)
        S   = rho ⊙ (X^K Q) + K_rope Q_pe           [BLOCK_T, 16]  Q block-diagonal: column h holds
                                                    head h's gamma^K ⊙ q^C on head h's rows
        A  += P^T diag(rho) X^V                     [16, HEADS*d_v]  row h keeps head h's block
    All reductions run on the tensor cores; X is cast to the input dtype for them (as P in flash attention).
    """
    PAD: tl.constexpr = 16  # tl.dot's smallest dimension: one score column / accumulator row per head
    WIDTH: tl.constexpr = D_N + D_V
    head0 = tl.program_id(0) * HEADS
    split = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)  # offsets past 2^31 elements at large batch
    length = tl.minimum(tl.load(lengths_ptr + batch).to(tl.int32), max_len)
    start, end = split_range(length, split, num_splits, BLOCK_T)

    cols_k, k_mask = _head_columns(head0, N_HEADS, HEADS, BLOCK_N, D_N, 0, WIDTH)  # [HEADS*BLOCK_N]
    cols_v, v_mask = _head_columns(head0, N_HEADS, HEADS, BLOCK_V, D_V, D_N, WIDTH)
    offs_c, offs_r, pad = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R), tl.arange(0, PAD)
    c_mask, r_mask = offs_c < D_C, offs_r < D_R
    w_k = _load_w_t(wkv_b_ptr, stride_w, cols_k, k_mask, offs_c, c_mask)  # [BLOCK_C, HEADS*BLOCK_N]
    w_v = _load_w_t(wkv_b_ptr, stride_w, cols_v, v_mask, offs_c, c_mask)
    pdl_wait(PDL)  # the weights above are constant; the query, the cache and its statistics may be just written
    dtype = wkv_b_ptr.dtype.element_ty  # the latents', or over an fp8 cache the model's (widened as read)
    local_k = tl.arange(0, HEADS * BLOCK_N) // BLOCK_N  # head within the program, per k column
    q = tl.load(q_nope_ptr + batch * stride_qb + (head0 + local_k) * stride_qh + tl.arange(0, HEADS * BLOCK_N) % BLOCK_N,
                mask=k_mask, other=0.0).to(tl.float32) * qk_scale  # log2 domain: exp2 below
    if HAS_WEIGHT:
        q *= tl.load(weight_ptr + cols_k, mask=k_mask, other=0.0).to(tl.float32)  # gamma^K ⊙ q^C
    q_block = tl.where(local_k[:, None] == pad[None, :], q[:, None], 0.0).to(dtype)  # [HEADS*BLOCK_N, PAD]
    heads = head0 + pad
    head_ok = (pad < HEADS) & (heads < N_HEADS)
    q_pe = tl.load(q_pe_ptr + batch * stride_pb + heads[None, :] * stride_ph + offs_r[:, None],
                   mask=head_ok[None, :] & r_mask[:, None], other=0.0)
    q_pe = (q_pe.to(tl.float32) * qk_scale).to(dtype)  # [BLOCK_R, PAD]

    m_i = tl.full([PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([PAD], tl.float32)
    acc = tl.zeros([PAD, HEADS * BLOCK_V], tl.float32)  # row h: sum_t p_ht rho_t (x^V_t - mu_t)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < end
        c_tile = tl.load(latent_ptr + batch * stride_lb + offs_t[:, None] * stride_lt + offs_c[None, :],
                         mask=t_mask[:, None] & c_mask[None, :], other=0.0).to(dtype)
        r_tile = tl.load(k_rope_ptr + batch * stride_kb + offs_t[:, None] * stride_kt + offs_r[None, :],
                         mask=t_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)
        ids = tl.load(ids_ptr + batch * stride_ib + offs_t * stride_it, mask=t_mask, other=0).to(tl.int64)
        ids = gate_rows(ids, id_to_row_ptr, t_mask, ROW_MAP)
        mu = tl.load(stats_ptr + batch * stride_sb + offs_t * stride_st, mask=t_mask, other=0.0)
        rho = tl.load(stats_ptr + batch * stride_sb + offs_t * stride_st + 1, mask=t_mask, other=0.0)
        x_k = _gated(c_tile, w_k, gate_ptr, ids, stride_g, cols_k, k_mask, t_mask, GATE, DOT_PRECISION)
        x_k = (x_k - mu[:, None]).to(dtype)  # centred: the LayerNorm mean leaves scores and values exactly
        s = rho[:, None] * tl.dot(x_k, q_block, input_precision=DOT_PRECISION)
        s += tl.dot(r_tile, q_pe, input_precision=DOT_PRECISION)  # [BLOCK_T, PAD]
        s = tl.where(t_mask[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        x_v = _gated(c_tile, w_v, gate_ptr, ids, stride_g, cols_v, v_mask, t_mask, GATE, DOT_PRECISION)
        x_v = (x_v - mu[:, None]).to(dtype)
        weights = tl.trans((p * rho[:, None]).to(dtype))  # [PAD, BLOCK_T]
        acc = acc * alpha[:, None] + tl.dot(weights, x_v, input_precision=DOT_PRECISION)
        m_i = m_new

    local_v = tl.arange(0, HEADS * BLOCK_V) // BLOCK_V
    own = local_v[None, :] == pad[:, None]  # [PAD, HEADS*BLOCK_V]: row h, head h's block
    j_v = tl.arange(0, HEADS * BLOCK_V) % BLOCK_V
    if ONE_SPLIT:
        y = tl.sum(tl.where(own, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0), axis=0)
        if HAS_WEIGHT:
            y *= tl.load(weight_ptr + cols_v, mask=v_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:  # beta^V only where the softmax had positions: a sequence with none gets 0, as the reference
            seen = tl.sum(tl.where(own, l_i[:, None], 0.0), axis=0) > 0  # per column, its head's denominator
            y += tl.where(seen, tl.load(bias_ptr + cols_v, mask=v_mask, other=0.0).to(tl.float32), 0.0)
        tl.store(out_ptr + batch * stride_ob + (head0 + local_v) * stride_oh + j_v,
                 y.to(out_ptr.dtype.element_ty), mask=v_mask)
    else:
        y = tl.sum(tl.where(own, acc, 0.0), axis=0)
        rows = (batch * num_splits + split) * N_HEADS + head0 + local_v
        tl.store(part_acc_ptr + rows * D_V + j_v, y, mask=v_mask)
        ml_rows = (batch * num_splits + split) * N_HEADS + heads
        tl.store(part_ml_ptr + ml_rows * 2, m_i, mask=head_ok)
        tl.store(part_ml_ptr + ml_rows * 2 + 1, l_i, mask=head_ok)


@triton.jit
def _ln_stats_head_kernel(
    latent_ptr, ids_ptr, gate_ptr, wkv_b_ptr, part_ptr,
    stride_lb, stride_lt, stride_ib, stride_it, stride_g, stride_w, max_len,
    N_HEADS: tl.constexpr, D_N: tl.constexpr, D_V: tl.constexpr, D_C: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    GATE: tl.constexpr, RMS: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """One head's share of x_t's statistics for BLOCK_T positions: (mean, sum of squared deviations) over its
    d_n + d_v columns (RMSNorm: (0, sum of squares)), into part [batch, T, heads, 2]."""
    tile, batch, head = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    WIDTH: tl.constexpr = D_N + D_V
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < D_C
    cols, col_ok = _head_columns(head, N_HEADS, 1, BLOCK_W, WIDTH, 0, WIDTH)  # the head's [k^C ; v]
    w_t = _load_w_t(wkv_b_ptr, stride_w, cols, col_ok, offs_c, c_mask)
    pdl_wait(PDL)  # the weights above are constant; the latent rows come from the kernels right before
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < max_len
    c_tile = tl.load(latent_ptr + batch * stride_lb + offs_t[:, None] * stride_lt + offs_c[None, :],
                     mask=t_mask[:, None] & c_mask[None, :], other=0.0).to(w_t.dtype)  # an fp8 cache widened as read
    ids = tl.load(ids_ptr + batch * stride_ib + offs_t * stride_it, mask=t_mask, other=0).to(tl.int64)
    x = _gated(c_tile, w_t, gate_ptr, ids, stride_g, cols, col_ok, t_mask, GATE, DOT_PRECISION)
    if RMS:
        mean = tl.zeros([BLOCK_T], tl.float32)
        m2 = tl.sum(x * x, axis=1)
    else:
        mean = tl.sum(x, axis=1) / WIDTH
        dev = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
        m2 = tl.sum(dev * dev, axis=1)
    out = part_ptr + ((batch * max_len + offs_t) * N_HEADS + head) * 2
    tl.store(out, mean, mask=t_mask)
    tl.store(out + 1, m2, mask=t_mask)


@triton.jit
def _ln_stats_merge_kernel(part_ptr, stats_ptr, positions_ptr, n_rows, max_len, stride_sb, stride_st, stride_pb,
                           stride_pt, eps, N_HEADS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_R: tl.constexpr, RMS: tl.constexpr, AT_POSITIONS: tl.constexpr, PDL: tl.constexpr):
    """(mean, rstd) of each position from its heads' shares: every head covers WIDTH columns, so Chan's merge is
    mean = the heads' mean, M2 = sum of M2_h + WIDTH * sum of (mean_h - mean)^2, stable in fp32. AT_POSITIONS:
    stored at row positions[b, t] of stats (the cache's buffer) instead of row t."""
    pdl_wait(PDL)  # the shares come from the kernel right before
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_h = tl.arange(0, BLOCK_H)
    live = (rows < n_rows)[:, None] & (offs_h < N_HEADS)[None, :]
    share = part_ptr + (rows.to(tl.int64)[:, None] * N_HEADS + offs_h[None, :]) * 2
    head_mean = tl.load(share, mask=live, other=0.0)
    m2 = tl.sum(tl.load(share + 1, mask=live, other=0.0), axis=1)
    if RMS:
        mean = tl.zeros([BLOCK_R], tl.float32)
    else:
        mean = tl.sum(head_mean, axis=1) / N_HEADS
        spread = tl.where(live, head_mean - mean[:, None], 0.0)
        m2 += WIDTH * tl.sum(spread * spread, axis=1)
    rstd = tl.math.rsqrt(m2 / (N_HEADS * WIDTH) + eps)
    seq, t = (rows // max_len).to(tl.int64), rows % max_len
    if AT_POSITIONS:
        t = tl.load(positions_ptr + seq * stride_pb + t * stride_pt, mask=rows < n_rows, other=0)
    out = stats_ptr + seq * stride_sb + t * stride_st
    tl.store(out, mean, mask=rows < n_rows)
    tl.store(out + 1, rstd, mask=rows < n_rows)


# the kernels' GATE codes; 'bias' (the control: its norm sees W_UKV c_t alone, the table is added after the norm)
# only in the statistics pass, which is all of the control that needs (mu, rho) of the ungated kv_t
GATE_CODES = {"mul": 0, "add": 1, "bias": 2, "bias-v": 2}  # the controls' norm sees kv alone


def _check_egmla_inputs(n_heads: int, d_n: int, gate_table: torch.Tensor, wkv_b: torch.Tensor, gate_op: str,
                        gate_ops: tuple[str, ...] = ("mul", "add")) -> int:
    """Returns d_v; raises ValueError on inconsistent widths."""
    width = wkv_b.shape[0]
    if width % n_heads or width // n_heads <= d_n:
        raise ValueError(f"wkv_b.shape={tuple(wkv_b.shape)}: rows must be heads*(d_n+d_v) with heads={n_heads}, d_n={d_n}")
    if wkv_b.stride(-1) != 1:  # the kernels step over rows only
        raise ValueError(f"wkv_b.stride()={wkv_b.stride()}: each row must be contiguous (pass wkv_b.contiguous())")
    if gate_table.shape[-1] != width or gate_table.stride(-1) != 1:
        raise ValueError(f"gate_table.shape={tuple(gate_table.shape)}: expected [vocab, {width}], contiguous rows "
                         f"(gate placement 'up'; placement 'latent' uses mla_decode)")
    if gate_op not in gate_ops:
        raise ValueError(f"gate_op={gate_op!r}: choose {' or '.join(gate_ops)}"
                         + (" (the bias control decodes on its 'absorbed' path, egmla/kernels/bias_decode.py)"
                            if gate_op in ("bias", "bias-v") else ""))
    return width // n_heads - d_n


def check_id_to_row(id_to_row: torch.Tensor | None, gate_table: torch.Tensor) -> None:
    """An id -> gate-row map, where one is given, must be a 1-D integer tensor on the table's device."""
    if id_to_row is not None and (id_to_row.dim() != 1 or id_to_row.dtype not in (torch.int32, torch.int64)
                                  or id_to_row.device != gate_table.device):
        raise ValueError(f"id_to_row: {tuple(id_to_row.shape)} {id_to_row.dtype} on {id_to_row.device}: expected a "
                         f"[vocab] int32/int64 map on the gate table's device ({gate_table.device})")


def layernorm_stats_triton(latent: torch.Tensor, token_ids: torch.Tensor, gate_table: torch.Tensor,
                           wkv_b: torch.Tensor, n_heads: int, d_n: int, eps: float = 1e-6, gate_op: str = "mul",
                           norm: str = "layernorm", block_t: int = 64, out: torch.Tensor | None = None,
                           positions: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, T, 2] fp32 (mean, rstd) of every position: the Triton twin of `layernorm_stats`
    (gates gathered from gate_table by token_ids [batch, T]); one rebuild pass, nothing written but stats.
    out [batch, max_len, 2] fp32 and positions [batch, T]: written at out[b, positions[b, t]] instead (a cache's
    statistics, with no index_put launch after the pass), and out returned."""
    d_v = _check_egmla_inputs(n_heads, d_n, gate_table, wkv_b, gate_op, tuple(GATE_CODES))
    batch, max_len, d_c = latent.shape
    if (out is None) != (positions is None):
        raise ValueError("layernorm_stats_triton: pass out and positions together (or neither)")
    if out is not None and (out.dtype != torch.float32 or out.dim() != 3 or out.shape[0] != batch
                            or out.shape[2] != 2 or out.stride(2) != 1 or tuple(positions.shape) != (batch, max_len)):
        raise ValueError(f"layernorm_stats_triton: out {tuple(out.shape)} {out.dtype} and positions "
                         f"{tuple(positions.shape)}: expected out [{batch}, cache length, 2] fp32 and positions "
                         f"[{batch}, {max_len}]")
    stats = torch.empty(batch, max_len, 2, dtype=torch.float32, device=latent.device) if out is None else out
    if norm == "none":
        if out is not None:
            rows = torch.arange(batch, device=latent.device)[:, None]
            out[rows, positions] = torch.tensor([0.0, 1.0], device=latent.device)
            return out
        stats[..., 0], stats[..., 1] = 0.0, 1.0
        return stats
    if norm not in NORM_CODES:
        raise ValueError(f"norm={norm!r}: choose one of {', '.join(NORM_CODES)}")
    # one program per (tile, sequence, head), then a merge: a decode step's few positions spread over the heads
    # instead of walking them in series (~15 µs per layer at any batch on an H200: docs/bench/generate_h200_profile.md)
    part = torch.empty(batch, max_len, n_heads, 2, dtype=torch.float32, device=latent.device)
    flags = dict(RMS=norm == "rmsnorm", **launch_flags(latent.device))
    _ln_stats_head_kernel[(triton.cdiv(max_len, block_t), batch, n_heads)](
        latent, token_ids, gate_table, wkv_b, part,
        latent.stride(0), latent.stride(1), token_ids.stride(0), token_ids.stride(1), gate_table.stride(0),
        wkv_b.stride(0), max_len,
        N_HEADS=n_heads, D_N=d_n, D_V=d_v, D_C=d_c, BLOCK_W=block(d_n + d_v), BLOCK_C=block(d_c),
        BLOCK_T=block_t, GATE=GATE_CODES[gate_op], DOT_PRECISION="ieee" if wkv_b.dtype == torch.float32 else "tf32",
        num_warps=4, **flags)
    rows, block_r = batch * max_len, 64
    at = positions if positions is not None else part  # (unread without positions)
    _ln_stats_merge_kernel[(triton.cdiv(rows, block_r),)](
        part, stats, at, rows, max_len, stats.stride(0), stats.stride(1), at.stride(0), at.stride(1), eps,
        N_HEADS=n_heads, WIDTH=d_n + d_v, BLOCK_H=block(n_heads), BLOCK_R=block_r,
        AT_POSITIONS=positions is not None, num_warps=2, **flags)
    return stats


# (block_t, heads_per_program, num_warps): the first is the fastest on the H100 at paper-base, B=32,
# T=4096 (docs/kernels.md); the others are used where a shape or fp32 needs more shared memory.
CONFIGS = [(128, 2, 8), (64, 1, 4), (32, 1, 4), (16, 1, 4)]


def egmla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                 token_ids: torch.Tensor, ln_stats: torch.Tensor, lengths: torch.Tensor, gate_table: torch.Tensor,
                 wkv_b: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                 scale: float, gate_op: str = "mul", num_splits: int | None = None, block_t: int | None = None,
                 heads_per_program: int | None = None, num_warps: int | None = None, num_stages: int = 2,
                 out: torch.Tensor | None = None, id_to_row: torch.Tensor | None = None) -> torch.Tensor:
    """o [batch, heads, d_v] (dtype of latent): EG-MLA decode attention, same function as `egmla_decode_ref`.

    q_nope [batch, heads, d_n], q_pe [batch, heads, d_r], latent [batch, T, d_c], k_rope [batch, T, d_r],
    token_ids [batch, T] int, ln_stats [batch, T, 2] fp32 from `layernorm_stats` (norm 'none': (0, 1)),
    lengths [batch], gate_table [vocab, heads*(d_n+d_v)], wkv_b [heads*(d_n+d_v), d_c],
    norm_weight / norm_bias [heads*(d_n+d_v)] or None; `out` [batch, heads, d_v], if given, receives the result.
    id_to_row [vocab] int, if given: position t's gate row is gate_table[id_to_row[token_ids[t]]] (a gate-table
    offload's slot map over the rows resident on the device, egmla.infer.offload) instead of gate_table[token_ids[t]].
    block_t / heads_per_program / num_warps pin the launch configuration (else CONFIGS, first that fits)."""
    batch, heads, max_len = _check_decode_inputs(
        {"q_nope": q_nope, "q_pe": q_pe}, {"latent": latent, "k_rope": k_rope, "ln_stats": ln_stats}, lengths)
    d_n, d_r, d_c = q_nope.shape[-1], q_pe.shape[-1], latent.shape[-1]
    d_v = _check_egmla_inputs(heads, d_n, gate_table, wkv_b, gate_op)
    if token_ids.shape != (batch, max_len) or ln_stats.dtype != torch.float32:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} must be [{batch}, {max_len}] and ln_stats fp32, "
                         f"got {ln_stats.dtype}")
    pinned = (block_t, heads_per_program, num_warps)
    configs = CONFIGS if pinned == (None, None, None) else [tuple(v or d for v, d in zip(pinned, CONFIGS[0]))]
    for _, per_program, _ in configs:
        if per_program & (per_program - 1) or not 1 <= per_program <= 16:
            raise ValueError(f"heads_per_program={per_program}: must be a power of two from 1 to 16")
    check_id_to_row(id_to_row, gate_table)
    out = _output(out, (batch, heads, d_v), computes_like(latent, q_nope))
    dummy = wkv_b  # stands in for absent affine pointers (never read)

    def launch(config):
        tile, per_program, warps = config
        programs = triton.cdiv(heads, per_program)
        splits = num_splits or choose_num_splits(batch, programs, max_len, tile, latent.device,
                                                 min_tiles_per_split=1, waves=8)
        part_acc, part_ml = partial_buffers(batch, splits, heads, d_v, latent.device) if splits > 1 else (out, out)
        _egmla_decode_kernel[(programs, splits, batch)](
            q_nope, q_pe, latent, k_rope, token_ids, ln_stats, lengths, gate_table,
            id_to_row if id_to_row is not None else token_ids, wkv_b,  # (the map unread without one)
            norm_weight if norm_weight is not None else dummy, norm_bias if norm_bias is not None else dummy,
            out, part_acc, part_ml,
            q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), latent.stride(0), latent.stride(1),
            k_rope.stride(0), k_rope.stride(1), token_ids.stride(0), token_ids.stride(1),
            ln_stats.stride(0), ln_stats.stride(1), gate_table.stride(0), wkv_b.stride(0), out.stride(0), out.stride(1),
            max_len, splits, scale * LOG2E,
            N_HEADS=heads, D_N=d_n, D_V=d_v, D_C=d_c, D_R=d_r, BLOCK_N=block(d_n), BLOCK_V=block(d_v),
            BLOCK_C=block(d_c), BLOCK_R=block(d_r), BLOCK_T=tile, HEADS=per_program, GATE=GATE_CODES[gate_op],
            HAS_WEIGHT=norm_weight is not None, HAS_BIAS=norm_bias is not None,
            DOT_PRECISION="ieee" if wkv_b.dtype == torch.float32 else "tf32", ONE_SPLIT=splits == 1,
            ROW_MAP=id_to_row is not None, num_warps=warps, num_stages=num_stages, **launch_flags(latent.device))
        if splits > 1:
            combine_splits(part_acc, part_ml, out, norm_weight, norm_bias, affine_head_stride=d_n + d_v,
                           affine_offset=d_n)
        return out

    key = ("egmla", latent.dtype, k_rope.dtype, heads, d_n, d_v, d_c, d_r, tuple(configs))
    return launch_first_fitting(key, configs, launch)
