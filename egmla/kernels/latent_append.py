"""MLA's cache append in one launch (reference: latent_append_ref.py).

A cached MLA call normalises the new latents (RMSNorm), rotates their RoPE keys and writes both into the cache:
four launches per layer in PyTorch (the norm, the rotation, one index write per buffer). A CUDA-graph decode step
at small batch is bound by its launches (~2.5 µs each on an H200: docs/bench/ab_h200_launch_diet/), so a cached
call without autograd on a GPU does all four in this one (egmla/attention/mla.py). One program per new position:
it reads the position's row of the down-projection [c ; k^R] once and writes the cache rows at its position.

EG-MLA's one-token steps also need each new position's norm statistics (mu, rho) of x = (W_UKV c) ⊙ g, which took
two more launches per layer (a pass per head, then a merge across heads). With `stats` the same launch computes
them: one program per sequence and head, each head's share stored, and the sequence's last head to arrive (an atomic
counter per sequence, which it sets back to 0) merges the shares and writes the cache's row.

Where the query comes out of the same GEMM as the latent (the merged input product of a decode step), the query's
RoPE slice is rotated by this launch too (`q_rope`), one launch fewer per layer again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from egmla.kernels import block
from egmla.kernels.fp8 import stored
from egmla.kernels.rope import rotate, rotate_heads


@triton.jit
def _normed_latent(proj, w_ptr, eps, offs_c, c_mask, D_C: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """RMSNorm(c) * w of one position's down-projection row, fp32."""
    c = tl.load(proj + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    normed = c * tl.rsqrt(tl.sum(c * c, axis=0) / D_C + eps)
    if HAS_WEIGHT:
        normed = normed * tl.load(w_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    return normed


@triton.jit
def _write_row(proj, normed, cos_row, sin_row, latent_row, k_rope_row, out_row, offs_c, c_mask, D_C: tl.constexpr,
               HALF: tl.constexpr, BLOCK_H: tl.constexpr, HAS_OUT: tl.constexpr):
    """One new position's cache rows: the normed latent into latent_row (and out_row), its RoPE key rotated into
    k_rope_row."""
    tl.store(latent_row + offs_c, stored(normed, latent_row), mask=c_mask)  # latent_row may be an fp8 cache
    if HAS_OUT:  # the new latents themselves, for a caller that derives more from them (EG-MLA's norm statistics)
        tl.store(out_row + offs_c, normed.to(out_row.dtype.element_ty), mask=c_mask)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < HALF
    cos = tl.load(cos_row + offs_h, mask=h_mask, other=0.0)
    sin = tl.load(sin_row + offs_h, mask=h_mask, other=0.0)
    rotate(proj + D_C + offs_h, k_rope_row + offs_h, h_mask, cos, sin, HALF)


@triton.jit
def _latent_append_kernel(proj_ptr, w_ptr, cos_ptr, sin_ptr, pos_ptr, latent_ptr, k_rope_ptr, out_ptr, q_ptr, seq, eps,
                          stride_pb, stride_ps, stride_cb, stride_cs, stride_qb, stride_qs,
                          stride_lb, stride_lt, stride_kb, stride_kt, stride_ob, stride_os,
                          stride_rb, stride_rs, stride_rh,
                          D_C: tl.constexpr, HALF: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                          HAS_WEIGHT: tl.constexpr, HAS_OUT: tl.constexpr, Q_HEADS: tl.constexpr,
                          BLOCK_Q: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    batch, s = row // seq, row % seq
    position = tl.load(pos_ptr + batch * stride_qb + s * stride_qs).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    proj = proj_ptr + batch * stride_pb + s * stride_ps
    normed = _normed_latent(proj, w_ptr, eps, offs_c, offs_c < D_C, D_C, HAS_WEIGHT)
    _write_row(proj, normed, cos_ptr + batch * stride_cb + s * stride_cs, sin_ptr + batch * stride_cb + s * stride_cs,
               latent_ptr + batch * stride_lb + position * stride_lt, k_rope_ptr + batch * stride_kb + position * stride_kt,
               out_ptr + batch * stride_ob + s * stride_os, offs_c, offs_c < D_C, D_C, HALF, BLOCK_H, HAS_OUT)
    if Q_HEADS > 0:  # the query's RoPE slice too, every head of the position (one launch fewer per layer)
        rotate_heads(q_ptr + batch * stride_rb + s * stride_rs, stride_rh, cos_ptr + batch * stride_cb + s * stride_cs,
                      sin_ptr + batch * stride_cb + s * stride_cs, 0, BLOCK_Q, Q_HEADS, HALF, BLOCK_H)


@triton.jit
def _latent_append_stats_kernel(proj_ptr, w_ptr, cos_ptr, sin_ptr, pos_ptr, latent_ptr, k_rope_ptr, q_ptr, eps,
                                ids_ptr, gate_ptr, wkv_b_ptr, part_ptr, arrivals_ptr, stats_ptr, stats_eps,
                                stride_pb, stride_cb, stride_qb, stride_lb, stride_lt, stride_kb, stride_kt,
                                stride_rb, stride_rh, stride_ib, stride_g, stride_w, stride_sb, stride_st,
                                D_C: tl.constexpr, HALF: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                                HAS_WEIGHT: tl.constexpr, N_HEADS: tl.constexpr, WIDTH: tl.constexpr,
                                BLOCK_W: tl.constexpr, BLOCK_HEADS: tl.constexpr, GATE: tl.constexpr,
                                RMS: tl.constexpr, HAS_Q: tl.constexpr):
    """One new position per sequence x one head. Every program norms the latent; head 0 writes it and the RoPE key
    into the cache. Each head's share of x = (W_UKV c) ⊙ g (GATE 0; 1: + g; 2: no gate, the table controls) over its
    WIDTH columns, (mean, M2) (RMS: (0, sum of squares)), goes to part [batch, heads, 2]; the sequence's last head
    to arrive (a counter per sequence, left at 0 again) merges the shares (Chan, as `_ln_stats_merge_kernel`) and
    writes (mean, rstd) at the position's row of the cache's statistics."""
    batch, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    position = tl.load(pos_ptr + batch * stride_qb).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < D_C
    proj = proj_ptr + batch * stride_pb
    latent_row = latent_ptr + batch * stride_lb + position * stride_lt
    c = _normed_latent(proj, w_ptr, eps, offs_c, c_mask, D_C, HAS_WEIGHT)
    if head == 0:  # every head needs the latent; one writes the rows
        _write_row(proj, c, cos_ptr + batch * stride_cb, sin_ptr + batch * stride_cb, latent_row,
                   k_rope_ptr + batch * stride_kb + position * stride_kt, latent_row, offs_c, c_mask, D_C, HALF,
                   BLOCK_H, False)
    c = stored(c, latent_ptr).to(tl.float32)  # as the cache holds it, which the decode kernels read
    if HAS_Q:  # the query's RoPE slice of this head (one launch fewer per layer)
        rotate_heads(q_ptr + batch * stride_rb, stride_rh, cos_ptr + batch * stride_cb, sin_ptr + batch * stride_cb,
                      head, 1, N_HEADS, HALF, BLOCK_H)
    offs_w = tl.arange(0, BLOCK_W)
    w_ok = offs_w < WIDTH
    cols = head * WIDTH + offs_w
    w = tl.load(wkv_b_ptr + cols[:, None] * stride_w + offs_c[None, :], mask=w_ok[:, None] & c_mask[None, :],
                other=0.0).to(tl.float32)
    x = tl.sum(w * c[None, :], axis=1)  # one position: a matrix-vector product on the CUDA cores, no 16-row dot
    if GATE != 2:
        token = tl.load(ids_ptr + batch * stride_ib).to(tl.int64)
        gate = tl.load(gate_ptr + token * stride_g + cols, mask=w_ok, other=0.0).to(tl.float32)
        x = x + gate if GATE == 1 else x * gate
    share = part_ptr + (batch * N_HEADS + head) * 2
    if RMS:
        tl.store(share + 1, tl.sum(x * x, axis=0))
    else:
        mean = tl.sum(x, axis=0) / WIDTH
        dev = tl.where(w_ok, x - mean, 0.0)
        tl.store(share, mean)
        tl.store(share + 1, tl.sum(dev * dev, axis=0))
    tl.debug_barrier()  # every thread's share stored before the counter says so (the atomic is release and acquire)
    arrived = tl.atomic_add(arrivals_ptr + batch, 1, sem="acq_rel")
    if arrived == N_HEADS - 1:
        offs_heads = tl.arange(0, BLOCK_HEADS)
        live = offs_heads < N_HEADS
        shares = part_ptr + (batch * N_HEADS + offs_heads) * 2
        total = tl.sum(tl.load(shares + 1, mask=live, other=0.0, volatile=True), axis=0)  # other programs' stores
        out = stats_ptr + batch * stride_sb + position * stride_st
        if RMS:
            tl.store(out, 0.0)
        else:
            head_mean = tl.load(shares, mask=live, other=0.0, volatile=True)
            merged_mean = tl.sum(head_mean, axis=0) / N_HEADS
            spread = tl.where(live, head_mean - merged_mean, 0.0)
            total += WIDTH * tl.sum(spread * spread, axis=0)
            tl.store(out, merged_mean)
        tl.store(out + 1, tl.math.rsqrt(total / (N_HEADS * WIDTH) + stats_eps))
        tl.atomic_xchg(arrivals_ptr + batch, 0)  # ready for the next layer's launch


@dataclass(frozen=True)
class AppendedStats:
    """EG-MLA's norm statistics of the appended positions, computed by the append's own launch (one new token per
    sequence): (mean, rstd) of x = (W_UKV c) ⊙ g ('mul'), (W_UKV c) + g ('add') or W_UKV c alone ('bias', 'bias-v':
    the table controls' norm) over every head's d_n + d_v columns, with c the latent as the cache holds it and g the
    gate-table row of the token; what `layernorm_stats` (egmla/kernels/egmla_decode_ref.py) computes."""

    token_ids: torch.Tensor  # [batch, 1] the new tokens' ids
    gate_table: torch.Tensor  # [vocab, heads * (d_n + d_v)], contiguous rows: the gates the decode kernels read
    wkv_b: torch.Tensor  # [heads * (d_n + d_v), d_c]
    n_heads: int
    gate_op: str  # 'mul', 'add', 'bias' or 'bias-v'
    norm: str  # 'layernorm' or 'rmsnorm' ('none' needs no statistics)
    eps: float
    out: torch.Tensor  # [batch, cache length, 2] fp32: written at out[b, positions[b, 0]]
    arrivals: torch.Tensor  # [batch] int32 zeros (the cache's `stats_arrivals`): how many heads are done, reset to 0


def latent_append(projected: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                  sin: torch.Tensor, positions: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                  keep_latent: bool = False, stats: AppendedStats | None = None,
                  q_rope: torch.Tensor | None = None) -> torch.Tensor | None:
    """`latent_append_ref`: projected [batch, seq, d_c + d_r] (any strides, contiguous last dim), weight [d_c] or
    None, cos / sin [batch, seq, d_r / 2] fp32 (one set of strides, contiguous last dim), positions [batch, seq]
    integer and inside the buffers (the model clamps or checks them), latent [batch, T, d_c] and k_rope [batch, T,
    d_r] (the cache's buffers, contiguous last dim). keep_latent: also return the new latents [batch, seq, d_c] in
    the cache's dtype, written by the same launch. stats (seq 1, without keep_latent): also EG-MLA's norm
    statistics of the new positions, in the same launch (one program per sequence and head), where a decode step
    otherwise takes two more (`layernorm_stats_triton`: a pass per head, then a merge). q_rope [batch, seq, heads,
    d_r] (a view with a contiguous last dim: the query's RoPE slice): rotated in place by the same launch, where the
    query's own RoPE launch ran otherwise."""
    batch, seq, width = projected.shape
    d_c, d_r = latent.shape[-1], k_rope.shape[-1]
    if width != d_c + d_r or d_r % 2 or projected.stride(-1) != 1:
        raise ValueError(f"latent_append: projected {tuple(projected.shape)} must be [batch, seq, d_c + d_r = "
                         f"{d_c} + {d_r}] with an even d_r and a contiguous last dim")
    for name, t in (("latent", latent), ("k_rope", k_rope)):
        if t.shape[0] != batch or t.stride(-1) != 1:
            raise ValueError(f"latent_append: {name} {tuple(t.shape)} must hold the batch's {batch} rows with a "
                             f"contiguous last dim")
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != (batch, seq, d_r // 2) or table.dtype != torch.float32 or table.stride(-1) != 1:
            raise ValueError(f"latent_append: {name} {tuple(table.shape)} {table.dtype}: expected fp32 [{batch}, "
                             f"{seq}, {d_r // 2}] with a contiguous last dim")
    if cos.stride() != sin.stride():  # the kernel reads both at one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    if tuple(positions.shape) != (batch, seq) or positions.dtype.is_floating_point:
        raise ValueError(f"latent_append: positions {tuple(positions.shape)} {positions.dtype}: expected integer "
                         f"[{batch}, {seq}]")
    if q_rope is not None and (q_rope.dim() != 4 or tuple(q_rope.shape[:2]) != (batch, seq)
                               or q_rope.shape[3] != d_r or q_rope.stride(-1) != 1):
        raise ValueError(f"latent_append: q_rope {tuple(q_rope.shape)} must be [{batch}, {seq}, heads, d_r={d_r}] with a "
                         f"contiguous last dim")
    if stats is not None:
        _append_with_stats(projected, weight, eps, cos, sin, positions, latent, k_rope, keep_latent, stats, q_rope)
        return None
    out = latent.new_empty(batch, seq, d_c) if keep_latent else None
    written = out if keep_latent else latent  # (not written without keep_latent: any pointer will do)
    query = q_rope if q_rope is not None else k_rope.unsqueeze(2)  # (not read without q_rope)
    if batch * seq:
        _latent_append_kernel[(batch * seq,)](
            projected, weight if weight is not None else projected, cos, sin, positions, latent, k_rope, written,
            query, seq, eps, projected.stride(0), projected.stride(1), cos.stride(0), cos.stride(1),
            positions.stride(0), positions.stride(1), latent.stride(0), latent.stride(1), k_rope.stride(0),
            k_rope.stride(1), written.stride(0), written.stride(1), query.stride(0), query.stride(1), query.stride(2),
            D_C=d_c, HALF=d_r // 2, BLOCK_C=block(d_c), BLOCK_H=block(d_r // 2), HAS_WEIGHT=weight is not None,
            HAS_OUT=keep_latent, Q_HEADS=0 if q_rope is None else q_rope.shape[2],
            BLOCK_Q=1 if q_rope is None else block(q_rope.shape[2]), num_warps=1 if d_c <= 256 and q_rope is None else 4)
    return out


def _append_with_stats(projected, weight, eps, cos, sin, positions, latent, k_rope, keep_latent,
                       stats: AppendedStats, q_rope: torch.Tensor | None) -> None:
    from egmla.kernels.egmla_decode import GATE_CODES, _check_egmla_inputs

    batch, seq, _ = projected.shape
    d_c, d_r = latent.shape[-1], k_rope.shape[-1]
    width = stats.wkv_b.shape[0] // stats.n_heads
    _check_egmla_inputs(stats.n_heads, 0, stats.gate_table, stats.wkv_b, stats.gate_op, tuple(GATE_CODES))
    problems = [text for bad, text in (
        (seq != 1 or keep_latent, f"one new token per sequence without keep_latent (got seq={seq}, "
                                  f"keep_latent={keep_latent}): use layernorm_stats_triton for a prompt"),
        (stats.wkv_b.shape[1] != d_c, f"wkv_b {tuple(stats.wkv_b.shape)}: expected [heads * width, d_c={d_c}]"),
        (stats.norm not in ("layernorm", "rmsnorm"), f"norm={stats.norm!r}: choose layernorm or rmsnorm "
                                                     f"('none' has no statistics to store)"),
        (tuple(stats.token_ids.shape) != (batch, 1) or stats.token_ids.dtype.is_floating_point,
         f"token_ids {tuple(stats.token_ids.shape)} {stats.token_ids.dtype}: expected integer [{batch}, 1]"),
        (stats.out.dtype != torch.float32 or stats.out.dim() != 3 or stats.out.shape[0] != batch
         or stats.out.shape[1] != latent.shape[1] or stats.out.shape[2] != 2 or stats.out.stride(2) != 1,
         f"out {tuple(stats.out.shape)} {stats.out.dtype}: expected fp32 [{batch}, {latent.shape[1]}, 2]"),
        (tuple(stats.arrivals.shape) != (batch,) or stats.arrivals.dtype != torch.int32
         or stats.arrivals.stride(0) != 1,
         f"arrivals {tuple(stats.arrivals.shape)} {stats.arrivals.dtype}: expected contiguous int32 [{batch}] zeros"),
        (q_rope is not None and q_rope.shape[2] != stats.n_heads,
         f"q_rope {tuple(q_rope.shape) if q_rope is not None else ()}: expected {stats.n_heads} heads"),
    ) if bad]
    if problems:
        raise ValueError("latent_append(stats=...): " + "; ".join(problems))
    if batch == 0:
        return
    part = torch.empty(batch, stats.n_heads, 2, dtype=torch.float32, device=latent.device)
    query = q_rope[:, 0] if q_rope is not None else k_rope.unsqueeze(1)  # (not read without q_rope)
    _latent_append_stats_kernel[(batch, stats.n_heads)](
        projected, weight if weight is not None else projected, cos, sin, positions, latent, k_rope, query, eps,
        stats.token_ids, stats.gate_table, stats.wkv_b, part, stats.arrivals, stats.out, stats.eps,
        projected.stride(0), cos.stride(0), positions.stride(0), latent.stride(0), latent.stride(1),
        k_rope.stride(0), k_rope.stride(1), query.stride(0), query.stride(1), stats.token_ids.stride(0),
        stats.gate_table.stride(0),
        stats.wkv_b.stride(0), stats.out.stride(0), stats.out.stride(1),
        D_C=d_c, HALF=d_r // 2, BLOCK_C=block(d_c), BLOCK_H=block(d_r // 2), HAS_WEIGHT=weight is not None,
        N_HEADS=stats.n_heads, WIDTH=width, BLOCK_W=block(width), BLOCK_HEADS=block(stats.n_heads),
        GATE=GATE_CODES[stats.gate_op], RMS=stats.norm == "rmsnorm", HAS_Q=q_rope is not None, num_warps=4)
