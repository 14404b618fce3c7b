// EG-MLA decode grouped by token id, one fused launch in CUDA (issue 17). Python side, math and layouts:
// grouped_decode_cuda.py; reference: grouped_decode_ref.py; the equations: docs/grouped-decode.md.
//
// One block of HPB warps per (segment of SEG grouped positions, sequence, group of HPB heads); warp w is head
// HPB * group + w. The segment's
// positions are sorted by slot (the plan's grouped order), so its distinct ids are the contiguous slots
// [first, last], and the positions of any 16 consecutive slots are contiguous too. Per block of 16 ids:
//   absorb   A_h = (gq_h ⊙ G^K_h[ids]) W^K_h            [16 ids, d_c]   mma, into shared memory (bf16)
//   per tile of 32 positions (loaded once into shared memory for all warps):
//     scores  C_tile A_hᵀ [32, 16] (each position keeps its own id's column) and K^R_tile q^R_h, mma
//     online softmax per head; S_h += P_h C_tile with P_h[u, t] = p_t rho_t where t has id u     mma
//   up-project  U_h = S_h W^V_hᵀ [16 ids, d_v] (mma, S_h straight from the accumulators), o_h += Σ_u G^V_h[u] ⊙ U_h[u]
// No per-(sequence, id) intermediate leaves the chip. Each block writes unnormalised partials (o, m, l, Σ p rho mu)
// per head; grouped_combine merges a sequence's segments and applies the value slice's norm affine.
//
// Compile-time: N_HEADS (<= 16), HPB heads per block (a divisor of N_HEADS: blocks of a segment split the heads),
// SEG (a multiple of 32), MIN_BLOCKS (blocks per SM the register allocation must allow). d_n = d_v = d_c = d_r = 64 (paper-base heads; other
// shapes take the Triton kernels). Inputs bf16 except the fp32 statistics, norm affines and outputs.

#define D 64
#define TILE 32
#define IDS 16
#define CK_STRIDE 136   // bf16 per row of the [c ; k^R] tile: 128 + 8 so that fragment loads hit 32 banks
#define CT_STRIDE 40    // bf16 per row of the transposed latent tile [d_c][TILE + 8]
#define A_STRIDE 72     // bf16 per row of a warp's absorbed queries [IDS][d_c + 8]
#define THREADS (HPB * 32)
#define CHUNKS ((TILE * 16 + THREADS - 1) / THREADS)  // 16-byte pieces of the tile each thread loads

typedef unsigned short bf16;
typedef unsigned int u32;

__device__ __forceinline__ float lo_f(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float hi_f(u32 v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {  // round to nearest even; lo in the low half
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
// D += A B, m16n8k16, bf16 in, fp32 accumulate. With g = lane / 4 and t = lane % 4:
//   a[0] (row g, cols 2t, 2t+1), a[1] (row g+8, ...), a[2] (row g, cols 2t+8, 2t+9), a[3] (row g+8, cols 2t+8, ...)
//   b[0] (rows 2t, 2t+1, col g), b[1] (rows 2t+8, 2t+9, col g);  d[0..1] (row g, cols 2t, 2t+1), d[2..3] (row g+8)
__device__ __forceinline__ void mma(float* d, const u32* a, const u32* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ u32 ldg32(const bf16* p) { return __ldg(reinterpret_cast<const unsigned int*>(p)); }
__device__ __forceinline__ u32 lds32(const bf16* p) { return *reinterpret_cast<const u32*>(p); }
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

struct Smem {
  int pos[SEG];                      // cache position of each grouped position of the segment
  int slot[SEG];                     // its slot (distinct-id index)
  bf16 ck[TILE][CK_STRIDE];          // the tile's [c_t ; k^R_t]
  bf16 ct[D][CT_STRIDE];             // the tile's c, transposed
  float mu[TILE], rho[TILE];
  int u[TILE];                       // id index within the current block of 16, -1 where the row is not real
  bf16 a[HPB][IDS][A_STRIDE];        // absorbed queries, per warp
  float gq[HPB][D];                  // gamma^K ⊙ q^C per head
  float w[HPB][TILE];                // p_t rho_t of the tile, per warp
  float score[HPB][TILE];            // the content term of the tile's scores, per warp
  float rope[HPB][TILE];
};

// The next tile's loads, issued before the current tile's work so that their latency hides behind it.
struct Prefetch {
  uint4 v[CHUNKS];
  float mu, rho;
  int u;
};

__device__ __forceinline__ void fetch_tile(Prefetch& f, const Smem& sm, int p, int p1, int lo, const bf16* latent_b,
                                           const bf16* k_rope_b, const float* stats_b, long long stride_lt,
                                           long long stride_kt, long long stride_st) {
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    const int chunk = threadIdx.x + i * THREADS, r = chunk >> 4, part = chunk & 15;
    f.v[i] = make_uint4(0u, 0u, 0u, 0u);
    if (chunk < TILE * 16 && p + r < p1) {
      const long long pos = sm.pos[p + r];
      const bf16* src = part < 8 ? latent_b + pos * stride_lt + part * 8 : k_rope_b + pos * stride_kt + (part - 8) * 8;
      f.v[i] = __ldg(reinterpret_cast<const uint4*>(src));
    }
  }
  if (threadIdx.x < TILE) {
    const int r = threadIdx.x;
    const bool real = p + r < p1;
    const long long pos = real ? sm.pos[p + r] : 0;
    f.mu = real ? __ldg(stats_b + pos * stride_st) : 0.f;
    f.rho = real ? __ldg(stats_b + pos * stride_st + 1) : 0.f;
    f.u = real ? sm.slot[p + r] - lo : -1;
  }
}

__device__ __forceinline__ void store_tile(const Prefetch& f, Smem& sm) {
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    const int chunk = threadIdx.x + i * THREADS, r = chunk >> 4, part = chunk & 15;
    if (chunk >= TILE * 16) break;
    const uint4 v = f.v[i];
    *reinterpret_cast<uint4*>(&sm.ck[r][part * 8]) = v;
    if (part < 8) {
      const u32 w4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sm.ct[part * 8 + 2 * e][r] = (bf16)(w4[e] & 0xffffu);
        sm.ct[part * 8 + 2 * e + 1][r] = (bf16)(w4[e] >> 16);
      }
    }
  }
  if (threadIdx.x < TILE) {
    sm.mu[threadIdx.x] = f.mu;
    sm.rho[threadIdx.x] = f.rho;
    sm.u[threadIdx.x] = f.u;
  }
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
grouped_fused(const bf16* __restrict__ q_nope, const bf16* __restrict__ q_pe, const bf16* __restrict__ latent,
              const bf16* __restrict__ k_rope, const float* __restrict__ ln_stats, const int* __restrict__ order,
              const int* __restrict__ order_slots, const int* __restrict__ distinct_ids,
              const int* __restrict__ lengths, const bf16* __restrict__ gate, const bf16* __restrict__ wk_t,
              const bf16* __restrict__ wkv_b, const float* __restrict__ gamma_k, const float* __restrict__ beta_k,
              float* __restrict__ part_o, float* __restrict__ part_s,
              long long stride_qb, long long stride_qh, long long stride_pb, long long stride_ph,
              long long stride_lb, long long stride_lt, long long stride_kb, long long stride_kt,
              long long stride_sb, long long stride_st, long long stride_ob, long long stride_ib,
              long long stride_g, int n_segments, float qk_scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int seg = blockIdx.x;
  const long long b = blockIdx.y;
  const int length = lengths[b];
  const int start = seg * SEG;
  if (start >= length) return;
  const int n_pos = min(SEG, length - start);
  const int wh = threadIdx.x >> 5, h = blockIdx.z * HPB + wh, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

  for (int i = threadIdx.x; i < n_pos; i += blockDim.x) {
    sm.pos[i] = order[b * stride_ob + start + i];
    sm.slot[i] = order_slots[b * stride_ob + start + i];
  }
  // gamma^K ⊙ q^C, gamma^K . q^C and beta^K . q^C for this warp's head
  const bf16* q = q_nope + b * stride_qb + h * stride_qh;
  float q_sum = 0.f, q_bias = 0.f;
  for (int j = lane; j < D; j += 32) {
    float qj = __uint_as_float(((u32)q[j]) << 16);
    float gqj = qj * gamma_k[h * D + j];
    sm.gq[wh][j] = gqj;
    q_sum += gqj;
    q_bias += qj * beta_k[h * D + j];
  }
  q_sum = warp_sum(q_sum);
  q_bias = warp_sum(q_bias);
  // q^R_h as the B operand of the rope dot: column 0 of an n-tile (lanes with g = 0), the other columns zero
  u32 qr[4][2];
  {
    const bf16* qp = q_pe + b * stride_pb + h * stride_ph;
    for (int kk = 0; kk < 4; ++kk) {
      qr[kk][0] = g == 0 ? ldg32(qp + kk * 16 + 2 * t4) : 0u;
      qr[kk][1] = g == 0 ? ldg32(qp + kk * 16 + 8 + 2 * t4) : 0u;
    }
  }
  __syncthreads();

  const int first = sm.slot[0], last = sm.slot[n_pos - 1];
  const int* ids_row = distinct_ids + b * stride_ib;
  const bf16* wk_h = wk_t + (long long)h * D * D;                  // W^K_h transposed: [d_c][d_n]
  const bf16* wv_h = wkv_b + ((long long)h * 2 * D + D) * D;       // W^V_h rows: [d_v][d_c]
  float m = -INFINITY, l = 0.f, mean_sum = 0.f;
  float o[8][2];
  for (int nt = 0; nt < 8; ++nt) o[nt][0] = o[nt][1] = 0.f;

  const bf16* latent_b = latent + b * stride_lb;
  const bf16* k_rope_b = k_rope + b * stride_kb;
  const float* stats_b = ln_stats + b * stride_sb;
  Prefetch pre;
  int p0 = 0;
  for (int lo = first; lo <= last; lo += IDS) {
    // where this block's positions end: the segment's slots are sorted
    int cnt = 0;
    for (int i = lane; i < n_pos; i += 32) cnt += sm.slot[i] < lo + IDS;
    for (int off = 16; off > 0; off >>= 1) cnt += __shfl_xor_sync(0xffffffffu, cnt, off);
    const int p1 = cnt;
    // the block's ids: rows g and g + 8 of the fragments
    const int slot0 = lo + g, slot1 = lo + g + 8;
    const long long id0 = slot0 <= last ? ids_row[slot0] : -1;
    const long long id1 = slot1 <= last ? ids_row[slot1] : -1;
    const bf16* gate0 = gate + id0 * stride_g + h * 2 * D;
    const bf16* gate1 = gate + id1 * stride_g + h * 2 * D;

    fetch_tile(pre, sm, p0, p1, lo, latent_b, k_rope_b, stats_b, stride_lt, stride_kt, stride_st);
    // absorb: A_h[u, :] = W^K_h^T (gq_h ⊙ G^K[id_u]), [16, d_c]
    {
      float acc[8][4];
      for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
      for (int kk = 0; kk < 4; ++kk) {
        const int j = kk * 16 + 2 * t4;
        const float ga = sm.gq[wh][j], gb = sm.gq[wh][j + 1], gc = sm.gq[wh][j + 8], gd = sm.gq[wh][j + 9];
        u32 x0 = id0 >= 0 ? ldg32(gate0 + j) : 0u, x1 = id1 >= 0 ? ldg32(gate1 + j) : 0u;
        u32 x2 = id0 >= 0 ? ldg32(gate0 + j + 8) : 0u, x3 = id1 >= 0 ? ldg32(gate1 + j + 8) : 0u;
        u32 a[4] = {pack_bf16(lo_f(x0) * ga, hi_f(x0) * gb), pack_bf16(lo_f(x1) * ga, hi_f(x1) * gb),
                    pack_bf16(lo_f(x2) * gc, hi_f(x2) * gd), pack_bf16(lo_f(x3) * gc, hi_f(x3) * gd)};
        for (int nt = 0; nt < 8; ++nt) {
          const bf16* wrow = wk_h + (nt * 8 + g) * D + j;  // B (k = j, n = c) = W^K_h^T[c][j]
          u32 bw[2] = {ldg32(wrow), ldg32(wrow + 8)};
          mma(acc[nt], a, bw);
        }
      }
      __syncwarp();
      for (int nt = 0; nt < 8; ++nt) {
        *reinterpret_cast<u32*>(&sm.a[wh][g][nt * 8 + 2 * t4]) = pack_bf16(acc[nt][0], acc[nt][1]);
        *reinterpret_cast<u32*>(&sm.a[wh][g + 8][nt * 8 + 2 * t4]) = pack_bf16(acc[nt][2], acc[nt][3]);
      }
      __syncwarp();
    }

    float s_acc[8][4];  // S_h [16 ids, d_c]
    for (int nt = 0; nt < 8; ++nt) s_acc[nt][0] = s_acc[nt][1] = s_acc[nt][2] = s_acc[nt][3] = 0.f;

    for (int p = p0; p < p1; p += TILE) {
      __syncthreads();  // every warp is done with the previous tile
      store_tile(pre, sm);
      __syncthreads();
      if (p + TILE < p1) fetch_tile(pre, sm, p + TILE, p1, lo, latent_b, k_rope_b, stats_b, stride_lt, stride_kt, stride_st);

      // content C A_h^T [32, 16] and rope K^R q^R_h [32, 1 of 8]
      float c_acc[2][2][4], r_acc[2][4];
      for (int mt = 0; mt < 2; ++mt) {
        for (int e = 0; e < 4; ++e) c_acc[mt][0][e] = c_acc[mt][1][e] = r_acc[mt][e] = 0.f;
        for (int kk = 0; kk < 4; ++kk) {
          const int col = kk * 16 + 2 * t4;
          const int r0 = mt * 16 + g;
          u32 ac[4] = {lds32(&sm.ck[r0][col]), lds32(&sm.ck[r0 + 8][col]), lds32(&sm.ck[r0][col + 8]),
                       lds32(&sm.ck[r0 + 8][col + 8])};
          for (int nt = 0; nt < 2; ++nt) {
            u32 ba[2] = {lds32(&sm.a[wh][nt * 8 + g][col]), lds32(&sm.a[wh][nt * 8 + g][col + 8])};
            mma(c_acc[mt][nt], ac, ba);
          }
          u32 ar[4] = {lds32(&sm.ck[r0][D + col]), lds32(&sm.ck[r0 + 8][D + col]), lds32(&sm.ck[r0][D + col + 8]),
                       lds32(&sm.ck[r0 + 8][D + col + 8])};
          mma(r_acc[mt], ar, qr[kk]);
        }
      }
      // each position keeps the column of its own id
      for (int mt = 0; mt < 2; ++mt)
        for (int half = 0; half < 2; ++half) {
          const int row = mt * 16 + half * 8 + g;
          const int u = sm.u[row];
          for (int nt = 0; nt < 2; ++nt)
            for (int e = 0; e < 2; ++e)
              if (nt * 8 + 2 * t4 + e == u) sm.score[wh][row] = c_acc[mt][nt][half * 2 + e];
          if (t4 == 0) sm.rope[wh][row] = r_acc[mt][half * 2];
        }
      __syncwarp();
      const bool real = sm.u[lane] >= 0;
      const float rho = sm.rho[lane], mu = sm.mu[lane];
      const float s = real ? qk_scale * (rho * (sm.score[wh][lane] - mu * q_sum) + q_bias + sm.rope[wh][lane])
                           : -INFINITY;
      const float m_new = fmaxf(m, warp_max(s));
      const float alpha = exp2f(m - m_new);  // 0 on the first tile (m = -inf)
      const float pr = real ? exp2f(s - m_new) : 0.f;
      sm.w[wh][lane] = pr * rho;
      l = l * alpha + warp_sum(pr);
      mean_sum = mean_sum * alpha + warp_sum(pr * rho * mu);
      m = m_new;
      for (int nt = 0; nt < 8; ++nt) {
        o[nt][0] *= alpha;
        o[nt][1] *= alpha;
        for (int e = 0; e < 4; ++e) s_acc[nt][e] *= alpha;
      }
      __syncwarp();
      // S_h += P_h C_tile: P_h[u, t] = w_t where position t has id u
      for (int ks = 0; ks < 2; ++ks) {
        const int t0 = ks * 16 + 2 * t4;
        u32 ap[4];
        for (int half = 0; half < 2; ++half) {  // cols t0, t0 + 1 (regs 0, 1) and t0 + 8, t0 + 9 (regs 2, 3)
          const int tc = t0 + half * 8;
          const float w0 = sm.w[wh][tc], w1 = sm.w[wh][tc + 1];
          const int u0 = sm.u[tc], u1 = sm.u[tc + 1];
          ap[half * 2] = pack_bf16(u0 == g ? w0 : 0.f, u1 == g ? w1 : 0.f);
          ap[half * 2 + 1] = pack_bf16(u0 == g + 8 ? w0 : 0.f, u1 == g + 8 ? w1 : 0.f);
        }
        for (int nt = 0; nt < 8; ++nt) {
          const int c = nt * 8 + g;
          u32 bc[2] = {lds32(&sm.ct[c][t0]), lds32(&sm.ct[c][t0 + 8])};
          mma(s_acc[nt], ap, bc);
        }
      }
    }
    p0 = p1;

    // up-project: U_h = S_h W^V_h^T [16 ids, d_v], A operand straight from the accumulators
    float u_acc[8][4];
    for (int nt = 0; nt < 8; ++nt) u_acc[nt][0] = u_acc[nt][1] = u_acc[nt][2] = u_acc[nt][3] = 0.f;
    for (int kk = 0; kk < 4; ++kk) {
      u32 as[4] = {pack_bf16(s_acc[2 * kk][0], s_acc[2 * kk][1]), pack_bf16(s_acc[2 * kk][2], s_acc[2 * kk][3]),
                   pack_bf16(s_acc[2 * kk + 1][0], s_acc[2 * kk + 1][1]),
                   pack_bf16(s_acc[2 * kk + 1][2], s_acc[2 * kk + 1][3])};
      for (int nt = 0; nt < 8; ++nt) {
        const bf16* wrow = wv_h + (nt * 8 + g) * D + kk * 16 + 2 * t4;  // B (k = c, n = v) = W^V_h[v][c]
        u32 bw[2] = {ldg32(wrow), ldg32(wrow + 8)};
        mma(u_acc[nt], as, bw);
      }
    }
    // o_h += sum over the block's ids of G^V[id] ⊙ U_h[id]
    for (int nt = 0; nt < 8; ++nt) {
      const int v = D + nt * 8 + 2 * t4;
      const u32 g0 = id0 >= 0 ? ldg32(gate0 + v) : 0u, g1 = id1 >= 0 ? ldg32(gate1 + v) : 0u;
      float c0 = u_acc[nt][0] * lo_f(g0) + u_acc[nt][2] * lo_f(g1);
      float c1 = u_acc[nt][1] * hi_f(g0) + u_acc[nt][3] * hi_f(g1);
      for (int off = 4; off < 32; off <<= 1) {
        c0 += __shfl_xor_sync(0xffffffffu, c0, off);
        c1 += __shfl_xor_sync(0xffffffffu, c1, off);
      }
      o[nt][0] += c0;
      o[nt][1] += c1;
    }
  }

  float* po = part_o + ((b * n_segments + seg) * N_HEADS + h) * D;
  if (g == 0)
    for (int nt = 0; nt < 8; ++nt) {
      po[nt * 8 + 2 * t4] = o[nt][0];
      po[nt * 8 + 2 * t4 + 1] = o[nt][1];
    }
  if (lane == 0) {
    float* ps = part_s + ((b * n_segments + seg) * N_HEADS + h) * 4;
    ps[0] = m;
    ps[1] = l;
    ps[2] = mean_sum;
  }
}

// out[b, h] = gamma^V_h ⊙ (sum_s a_s o_s - sum_s a_s mean_s) / L + beta^V_h (beta only where L > 0),
// a_s = 2^(m_s - max m), L = sum_s a_s l_s. One block of D threads per (head, sequence).
extern "C" __global__ void grouped_combine(const float* __restrict__ part_o, const float* __restrict__ part_s,
                                           const int* __restrict__ lengths, const float* __restrict__ gamma_v,
                                           const float* __restrict__ beta_v, bf16* __restrict__ out,
                                           long long stride_outb, long long stride_outh, int n_segments) {
  const int h = blockIdx.x, v = threadIdx.x;
  const long long b = blockIdx.y;
  const int used = (lengths[b] + SEG - 1) / SEG;
  float m_all = -INFINITY;
  for (int s = 0; s < used; ++s) m_all = fmaxf(m_all, part_s[((b * n_segments + s) * N_HEADS + h) * 4]);
  float acc = 0.f, mean = 0.f, denom = 0.f;
  for (int s = 0; s < used; ++s) {
    const float* ps = part_s + ((b * n_segments + s) * N_HEADS + h) * 4;
    const float a = exp2f(ps[0] - m_all);
    denom += a * ps[1];
    mean += a * ps[2];
    acc += a * part_o[((b * n_segments + s) * N_HEADS + h) * D + v];
  }
  float y = denom > 0.f ? (acc - mean) / denom : 0.f;
  y = y * gamma_v[h * D + v] + (denom > 0.f ? beta_v[h * D + v] : 0.f);
  out[b * stride_outb + h * stride_outh + v] = (bf16)(pack_bf16(y, 0.f) & 0xffffu);
}

// The dynamic shared memory grouped_fused needs (read once by the Python side, so that one layout rules both).
extern "C" __global__ void smem_bytes(int* out) { *out = (int)sizeof(Smem); }
