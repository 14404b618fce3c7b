import triton
import triton.language as tl
from egmla.kernels.pdl import wait as pdl_wait
from egmla.kernels.split_combine import split_range
@triton.jit
def _v1(
    q_latent_ptr, q_pe_ptr, latent_ptr, k_rope_ptr, lengths_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_lb, stride_lt, stride_kb, stride_kt,
    stride_ob, stride_oh, max_len, num_splits, qk_scale,
    N_HEADS: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ONE_SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)  # the query and the cache row come from the kernels right before
    split = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements at large batch
    length = tl.minimum(tl.load(lengths_ptr + batch).to(tl.int32), max_len)
    start, end = split_range(length, split, num_splits, BLOCK_T)

    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    h_mask, c_mask, r_mask = offs_h < N_HEADS, offs_c < D_C, offs_r < D_R
    q = tl.load(q_latent_ptr + batch * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                mask=h_mask[:, None] & c_mask[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + batch * stride_pb + offs_h[:, None] * stride_ph + offs_r[None, :],
                   mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    latent_base = latent_ptr + batch * stride_lb
    k_rope_base = k_rope_ptr + batch * stride_kb

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < end
        # .to: an fp8 cache is widened to the query's dtype as it is read (a no-op for a cache of that dtype)
        c_tile = tl.load(latent_base + offs_t[:, None] * stride_lt + offs_c[None, :],
                         mask=t_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float16)
        r_tile = tl.load(k_rope_base + offs_t[:, None] * stride_kt + offs_r[None, :],
                         mask=t_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float16)
        s = tl.dot(q.to(tl.float16), tl.trans(c_tile), input_precision=DOT_PRECISION)
        s += tl.dot(q_pe.to(tl.float16), tl.trans(r_tile), input_precision=DOT_PRECISION)
        s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))  # log2 domain: exp2 below
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c_tile.dtype), c_tile, input_precision=DOT_PRECISION)
        m_i = m_new

    out_ptrs = out_ptr + batch * stride_ob + offs_h[:, None] * stride_oh + offs_c[None, :]
    hc_mask = h_mask[:, None] & c_mask[None, :]
    if ONE_SPLIT:
        y = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=hc_mask)
    else:
        rows = (batch * num_splits + split) * N_HEADS + offs_h
        tl.store(part_acc_ptr + rows[:, None] * D_C + offs_c[None, :], acc, mask=hc_mask)
        tl.store(part_ml_ptr + rows * 2, m_i, mask=h_mask)
        tl.store(part_ml_ptr + rows * 2 + 1, l_i, mask=h_mask)



@triton.jit
def _v2(
    q_latent_ptr, q_pe_ptr, latent_ptr, k_rope_ptr, lengths_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_lb, stride_lt, stride_kb, stride_kt,
    stride_ob, stride_oh, max_len, num_splits, qk_scale,
    N_HEADS: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ONE_SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)  # the query and the cache row come from the kernels right before
    split = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements at large batch
    length = tl.minimum(tl.load(lengths_ptr + batch).to(tl.int32), max_len)
    start, end = split_range(length, split, num_splits, BLOCK_T)

    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    h_mask, c_mask, r_mask = offs_h < N_HEADS, offs_c < D_C, offs_r < D_R
    q = tl.load(q_latent_ptr + batch * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                mask=h_mask[:, None] & c_mask[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + batch * stride_pb + offs_h[:, None] * stride_ph + offs_r[None, :],
                   mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    latent_base = latent_ptr + batch * stride_lb
    k_rope_base = k_rope_ptr + batch * stride_kb

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < end
        # .to: an fp8 cache is widened to the query's dtype as it is read (a no-op for a cache of that dtype)
        c_tile = tl.load(latent_base + offs_t[:, None] * stride_lt + offs_c[None, :],
                         mask=t_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32).__mul__(qk_scale * 0 + 1.0).to(q.dtype)
        r_tile = tl.load(k_rope_base + offs_t[:, None] * stride_kt + offs_r[None, :],
                         mask=t_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32).__mul__(qk_scale * 0 + 1.0).to(q_pe.dtype)
        s = tl.dot(q, tl.trans(c_tile), input_precision=DOT_PRECISION)
        s += tl.dot(q_pe, tl.trans(r_tile), input_precision=DOT_PRECISION)
        s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))  # log2 domain: exp2 below
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c_tile.dtype), c_tile, input_precision=DOT_PRECISION)
        m_i = m_new

    out_ptrs = out_ptr + batch * stride_ob + offs_h[:, None] * stride_oh + offs_c[None, :]
    hc_mask = h_mask[:, None] & c_mask[None, :]
    if ONE_SPLIT:
        y = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=hc_mask)
    else:
        rows = (batch * num_splits + split) * N_HEADS + offs_h
        tl.store(part_acc_ptr + rows[:, None] * D_C + offs_c[None, :], acc, mask=hc_mask)
        tl.store(part_ml_ptr + rows * 2, m_i, mask=h_mask)
        tl.store(part_ml_ptr + rows * 2 + 1, l_i, mask=h_mask)



@triton.jit
def _v3(
    q_latent_ptr, q_pe_ptr, latent_ptr, k_rope_ptr, lengths_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_lb, stride_lt, stride_kb, stride_kt,
    stride_ob, stride_oh, max_len, num_splits, qk_scale,
    N_HEADS: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ONE_SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)  # the query and the cache row come from the kernels right before
    split = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements at large batch
    length = tl.minimum(tl.load(lengths_ptr + batch).to(tl.int32), max_len)
    start, end = split_range(length, split, num_splits, BLOCK_T)

    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    h_mask, c_mask, r_mask = offs_h < N_HEADS, offs_c < D_C, offs_r < D_R
    q = tl.load(q_latent_ptr + batch * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                mask=h_mask[:, None] & c_mask[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + batch * stride_pb + offs_h[:, None] * stride_ph + offs_r[None, :],
                   mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    latent_base = latent_ptr + batch * stride_lb
    k_rope_base = k_rope_ptr + batch * stride_kb

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < end
        # .to: an fp8 cache is widened to the query's dtype as it is read (a no-op for a cache of that dtype)
        c_tile = tl.load(latent_base + offs_t[:, None] * stride_lt + offs_c[None, :],
                         mask=t_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32).__mul__(qk_scale * 0 + 1.0).to(tl.float16)
        r_tile = tl.load(k_rope_base + offs_t[:, None] * stride_kt + offs_r[None, :],
                         mask=t_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float16)
        s = tl.dot(q.to(tl.float16), tl.trans(c_tile), input_precision=DOT_PRECISION)
        s += tl.dot(q_pe.to(tl.float16), tl.trans(r_tile), input_precision=DOT_PRECISION)
        s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))  # log2 domain: exp2 below
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c_tile.dtype), c_tile, input_precision=DOT_PRECISION)
        m_i = m_new

    out_ptrs = out_ptr + batch * stride_ob + offs_h[:, None] * stride_oh + offs_c[None, :]
    hc_mask = h_mask[:, None] & c_mask[None, :]
    if ONE_SPLIT:
        y = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=hc_mask)
    else:
        rows = (batch * num_splits + split) * N_HEADS + offs_h
        tl.store(part_acc_ptr + rows[:, None] * D_C + offs_c[None, :], acc, mask=hc_mask)
        tl.store(part_ml_ptr + rows * 2, m_i, mask=h_mask)
        tl.store(part_ml_ptr + rows * 2 + 1, l_i, mask=h_mask)


