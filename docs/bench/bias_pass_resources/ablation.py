"""Where the table controls' decode pass spends its registers (2026-12-04): a copy of
egmla/kernels/bias_decode.py's `_bias_decode_kernel` whose parts can be compiled out (the per-id score gather, the
score store, the mean term, the norm statistics), compiled for sm_90 by `egmla bench kernel-resources`' helper, no
GPU needed. Run from the repository root with the GPU's Triton (3.6) first on the path:

    PYTHONPATH=TRITON36_DIR:$PWD python docs/bench/bias_pass_resources/ablation.py > docs/bench/bias_pass_resources/ablation.txt

A diagnostic, not a kernel: nothing imports it; the numbers it printed are in ablation.txt beside it.
"""
import triton
import triton.language as tl
from egmla.kernels.grouped_decode import position_tile
from egmla.kernels.split_combine import split_range
from egmla.bench.kernel_resources import resources

@triton.jit
def k(q_ptr, q_pe_ptr, q_terms_ptr, latent_ptr, k_rope_ptr, stats_ptr, slots_ptr, per_id_ptr, lengths_ptr,
    part_acc_ptr, part_stats_ptr, scores_ptr,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_ab, stride_ah, stride_lb, stride_lt, stride_kb, stride_kt,
    stride_tb, stride_tt, stride_sb, stride_eb, stride_eh, stride_xb, stride_xh, max_len, num_splits, qk_scale,
    N_HEADS: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_ID_SCORE: tl.constexpr, STORE: tl.constexpr, MEAN: tl.constexpr, STATS: tl.constexpr):
    split = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    length = tl.minimum(tl.load(lengths_ptr + batch).to(tl.int32), max_len)
    start, end = split_range(length, split, num_splits, BLOCK_T)
    offs_h, offs_c, offs_r = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    h_mask, c_mask, r_mask = offs_h < N_HEADS, offs_c < D_C, offs_r < D_R
    q = tl.load(q_ptr + batch * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :], mask=h_mask[:, None] & c_mask[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + batch * stride_pb + offs_h[:, None] * stride_ph + offs_r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    terms = q_terms_ptr + batch * stride_ab + offs_h * stride_ah
    alpha_q = tl.load(terms, mask=h_mask, other=0.0).to(tl.float32)
    bias_q = tl.load(terms + 1, mask=h_mask, other=0.0).to(tl.float32)
    per_id_row = per_id_ptr + batch * stride_eb + offs_h[:, None] * stride_eh
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    mean_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < end
        c_tile, r_tile, mu, rho = position_tile(latent_ptr + batch * stride_lb, k_rope_ptr + batch * stride_kb,
                                                stats_ptr + batch * stride_tb, offs_t, t_mask, stride_lt, stride_kt,
                                                stride_tt, offs_c, offs_r, c_mask, r_mask)
        content = tl.dot(q, tl.trans(c_tile), input_precision=DOT_PRECISION)
        rope = tl.dot(q_pe, tl.trans(r_tile), input_precision=DOT_PRECISION)
        if STATS:
            s = rho[None, :] * (content - mu[None, :] * alpha_q[:, None]) + bias_q[:, None] + rope
        else:
            s = content + rope
        if HAS_ID_SCORE:
            slot = tl.load(slots_ptr + batch * stride_sb + offs_t, mask=t_mask, other=0)
            s += tl.load(per_id_row + slot[None, :], mask=h_mask[:, None] & t_mask[None, :], other=0.0).to(tl.float32)
        s = s * qk_scale
        s = tl.where(t_mask[None, :], s, float("-inf"))
        if STORE == 2:  # the same store through a block pointer
            bp = tl.make_block_ptr(scores_ptr + batch * stride_xb, shape=(N_HEADS, max_len), strides=(stride_xh, 1),
                                   offsets=(0, t0), block_shape=(BLOCK_H, BLOCK_T), order=(1, 0))
            tl.store(bp, s, boundary_check=(0, 1))
        if STORE == 1:
            tl.store(scores_ptr + batch * stride_xb + offs_h[:, None] * stride_xh + offs_t[None, :], s, mask=h_mask[:, None] & t_mask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        if STATS:
            w = p * rho[None, :]
        else:
            w = p
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MEAN:
            mean_i = mean_i * alpha + tl.sum(w * mu[None, :], axis=1)
        acc = acc * alpha[:, None] + tl.dot(w.to(c_tile.dtype), c_tile, input_precision=DOT_PRECISION)
        m_i = m_new
    rows = (batch * num_splits + split) * N_HEADS + offs_h
    tl.store(part_acc_ptr + rows[:, None] * D_C + offs_c[None, :], acc, mask=h_mask[:, None] & c_mask[None, :])
    tl.store(part_stats_ptr + rows * 3, m_i, mask=h_mask)
    tl.store(part_stats_ptr + rows * 3 + 1, l_i, mask=h_mask)
    tl.store(part_stats_ptr + rows * 3 + 2, mean_i, mask=h_mask)

pointers = {"q_terms_ptr": "*fp32", "stats_ptr": "*fp32", "slots_ptr": "*i32", "per_id_ptr": "*fp32",
            "lengths_ptr": "*i64", "part_acc_ptr": "*fp32", "part_stats_ptr": "*fp32", "scores_ptr": "*fp32"}
print('id score, score store (0 none, 1 as the kernel, 2 block pointer), mean term, norm statistics; registers per thread')
for idsc, store, mean, stats, warps, stages, tile in [(0,1,1,1,4,2,64),(0,0,1,1,4,2,64),(0,1,0,1,4,2,64),(0,1,1,0,4,2,64),(0,0,0,0,4,2,64),(0,2,1,1,4,2,64),(1,1,1,1,4,2,64),(0,1,1,1,4,3,64),(0,1,1,1,8,2,64),(0,0,1,1,8,2,64),(1,1,1,1,8,2,64),(0,1,1,1,8,2,32),(0,1,1,1,8,2,128),(0,1,1,1,4,2,32),(0,1,1,1,2,2,64)]:
    r = resources(k, dict(N_HEADS=12, D_C=64, D_R=64, BLOCK_H=16, BLOCK_C=64, BLOCK_R=64, BLOCK_T=tile, DOT_PRECISION="tf32",
                  HAS_ID_SCORE=bool(idsc), STORE=store, MEAN=bool(mean), STATS=bool(stats)), pointers, warps, 90, stages)
    print(f"tile {tile:3d} id {idsc} store {store} mean {mean} stats {stats} warps {warps} stages {stages}: regs {r['registers']} spill {r['spill_stack_bytes']} shared {r['shared_bytes']} programs/SM {r['programs_per_sm_by_registers']}")
