"""EG-MLA decode grouped by token id in one persistent Gluon kernel (reference: grouped_decode_ref.py; math:
docs/grouped-decode.md; the `tl` kernels: grouped_decode.py, three launches, the model's path; grouped_fused.py).
Gate placement `up`, gate op `mul`, LayerNorm or RMSNorm; bf16 / fp16, d_n = d_v = d_c = d_r = 64 (paper-base);
NVIDIA GPUs with mma.sync (sm_80 and newer); Triton 3.6 or newer. Exact, and measured 3.6-4.4x slower than the
three launches on an H200 (docs/grouped-decode.md, "The fused kernel in Gluon, measured"): a benchmark launch
setting, not the model's path.

Why Gluon: what the `tl` kernels could not say is that W^K and W^V of a head group stay in shared memory for a
program's whole life, and that the cache rows of the next tile are copied asynchronously while this tile computes.

Grid: two programs per SM, persistent. Program p serves head group p % n_groups (4 heads) and walks the work items
(sequence, block of 16 distinct ids) p // n_groups, + stride, ... Once per program: W^K_h^T and W^V_h of its 4 heads
into shared memory (64 KB). Each item's metadata is loaded, and its gate rows (K half) copied into shared memory,
while the item before computes. Per item:

  1. A^T [d_c, 64] with column j = (head h, id u) = 16 h + u: a_{h,u} = W^K_h^T (gamma^K_h ⊙ q^C_h ⊙ g^K_{h,u}),
     one [64, 64] x [64, 16] tensor-core dot per head, assembled in shared memory, then held in registers.
  2. The item's positions (contiguous in grouped order) in tiles of 64: tile i + 1's rows c_t, k^R_t copied into
     shared memory (cp.async) and its mu_t, rho_t and slots loaded, tile i + 2's positions loaded, while tile i
     computes, for every column j at once:
        s[t, j] = scale (rho_t (c_t . a_j - mu_t gamma^K_h . q_h) + beta^K_h . q_h + k^R_t . q^R_h)
     kept where position t holds id u (its own column), -inf elsewhere; an online softmax *per column* (m_j, l_j,
     sum_t w mu_t) and S^T[:, j] += C^T w[:, j] (w = p rho) as one [64, 64] x [64, 64] dot. A column's softmax
     is that of one id's positions, so no per-tile reduction over heads is needed.
  3. End of item: per head, the 16 columns are rescaled to their largest m, and
        o_h = sum_u g^V_{h,u} ⊙ (W^V_h s_{h,u}) - sum_t w_t mu_t
     as a [64, 64] x [64, 16] dot and a sum over u; (m_h, l_h, o_h) go to the item's partial, which
     grouped_fused._combine_blocks_kernel merges per sequence (the combine is linear in the partials, so
     any split of a sequence's ids works) and finishes with gamma^V, beta^V.

What binds (Nsight Compute, H200): 255 registers and 108 KB of shared memory per program leave 2 warps per
scheduler, and every instruction's latency shows: one issued every ~4 cycles per scheduler.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from egmla.kernels.grouped_decode import GroupedPlan, _check_inputs
from egmla.kernels.mla_decode import LOG2E, _output

HEADS_PER_GROUP = 4
IDS_PER_ITEM = 16  # columns (head, id) = 64, the N of the tile dots
DIM = 64  # d_n = d_v = d_c = d_r the kernel is written for
# A CTA-wide barrier: `thread_barrier` in Triton 3.6 (the GPU image), renamed `barrier` by 3.9
_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
# cp.async from global to shared memory: `async_copy_global_to_shared` in 3.6, `async_load` by 3.9
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


@gluon.jit
def _grouped_gluon_kernel(q_ptr, q_pe_ptr, weight_ptr, bias_ptr, gate_ptr, wkv_b_ptr,
                          latent_ptr, k_rope_ptr, stats_ptr, order_ptr, oslots_ptr, offsets_ptr, ids_ptr,
                          n_distinct_ptr, lengths_ptr, part_acc_ptr, part_ml_ptr,
                          stride_qb, stride_qh, stride_pb, stride_ph, stride_g, stride_w,
                          stride_lb, stride_lt, stride_kb, stride_kt, stride_tb, stride_tt,
                          stride_ob, stride_fb, stride_ib, n_blocks, n_items, capacity, vocab, qk_scale,
                          N_HEADS: gl.constexpr, N_GROUPS: gl.constexpr, HAS_WEIGHT: gl.constexpr,
                          HAS_BIAS: gl.constexpr, WARPS_M: gl.constexpr, WARPS_N: gl.constexpr,
                          ITEMS_ONLY: gl.constexpr, num_warps: gl.constexpr):
    HG: gl.constexpr = 4
    BU: gl.constexpr = 16
    BT: gl.constexpr = 64
    D: gl.constexpr = 64
    J: gl.constexpr = HG * BU
    WIDTH: gl.constexpr = 2 * D  # one head's rows of wkv_b / the gate / the norm: [k_nope; v]
    dtype: gl.constexpr = latent_ptr.dtype.element_ty

    # Layouts: one mma.sync accumulator layout (WARPS_M x WARPS_N warps) for every dot; 16-byte vectors for loads.
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS_M, WARPS_N], instr_shape=[16, 8])
    op_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    op_b: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    rows: gl.constexpr = gl.SliceLayout(1, mma)
    cols: gl.constexpr = gl.SliceLayout(0, mma)
    tile_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])  # [64, 64], rows contiguous
    trans_l: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, num_warps], [0, 1])  # [64, *], columns contiguous
    smem_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    pid = gl.program_id(0)
    group = pid % N_GROUPS
    head0 = group * HG
    item_stride = gl.num_programs(0) // N_GROUPS

    # W^K_h^T [c, n] and W^V_h [v, c] of the group's heads, in shared memory for the program's life
    wk_smem = gl.allocate_shared_memory(dtype, [HG, D, D], smem_l)
    wv_smem = gl.allocate_shared_memory(dtype, [HG, D, D], smem_l)
    tr_r = gl.arange(0, D, layout=gl.SliceLayout(1, trans_l))
    tr_c = gl.arange(0, D, layout=gl.SliceLayout(0, trans_l))
    ti_r = gl.arange(0, D, layout=gl.SliceLayout(1, tile_l))
    ti_c = gl.arange(0, D, layout=gl.SliceLayout(0, tile_l))
    for h in gl.static_range(HG):
        head = head0 + h
        live = head < N_HEADS
        w_kt = gl.load(wkv_b_ptr + (head * WIDTH + tr_c[None, :]) * stride_w + tr_r[:, None],
                       mask=live & (tr_r[:, None] < D), other=0.0)
        wk_smem.index(h).store(w_kt)
        w_v = gl.load(wkv_b_ptr + (head * WIDTH + D + ti_r[:, None]) * stride_w + ti_c[None, :],
                      mask=live & (ti_r[:, None] < D), other=0.0)
        wv_smem.index(h).store(w_v)

    a_smem = gl.allocate_shared_memory(dtype, [J, D], smem_l)  # the next item's gate rows (K half), then A [J, d_c]
    c_smem = gl.allocate_shared_memory(dtype, [2, BT, D], smem_l)  # double-buffered cache tiles
    r_smem = gl.allocate_shared_memory(dtype, [2, BT, D], smem_l)

    offs_j = gl.arange(0, J, layout=cols)
    u_of_j = gl.where(head0 + offs_j // BU < N_HEADS, offs_j % BU, -BU)  # a column past the heads matches no id
    h_of_j = offs_j // BU
    offs_tr = gl.arange(0, BT, layout=rows)  # positions of a tile, as the scores' rows
    # [J, D] views for the per-column query terms (row j reads head j // 16)
    qj_r = gl.arange(0, J, layout=gl.SliceLayout(1, tile_l))
    q_head = head0 + qj_r // BU
    q_live = (q_head < N_HEADS)[:, None] & (ti_c < D)[None, :]
    # [v, u] gate rows of the up-projection, in the accumulator layout
    g_v = gl.arange(0, D, layout=rows)
    g_u = gl.arange(0, BU, layout=cols)

    item = pid // N_GROUPS
    # Each item's metadata is loaded one item ahead (in flight while the item before computes)
    n_ids_n, length_n, start_n, stop_n, ids_n = _item_meta(item, n_blocks, n_items, n_distinct_ptr, lengths_ptr,
                                                           offsets_ptr, ids_ptr, stride_fb, stride_ib, capacity, vocab,
                                                           qj_r, BU)
    # and its gate rows (K half) are copied into a_smem one item ahead: an item's absorb waits on nothing
    _copy_gate_rows(a_smem, gate_ptr, ids_n, stride_g, head0, qj_r, ti_c, N_HEADS, WIDTH, BU)
    async_copy.commit_group()
    while item < n_items:
        n_ids, length, start, stop = n_ids_n, length_n, start_n, stop_n
        batch = (item // n_blocks).to(gl.int64)
        blk = item % n_blocks
        first = blk * BU
        n_ids_n, length_n, start_n, stop_n, ids_n = _item_meta(item + item_stride, n_blocks, n_items, n_distinct_ptr,
                                                               lengths_ptr, offsets_ptr, ids_ptr, stride_fb, stride_ib,
                                                               capacity, vocab, qj_r, BU)
        if first < n_ids:
            end = gl.where(first + BU < n_ids, stop, length)
            async_copy.wait_group(0)  # the gate rows (copied during the item before, or just now)
            latent_row = latent_ptr + batch * stride_lb
            k_rope_row = k_rope_ptr + batch * stride_kb
            order_row = order_ptr + batch * stride_ob
            oslots_row = oslots_ptr + batch * stride_ob
            stats_row = stats_ptr + batch * stride_tb
            # tile 0's rows in flight while the item's queries are absorbed; tile 1's positions loaded
            t_in = start + ti_r
            pos = gl.load(order_row + t_in, mask=t_in < end, other=0)
            _async_load(c_smem.index(0), latent_row + pos.to(gl.int64)[:, None] * stride_lt + ti_c[None, :],
                        mask=(t_in < end)[:, None])
            _async_load(r_smem.index(0), k_rope_row + pos.to(gl.int64)[:, None] * stride_kt + ti_c[None, :],
                        mask=(t_in < end)[:, None])
            async_copy.commit_group()
            t_rows = start + offs_tr
            pos_rows = gl.load(order_row + t_rows, mask=t_rows < end, other=0)
            t_next = start + BT + ti_r
            pos_next = gl.load(order_row + t_next, mask=t_next < end, other=0)
            t_next_rows = start + BT + offs_tr
            pos_next_rows = gl.load(order_row + t_next_rows, mask=t_next_rows < end, other=0)
            # tile 0's per-position numbers: the norm statistics and the id's index within the item
            mu = gl.load(stats_row + pos_rows.to(gl.int64) * stride_tt, mask=t_rows < end, other=0.0)
            rho = gl.load(stats_row + pos_rows.to(gl.int64) * stride_tt + 1, mask=t_rows < end, other=0.0)
            u_t = gl.load(oslots_row + t_rows, mask=t_rows < end, other=-1) - first

            # 1. gate rows of the item's ids (K half now, V half for the end), per-column query terms, A^T
            ids_v = gl.load(ids_ptr + batch * stride_ib + first + g_u, mask=first + g_u < capacity, other=0)
            ids_v = gl.minimum(gl.maximum(ids_v, 0), vocab - 1).to(gl.int64)  # (ids past n_ids: any valid row)
            gate_v0 = gl.load(gate_ptr + ids_v[None, :] * stride_g + gl.minimum(head0, N_HEADS - 1) * WIDTH + D + g_v[:, None])
            gate_v1 = gl.load(gate_ptr + ids_v[None, :] * stride_g + gl.minimum(head0 + 1, N_HEADS - 1) * WIDTH + D + g_v[:, None])
            gate_v2 = gl.load(gate_ptr + ids_v[None, :] * stride_g + gl.minimum(head0 + 2, N_HEADS - 1) * WIDTH + D + g_v[:, None])
            gate_v3 = gl.load(gate_ptr + ids_v[None, :] * stride_g + gl.minimum(head0 + 3, N_HEADS - 1) * WIDTH + D + g_v[:, None])
            q_rows = gl.load(q_ptr + batch * stride_qb + q_head[:, None] * stride_qh + ti_c[None, :], mask=q_live,
                             other=0.0).to(gl.float32)  # [J, D]
            gq_rows = q_rows
            if HAS_WEIGHT:
                gq_rows = q_rows * gl.load(weight_ptr + q_head[:, None] * WIDTH + ti_c[None, :], mask=q_live,
                                           other=0.0).to(gl.float32)
            q_sum = gl.convert_layout(gl.sum(gq_rows, axis=1), cols)
            q_bias = gl.zeros([J], gl.float32, layout=cols)
            if HAS_BIAS:
                q_bias = gl.convert_layout(gl.sum(q_rows * gl.load(bias_ptr + q_head[:, None] * WIDTH + ti_c[None, :],
                                                                   mask=q_live, other=0.0).to(gl.float32), axis=1), cols)
                q_bias = q_bias * qk_scale
            pe_head = head0 + tr_c // BU
            q_pe_t = gl.load(q_pe_ptr + batch * stride_pb + pe_head[None, :] * stride_ph + tr_r[:, None],
                             mask=(pe_head < N_HEADS)[None, :] & (tr_r < D)[:, None], other=0.0)
            q_pe_op = gl.convert_layout((q_pe_t.to(gl.float32) * qk_scale).to(dtype), op_b)  # [d_r, J]: q^R of head j // 16
            _barrier()  # this item's gate rows (copied during the item before) are visible to every thread
            # X_h [u, n] = g^K_{h,u} ⊙ gamma^K_h ⊙ q_h in place (row j = 16 h + u of a_smem; gq_rows has the same rows)
            a_smem.store((a_smem.load(tile_l).to(gl.float32) * gq_rows).to(dtype))
            _barrier()
            a_t0 = mma_v2(wk_smem.index(0).load(op_a), a_smem.slice(0, BU).permute((1, 0)).load(op_b),
                          gl.zeros([D, BU], gl.float32, layout=mma))
            a_t1 = mma_v2(wk_smem.index(1).load(op_a), a_smem.slice(BU, BU).permute((1, 0)).load(op_b),
                          gl.zeros([D, BU], gl.float32, layout=mma))
            a_t2 = mma_v2(wk_smem.index(2).load(op_a), a_smem.slice(2 * BU, BU).permute((1, 0)).load(op_b),
                          gl.zeros([D, BU], gl.float32, layout=mma))
            a_t3 = mma_v2(wk_smem.index(3).load(op_a), a_smem.slice(3 * BU, BU).permute((1, 0)).load(op_b),
                          gl.zeros([D, BU], gl.float32, layout=mma))
            _barrier()
            a_smem.slice(0, BU).permute((1, 0)).store(a_t0.to(dtype))
            a_smem.slice(BU, BU).permute((1, 0)).store(a_t1.to(dtype))
            a_smem.slice(2 * BU, BU).permute((1, 0)).store(a_t2.to(dtype))
            a_smem.slice(3 * BU, BU).permute((1, 0)).store(a_t3.to(dtype))
            _barrier()
            a_op = a_smem.permute((1, 0)).load(op_b)  # [d_c, J]
            _barrier()  # every warp holds A^T: the next item's gate rows may overwrite it
            _copy_gate_rows(a_smem, gate_ptr, ids_n, stride_g, head0, qj_r, ti_c, N_HEADS, WIDTH, BU)
            async_copy.commit_group()

            # 2. the item's positions in tiles: tile i + 1's rows copied and its numbers loaded while tile i computes,
            # tile i + 2's positions loaded
            m = gl.full([J], float("-inf"), gl.float32, layout=cols)
            l = gl.zeros([J], gl.float32, layout=cols)
            mean_sum = gl.zeros([J], gl.float32, layout=cols)
            sums_t = gl.zeros([D, J], gl.float32, layout=mma)  # S^T [d_c, J]
            n_tiles = gl.cdiv(end - start, BT)
            for i in range(n_tiles if not ITEMS_ONLY else 0):
                tile = start + i * BT
                cur = i % 2
                _barrier()  # every warp is done with the buffer the copy overwrites
                t_next = tile + BT + ti_r
                next_mask = t_next < end
                _async_load(c_smem.index(1 - cur), latent_row + pos_next.to(gl.int64)[:, None] * stride_lt + ti_c[None, :],
                            mask=next_mask[:, None])
                _async_load(r_smem.index(1 - cur), k_rope_row + pos_next.to(gl.int64)[:, None] * stride_kt + ti_c[None, :],
                            mask=next_mask[:, None])
                async_copy.commit_group()
                t_next_rows = tile + BT + offs_tr
                next_rows = t_next_rows < end
                mu_next = gl.load(stats_row + pos_next_rows.to(gl.int64) * stride_tt, mask=next_rows, other=0.0)
                rho_next = gl.load(stats_row + pos_next_rows.to(gl.int64) * stride_tt + 1, mask=next_rows, other=0.0)
                u_next = gl.load(oslots_row + t_next_rows, mask=next_rows, other=-1) - first
                t_after = tile + 2 * BT + ti_r
                pos_next = gl.load(order_row + t_after, mask=t_after < end, other=0)
                t_after_rows = tile + 2 * BT + offs_tr
                pos_next_rows = gl.load(order_row + t_after_rows, mask=t_after_rows < end, other=0)

                async_copy.wait_group(1)
                _barrier()  # every thread's copies of this tile have landed
                c_tile = c_smem.index(cur)
                content = mma_v2(c_tile.load(op_a), a_op, gl.zeros([BT, J], gl.float32, layout=mma))
                # (the scale and log2(e) are folded into rho, q_bias and q^R: s is in the log2 domain)
                rho_s = rho * qk_scale
                x = rho_s[:, None] * content - (rho_s * mu)[:, None] * q_sum[None, :] + q_bias[None, :]
                s = mma_v2(r_smem.index(cur).load(op_a), q_pe_op, x)  # + k^R . q^R
                own = u_t[:, None] == u_of_j[None, :]  # (positions past the item have u_t < 0)
                s = gl.where(own, s, float("-inf"))
                m_new = gl.maximum(m, gl.max(s, axis=0))
                m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = gl.exp2(m - m_use)
                p = gl.exp2(s - m_use[None, :])
                l = l * alpha + gl.sum(p, axis=0)
                w = p * rho[:, None]
                mean_sum = mean_sum * alpha + gl.sum(w * mu[:, None], axis=0)
                w_op = gl.convert_layout(w.to(dtype), op_b)  # [T, J]
                sums_t = mma_v2(c_tile.permute((1, 0)).load(op_a), w_op, sums_t * alpha[None, :])
                m = m_new
                mu, rho, u_t = mu_next, rho_next, u_next
            async_copy.wait_group(0)

            # 3. per head: columns rescaled to the head's largest m, up-projected, gated, summed over ids
            m_head = gl.full([J], float("-inf"), gl.float32, layout=cols)
            for h in gl.static_range(HG):
                in_h = h_of_j == h
                m_head = gl.where(in_h, gl.max(gl.where(in_h, m, float("-inf")), axis=0), m_head)
            scale_j = gl.exp2(m - gl.where(m_head == float("-inf"), 0.0, m_head))
            l_j = l * scale_j
            mean_j = mean_sum * scale_j
            sums_smem = c_smem.index(0)  # S^T [d_c, J], in the first tile buffer (all copies landed, all reads done)
            _barrier()
            sums_smem.store((sums_t * scale_j[None, :]).to(dtype))
            _barrier()
            part = (batch * n_blocks + blk) * N_HEADS
            _item_output(wv_smem.index(0), sums_smem.slice(0, BU, dim=1), gate_v0, mean_j, m, l_j, h_of_j == 0, head0,
                         part, part_acc_ptr, part_ml_ptr, g_v, N_HEADS, D, BU, op_a, op_b, mma)
            _item_output(wv_smem.index(1), sums_smem.slice(BU, BU, dim=1), gate_v1, mean_j, m, l_j, h_of_j == 1,
                         head0 + 1, part, part_acc_ptr, part_ml_ptr, g_v, N_HEADS, D, BU, op_a, op_b, mma)
            _item_output(wv_smem.index(2), sums_smem.slice(2 * BU, BU, dim=1), gate_v2, mean_j, m, l_j, h_of_j == 2,
                         head0 + 2, part, part_acc_ptr, part_ml_ptr, g_v, N_HEADS, D, BU, op_a, op_b, mma)
            _item_output(wv_smem.index(3), sums_smem.slice(3 * BU, BU, dim=1), gate_v3, mean_j, m, l_j, h_of_j == 3,
                         head0 + 3, part, part_acc_ptr, part_ml_ptr, g_v, N_HEADS, D, BU, op_a, op_b, mma)
        else:  # an empty item (bounds past the sequence's ids): nothing reads a_smem, copy the next item's rows
            async_copy.wait_group(0)  # (after the copy already in flight into it)
            _copy_gate_rows(a_smem, gate_ptr, ids_n, stride_g, head0, qj_r, ti_c, N_HEADS, WIDTH, BU)
            async_copy.commit_group()
        item += item_stride


@gluon.jit
def _copy_gate_rows(smem, gate_ptr, ids_rows, stride_g, head0, offs_j, offs_n, N_HEADS: gl.constexpr,
                    WIDTH: gl.constexpr, BU: gl.constexpr):
    """cp.async row j = 16 h + u of smem [J, d_n] <- g^K of head head0 + h for id ids_rows[j] (heads past the
    last: the last head's row, never used)."""
    head = gl.minimum(head0 + offs_j // BU, N_HEADS - 1)
    _async_load(smem, gate_ptr + ids_rows.to(gl.int64)[:, None] * stride_g + (head * WIDTH)[:, None] + offs_n[None, :])


@gluon.jit
def _item_meta(item, n_blocks, n_items, n_distinct_ptr, lengths_ptr, offsets_ptr, ids_ptr, stride_fb, stride_ib,
               capacity, vocab, offs_j, BU: gl.constexpr):
    """(distinct ids, length, first position in grouped order, where the block after starts (if any), the id of
    each row j = 16 h + u) of work item `item` = (sequence, block of BU ids); independent loads, in flight together.
    Ids past the sequence's (bounds sized for graph capture) are clamped to a valid row: their columns get no
    positions."""
    live = item < n_items
    batch = (gl.where(live, item, 0) // n_blocks).to(gl.int64)
    first = (item % n_blocks) * BU
    n_ids = gl.load(n_distinct_ptr + batch, mask=live, other=0)
    length = gl.load(lengths_ptr + batch)
    start = gl.load(offsets_ptr + batch * stride_fb + first, mask=live & (first < capacity), other=0)
    stop = gl.load(offsets_ptr + batch * stride_fb + first + BU, mask=live & (first + BU < capacity), other=0)
    slot = first + offs_j % BU
    ids = gl.load(ids_ptr + batch * stride_ib + slot, mask=live & (slot < capacity), other=0)
    return n_ids, length, start, stop, gl.minimum(gl.maximum(ids, 0), vocab - 1)


@gluon.jit
def _item_output(w_v, sums_h, gate_v, mean_j, m, l_j, in_h, head, part, part_acc_ptr, part_ml_ptr, offs_v,
                 N_HEADS: gl.constexpr, D: gl.constexpr, BU: gl.constexpr, op_a: gl.constexpr, op_b: gl.constexpr,
                 mma: gl.constexpr):
    """One head's partial: o = sum_u g^V_u ⊙ (W^V s_u) - sum_t w_t mu_t, and (m, l)."""
    up = mma_v2(w_v.load(op_a), sums_h.load(op_b), gl.zeros([D, BU], gl.float32, layout=mma))  # [d_v, u]
    o = gl.sum(up * gate_v.to(gl.float32), axis=1) - gl.sum(gl.where(in_h, mean_j, 0.0), axis=0)
    m_h = gl.max(gl.where(in_h, m, float("-inf")), axis=0)
    l_h = gl.sum(gl.where(in_h, l_j, 0.0), axis=0)
    if head < N_HEADS:
        gl.store(part_acc_ptr + (part + head) * D + offs_v, o)
        gl.store(part_ml_ptr + (part + head) * 2, m_h)
        gl.store(part_ml_ptr + (part + head) * 2 + 1, l_h)


def supported(q_nope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, wkv_b: torch.Tensor) -> str | None:
    """None when the kernel runs these inputs, else why not."""
    if latent.device.type != "cuda" or torch.version.cuda is None:
        return "needs an NVIDIA GPU"
    if torch.cuda.get_device_capability(latent.device)[0] < 8:
        return "needs tensor cores with mma.sync (sm_80 or newer)"
    if latent.dtype not in (torch.bfloat16, torch.float16):
        return f"runs bf16 / fp16, not {latent.dtype}"
    d_n, d_c, d_r = q_nope.shape[-1], latent.shape[-1], k_rope.shape[-1]
    d_v = wkv_b.shape[0] // q_nope.shape[1] - d_n
    if (d_n, d_v, d_c, d_r) != (DIM,) * 4:
        return f"is written for d_n = d_v = d_c = d_r = {DIM}, got {(d_n, d_v, d_c, d_r)}"
    return None


def grouped_decode_gluon(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                         ln_stats: torch.Tensor, plan: GroupedPlan, gate_table: torch.Tensor, wkv_b: torch.Tensor,
                         norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, scale: float,
                         programs_per_sm: int = 2, warps: tuple[int, int] = (2, 2),
                         max_registers: int | None = None, items_only: bool = False,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """o [batch, heads, d_v] (dtype of latent): same function as `grouped_decode_ref`, same inputs as
    grouped_decode.grouped_decode. `programs_per_sm` persistent programs per SM (rounded to whole head groups),
    `warps` the (rows, columns) warps of the dots, `max_registers` a cap on registers per thread (ptxas spills past
    it). items_only: skip the position tiles, a timing aid only (the output is wrong): what the per-item work costs."""
    from egmla.kernels.studies.grouped_fused import _combine_blocks_kernel

    d_v = _check_inputs(q_nope, q_pe, latent, k_rope, ln_stats, plan, gate_table, wkv_b)
    reason = supported(q_nope, latent, k_rope, wkv_b)
    if reason is not None:
        raise ValueError(f"grouped_decode_gluon {reason}; use grouped_decode (the Triton `tl` launches)")
    batch, heads, _ = q_nope.shape
    out = _output(out, (batch, heads, d_v), latent)
    if plan.max_len == 0 or batch == 0:
        return out.zero_()
    device = latent.device
    n_blocks = triton.cdiv(max(plan.max_distinct, 1), IDS_PER_ITEM)
    n_groups = triton.cdiv(heads, HEADS_PER_GROUP)
    n_items = batch * n_blocks
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per_group = max(1, min(n_items, sms * programs_per_sm // n_groups))
    assert plan.order_slots.stride(0) == plan.order.stride(0), "order and order_slots share their row stride"
    part_acc = torch.empty(batch, n_blocks, heads, d_v, dtype=torch.float32, device=device)
    part_ml = torch.empty(batch, n_blocks, heads, 2, dtype=torch.float32, device=device)
    weight, bias = (norm_weight if norm_weight is not None else wkv_b), (norm_bias if norm_bias is not None else wkv_b)
    flags = dict(HAS_WEIGHT=norm_weight is not None, HAS_BIAS=norm_bias is not None)
    _grouped_gluon_kernel[(per_group * n_groups,)](
        q_nope, q_pe, weight, bias, gate_table, wkv_b, latent, k_rope, ln_stats, plan.order, plan.order_slots,
        plan.offsets, plan.distinct_ids, plan.n_distinct, plan.lengths, part_acc, part_ml,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), gate_table.stride(0), wkv_b.stride(0),
        latent.stride(0), latent.stride(1), k_rope.stride(0), k_rope.stride(1), ln_stats.stride(0), ln_stats.stride(1),
        plan.order.stride(0), plan.offsets.stride(0), plan.distinct_ids.stride(0),
        n_blocks, n_items, min(plan.offsets.shape[1], plan.distinct_ids.shape[1]), gate_table.shape[0], scale * LOG2E,
        N_HEADS=heads, N_GROUPS=n_groups, WARPS_M=warps[0], WARPS_N=warps[1], num_warps=warps[0] * warps[1],
        ITEMS_ONLY=items_only, **flags, **({"maxnreg": max_registers} if max_registers else {}))
    _combine_blocks_kernel[(heads, batch)](
        part_acc, part_ml, plan.n_distinct, out, weight, bias, n_blocks, out.stride(0), out.stride(1),
        N_HEADS=heads, D_N=DIM, D_V=d_v, BLOCK_V=DIM, BLOCK_S=16, BLOCK_U=IDS_PER_ITEM, num_warps=2, **flags)
    return out
