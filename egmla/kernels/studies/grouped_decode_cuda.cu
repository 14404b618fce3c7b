// EG-MLA decode grouped by token id, one fused launch in CUDA (issue 17). Python side, math and layouts:
// grouped_decode_cuda.py; reference: grouped_decode_ref.py; the equations: docs/grouped-decode.md.
//
// One block per (segment of SEG grouped positions, sequence, group of HPB heads), two warps per head. The segment's
// positions are sorted by slot (the plan's grouped order), so its distinct ids are the contiguous slots
// [first, last], and the positions of any 16 consecutive slots are contiguous too. Per block of 16 ids:
//   absorb   A_h = (gq_h ⊙ G^K_h[ids]) W^K_h              [16 ids, d_c]  mma, the pair of warps half each
//   per step of 64 positions (each warp of a pair takes 32):
//     scores  C A_hᵀ (each position keeps its own id's column; id columns no position has are skipped) and
//             K^R q^R_h; online softmax per warp; S_hᵀ += Cᵀ P_hᵀ with P_h[u, t] = p_t rho_t where t has id u
//   merge    the pair's two softmax states and value sums
//   up-project  U_h = S_h W^V_hᵀ [16 ids, d_v] (the pair half of d_v each), o_h += Σ_u G^V_h[u] ⊙ U_h[u]
// No per-(sequence, id) intermediate leaves the chip. W^K_h and W^V_h sit in shared memory for the whole block; the
// next block's gate rows and the next step's positions are copied in asynchronously (cp.async) while the current
// ones are worked on. Each block writes unnormalised partials (o, m, l, Σ p rho mu) per head; grouped_combine merges
// a sequence's segments and applies the value slice's norm affine.
//
// Compile-time: N_HEADS (<= 16), HPB (heads per block, a divisor of N_HEADS), SEG (a multiple of 64), MIN_BLOCKS.
// d_n = d_v = d_c = d_r = 64 (paper-base heads; other shapes take the Triton kernels). Inputs bf16 except the fp32
// statistics, norm affines and partials.

#define D 64
#define TILE 32                   // positions per warp per step
#define STEP (2 * TILE)           // positions per step: one tile for each warp of a pair
#define IDS 16
#define ROW 72                    // a 64-wide bf16 row padded to 144 B: fragment loads and ldmatrix hit 32 banks
#define CK_ROW 136                // a [c ; k^R] row, padded
#define GATE_ROW (HPB * 2 * D + 8)
#define WARPS (2 * HPB)
#define THREADS (WARPS * 32)
#define MAX_BLOCKS (SEG / IDS + 1)

#ifndef INFINITY  // NVRTC compiles without the host headers that define it
#define INFINITY __int_as_float(0x7f800000)
#endif

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
// Four 8x8 bf16 matrices from shared memory, transposed: lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldsm_x4_trans(u32* r, const void* row) {
  const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// Asynchronous copies global -> shared; an invalid source copies nothing and zero-fills the destination.
__device__ __forceinline__ void cp16(void* dst, const void* src, bool valid) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp8(void* dst, const void* src, bool valid) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(d), "l"(src), "r"(valid ? 8 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
__device__ __forceinline__ u32 lds32(const bf16* p) { return *reinterpret_cast<const u32*>(p); }
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float scale_of(float m, float m_new) { return m == -INFINITY ? 0.f : exp2f(m - m_new); }

struct Smem {
  bf16 wk[HPB][D][ROW];            // W^K_h transposed: [d_c][d_n]
  bf16 wv[HPB][D][ROW];            // W^V_h: [d_v][d_c]
  bf16 gate[2][IDS][GATE_ROW];     // a block's gate rows, this block's heads, [K ; V] per head (two buffers)
  bf16 ck[2][STEP][CK_ROW];        // a step's [c_t ; k^R_t] rows (two buffers)
  float stats[2][STEP][2];         // its (mu_t, rho_t)
  int pos[SEG], slot[SEG];         // the segment's grouped positions and their slots
  int ids[SEG];                    // token id of slot first + i
  int block_end[MAX_BLOCKS];       // where each block of 16 slots ends in the segment
  bf16 a[HPB][IDS][ROW];           // the block's absorbed queries
  float s[HPB][IDS][D + 4];        // the block's value sums S_h, merged from the pair
  float w[WARPS][TILE], score[WARPS][TILE], rope[WARPS][TILE];
  int u[WARPS][TILE];              // id index within the block of each row of a warp's tile, -1 where not real
  float gq[HPB][D];
  float state[WARPS][3];           // each warp's (m, l, Σ p rho mu) over its share of the block
};

struct Ctx {  // what the copy helpers need
  const bf16 *latent_b, *k_rope_b, *gate;
  const float* stats_b;
  long long stride_lt, stride_kt, stride_st, stride_g;
  int group;
};

__device__ __forceinline__ void copy_step(Smem& sm, const Ctx& x, int p, int p1, int buf) {
  for (int i = threadIdx.x; i < STEP * 16; i += THREADS) {
    const int r = i >> 4, part = i & 15;
    const bool real = p + r < p1;
    const long long pos = real ? sm.pos[p + r] : 0;
    const bf16* src = part < 8 ? x.latent_b + pos * x.stride_lt + part * 8
                               : x.k_rope_b + pos * x.stride_kt + (part - 8) * 8;
    cp16(&sm.ck[buf][r][part * 8], src, real);
  }
  for (int r = threadIdx.x; r < STEP; r += THREADS) {
    const bool real = p + r < p1;
    cp8(&sm.stats[buf][r][0], x.stats_b + (real ? sm.pos[p + r] : 0) * x.stride_st, real);
  }
}

__device__ __forceinline__ void copy_gate(Smem& sm, const Ctx& x, int block, int n_ids, int buf) {
  for (int i = threadIdx.x; i < IDS * HPB * 16; i += THREADS) {
    const int u = i / (HPB * 16), rest = i % (HPB * 16), hh = rest >> 4, part = rest & 15;
    const int index = block * IDS + u;
    const bool real = index < n_ids;
    const long long id = real ? sm.ids[index] : 0;
    cp16(&sm.gate[buf][u][hh * 2 * D + part * 8], x.gate + id * x.stride_g + (x.group * HPB + hh) * 2 * D + part * 8,
         real);
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
  const int seg = blockIdx.x, group = blockIdx.z;
  const long long b = blockIdx.y;
  const int length = lengths[b];
  const int start = seg * SEG;
  if (start >= length) return;
  const int n_pos = min(SEG, length - start);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int hh = warp % HPB, half = warp / HPB, h = group * HPB + hh;

  // W^K_h^T and W^V_h of the block's heads, once
  for (int i = threadIdx.x; i < 2 * HPB * D * 8; i += THREADS) {
    const int mat = i / (HPB * D * 8), rest = i % (HPB * D * 8), head = rest / (D * 8), row = (rest >> 3) % D,
              part = rest & 7;
    const long long gh = group * HPB + head;
    if (mat == 0) cp16(&sm.wk[head][row][part * 8], wk_t + (gh * D + row) * D + part * 8, true);
    else cp16(&sm.wv[head][row][part * 8], wkv_b + (gh * 2 * D + D + row) * D + part * 8, true);
  }
  cp_commit();
  for (int i = threadIdx.x; i < n_pos; i += THREADS) {
    sm.pos[i] = order[b * stride_ob + start + i];
    sm.slot[i] = order_slots[b * stride_ob + start + i];
  }
  // gamma^K ⊙ q^C, gamma^K . q^C and beta^K . q^C for this warp's head
  const bf16* q = q_nope + b * stride_qb + h * stride_qh;
  float q_sum = 0.f, q_bias = 0.f;
  for (int j = lane; j < D; j += 32) {
    const float qj = __uint_as_float(((u32)q[j]) << 16), gqj = qj * gamma_k[h * D + j];
    if (half == 0) sm.gq[hh][j] = gqj;
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
      qr[kk][0] = g == 0 ? *reinterpret_cast<const u32*>(qp + kk * 16 + 2 * t4) : 0u;
      qr[kk][1] = g == 0 ? *reinterpret_cast<const u32*>(qp + kk * 16 + 8 + 2 * t4) : 0u;
    }
  }
  __syncthreads();
  const int first = sm.slot[0], last = sm.slot[n_pos - 1], n_ids = last - first + 1;
  const int n_blocks = (n_ids + IDS - 1) / IDS;
  for (int i = threadIdx.x; i < n_ids; i += THREADS) sm.ids[i] = distinct_ids[b * stride_ib + first + i];
  for (int k = threadIdx.x; k < n_blocks; k += THREADS) {  // positions with slot < first + 16 (k + 1): a bisection
    const int bound = first + IDS * (k + 1);
    int lo = 0, hi = n_pos;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (sm.slot[mid] < bound) lo = mid + 1; else hi = mid;
    }
    sm.block_end[k] = lo;
  }
  __syncthreads();

  const Ctx x{latent + b * stride_lb, k_rope + b * stride_kb, gate, ln_stats + b * stride_sb,
              stride_lt, stride_kt, stride_st, stride_g, group};
  copy_gate(sm, x, 0, n_ids, 0);
  copy_step(sm, x, 0, sm.block_end[0], 0);
  cp_commit();

  float M = -INFINITY, L = 0.f, MEAN = 0.f;  // the pair's softmax state over the blocks done
  float o[4][2];                             // this warp's half of o_h: d_v columns (4 half + j) * 8 + 2 t + e
  for (int j = 0; j < 4; ++j) o[j][0] = o[j][1] = 0.f;
  int buf = 0;
  for (int k = 0; k < n_blocks; ++k) {
    const int p0 = k ? sm.block_end[k - 1] : 0, p1 = sm.block_end[k], lo = first + IDS * k;
    float m = -INFINITY, l = 0.f, mean_sum = 0.f;
    float st[4][2][4];  // S_h^T [d_c, 16 ids]: m-tile of 16 d_c, n-tile of 8 ids
    for (int mt = 0; mt < 4; ++mt)
      for (int nt = 0; nt < 2; ++nt) st[mt][nt][0] = st[mt][nt][1] = st[mt][nt][2] = st[mt][nt][3] = 0.f;

    for (int p = p0; p < p1; p += STEP, buf ^= 1) {
      cp_wait_all();
      __syncthreads();  // this step's rows (and this block's gate rows) are in; every warp is done with buf ^ 1
      if (p + STEP < p1) copy_step(sm, x, p + STEP, p1, buf ^ 1);
      else if (k + 1 < n_blocks) copy_step(sm, x, p1, sm.block_end[k + 1], buf ^ 1);
      if (p == p0 && k + 1 < n_blocks) copy_gate(sm, x, k + 1, n_ids, (k + 1) & 1);
      cp_commit();

      if (p == p0) {  // absorb this block: A_h[u, c] for this warp's half of d_c
        const bf16* grow0 = &sm.gate[k & 1][g][hh * 2 * D];
        const bf16* grow1 = &sm.gate[k & 1][g + 8][hh * 2 * D];
        float acc[4][4];
        for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
        for (int kk = 0; kk < 4; ++kk) {
          const int jn = kk * 16 + 2 * t4;
          const float ga = sm.gq[hh][jn], gb = sm.gq[hh][jn + 1], gc = sm.gq[hh][jn + 8], gd = sm.gq[hh][jn + 9];
          const u32 x0 = lds32(grow0 + jn), x1 = lds32(grow1 + jn), x2 = lds32(grow0 + jn + 8),
                    x3 = lds32(grow1 + jn + 8);
          const u32 a[4] = {pack_bf16(lo_f(x0) * ga, hi_f(x0) * gb), pack_bf16(lo_f(x1) * ga, hi_f(x1) * gb),
                            pack_bf16(lo_f(x2) * gc, hi_f(x2) * gd), pack_bf16(lo_f(x3) * gc, hi_f(x3) * gd)};
          for (int j = 0; j < 4; ++j) {
            const bf16* wrow = &sm.wk[hh][(half * 4 + j) * 8 + g][jn];  // B (k = d_n, n = d_c) = W^K_h^T[c][j]
            const u32 bw[2] = {lds32(wrow), lds32(wrow + 8)};
            mma(acc[j], a, bw);
          }
        }
        for (int j = 0; j < 4; ++j) {
          const int c = (half * 4 + j) * 8 + 2 * t4;
          *reinterpret_cast<u32*>(&sm.a[hh][g][c]) = pack_bf16(acc[j][0], acc[j][1]);
          *reinterpret_cast<u32*>(&sm.a[hh][g + 8][c]) = pack_bf16(acc[j][2], acc[j][3]);
        }
        __syncthreads();  // both halves of A_h written
      }

      // this warp's tile: rows [half * TILE, half * TILE + TILE) of the step
      const int rb = half * TILE;
      const bool real = p + rb + lane < p1;
      const int u_lane = real ? sm.slot[p + rb + lane] - lo : -1;
      const unsigned low = __ballot_sync(0xffffffffu, real && u_lane < 8);
      const unsigned high = __ballot_sync(0xffffffffu, real && u_lane >= 8);
      if (!(low | high)) continue;  // no position of this block in this warp's half
      sm.u[warp][lane] = u_lane;
      __syncwarp();

      // content C A_h^T [32, 16] (id columns of nobody skipped) and rope K^R q^R_h [32, 1 of 8]
      float c_acc[2][2][4], r_acc[2][4];
      for (int mt = 0; mt < 2; ++mt) {
        for (int e = 0; e < 4; ++e) c_acc[mt][0][e] = c_acc[mt][1][e] = r_acc[mt][e] = 0.f;
        const int r0 = rb + mt * 16 + g;
        for (int kk = 0; kk < 4; ++kk) {
          const int col = kk * 16 + 2 * t4;
          const u32 ac[4] = {lds32(&sm.ck[buf][r0][col]), lds32(&sm.ck[buf][r0 + 8][col]),
                             lds32(&sm.ck[buf][r0][col + 8]), lds32(&sm.ck[buf][r0 + 8][col + 8])};
          if (low) {
            const u32 ba[2] = {lds32(&sm.a[hh][g][col]), lds32(&sm.a[hh][g][col + 8])};
            mma(c_acc[mt][0], ac, ba);
          }
          if (high) {
            const u32 ba[2] = {lds32(&sm.a[hh][8 + g][col]), lds32(&sm.a[hh][8 + g][col + 8])};
            mma(c_acc[mt][1], ac, ba);
          }
          const u32 ar[4] = {lds32(&sm.ck[buf][r0][D + col]), lds32(&sm.ck[buf][r0 + 8][D + col]),
                             lds32(&sm.ck[buf][r0][D + col + 8]), lds32(&sm.ck[buf][r0 + 8][D + col + 8])};
          mma(r_acc[mt], ar, qr[kk]);
        }
      }
      for (int mt = 0; mt < 2; ++mt)  // each position keeps the column of its own id
        for (int hf = 0; hf < 2; ++hf) {
          const int row = mt * 16 + hf * 8 + g, u = sm.u[warp][row];
          for (int nt = 0; nt < 2; ++nt)
            for (int e = 0; e < 2; ++e)
              if (nt * 8 + 2 * t4 + e == u) sm.score[warp][row] = c_acc[mt][nt][hf * 2 + e];
          if (t4 == 0) sm.rope[warp][row] = r_acc[mt][hf * 2];
        }
      __syncwarp();
      const float mu = sm.stats[buf][rb + lane][0], rho = sm.stats[buf][rb + lane][1];
      const float s = real ? qk_scale * (rho * (sm.score[warp][lane] - mu * q_sum) + q_bias + sm.rope[warp][lane])
                           : -INFINITY;
      const float m_new = fmaxf(m, warp_max(s));  // finite: some row is real
      const float alpha = scale_of(m, m_new);
      const float pr = real ? exp2f(s - m_new) : 0.f;
      sm.w[warp][lane] = pr * rho;
      l = l * alpha + warp_sum(pr);
      mean_sum = mean_sum * alpha + warp_sum(pr * rho * mu);
      m = m_new;
      for (int mt = 0; mt < 4; ++mt)
        for (int nt = 0; nt < 2; ++nt)
          for (int e = 0; e < 4; ++e) st[mt][nt][e] *= alpha;
      __syncwarp();
      // S_h^T += C^T P_h^T: A = C^T [d_c, positions] by transposed matrix loads, B = P_h^T [positions, ids]
      for (int ks = 0; ks < 2; ++ks) {
        const int t0 = ks * 16 + 2 * t4;
        u32 bp[2][2];
        for (int nt = 0; nt < 2; ++nt)
          for (int hf = 0; hf < 2; ++hf) {
            const int tc = t0 + hf * 8, id = nt * 8 + g;
            bp[nt][hf] = pack_bf16(sm.u[warp][tc] == id ? sm.w[warp][tc] : 0.f,
                                   sm.u[warp][tc + 1] == id ? sm.w[warp][tc + 1] : 0.f);
          }
        const int mi = lane >> 3, ri = lane & 7;
        for (int mt = 0; mt < 4; ++mt) {
          u32 act[4];
          ldsm_x4_trans(act, &sm.ck[buf][rb + ks * 16 + ri + (mi >> 1) * 8][mt * 16 + (mi & 1) * 8]);
          if (low) mma(st[mt][0], act, bp[0]);
          if (high) mma(st[mt][1], act, bp[1]);
        }
      }
    }

    // merge the pair: a common max, then S_h = (its S) + (partner's S), each scaled to it
    if (lane == 0) {
      sm.state[warp][0] = m;
      sm.state[warp][1] = l;
      sm.state[warp][2] = mean_sum;
    }
    __syncthreads();
    const float m_a = sm.state[hh][0], m_b = sm.state[hh + HPB][0];
    const float M_new = fmaxf(M, fmaxf(m_a, m_b));
    const float sa = scale_of(m_a, M_new), sb = scale_of(m_b, M_new), so = scale_of(M, M_new);
    L = L * so + sm.state[hh][1] * sa + sm.state[hh + HPB][1] * sb;
    MEAN = MEAN * so + sm.state[hh][2] * sa + sm.state[hh + HPB][2] * sb;
    M = M_new;
    for (int j = 0; j < 4; ++j) {
      o[j][0] *= so;
      o[j][1] *= so;
    }
    const float mine = half ? sb : sa;
    for (int pass = 0; pass < 2; ++pass) {
      if (pass == half)
        for (int mt = 0; mt < 4; ++mt)
          for (int nt = 0; nt < 2; ++nt)
            for (int e = 0; e < 4; ++e) {
              float* dst = &sm.s[hh][nt * 8 + 2 * t4 + (e & 1)][mt * 16 + g + (e >> 1) * 8];
              *dst = (pass ? *dst : 0.f) + st[mt][nt][e] * mine;
            }
      __syncthreads();
    }

    // up-project this warp's half of d_v: U_h = S_h W^V_h^T, then o_h += Σ_u G^V[id_u] ⊙ U_h[u]
    float u_acc[4][4];
    for (int j = 0; j < 4; ++j) u_acc[j][0] = u_acc[j][1] = u_acc[j][2] = u_acc[j][3] = 0.f;
    for (int kk = 0; kk < 4; ++kk) {
      const int c = kk * 16 + 2 * t4;
      const float* s0 = &sm.s[hh][g][c];
      const float* s1 = &sm.s[hh][g + 8][c];
      const u32 as[4] = {pack_bf16(s0[0], s0[1]), pack_bf16(s1[0], s1[1]), pack_bf16(s0[8], s0[9]),
                         pack_bf16(s1[8], s1[9])};
      for (int j = 0; j < 4; ++j) {
        const bf16* wrow = &sm.wv[hh][(half * 4 + j) * 8 + g][c];  // B (k = d_c, n = d_v) = W^V_h[v][c]
        const u32 bw[2] = {lds32(wrow), lds32(wrow + 8)};
        mma(u_acc[j], as, bw);
      }
    }
    for (int j = 0; j < 4; ++j) {
      const int v = D + (half * 4 + j) * 8 + 2 * t4;
      const u32 g0 = lds32(&sm.gate[k & 1][g][hh * 2 * D + v]), g1 = lds32(&sm.gate[k & 1][g + 8][hh * 2 * D + v]);
      float c0 = u_acc[j][0] * lo_f(g0) + u_acc[j][2] * lo_f(g1);
      float c1 = u_acc[j][1] * hi_f(g0) + u_acc[j][3] * hi_f(g1);
      for (int off = 4; off < 32; off <<= 1) {
        c0 += __shfl_xor_sync(0xffffffffu, c0, off);
        c1 += __shfl_xor_sync(0xffffffffu, c1, off);
      }
      o[j][0] += c0;
      o[j][1] += c1;
    }
    // the next block's first barrier orders these reads of sm.s, sm.gate and sm.state before they are written again
  }

  float* po = part_o + ((b * n_segments + seg) * N_HEADS + h) * D;
  if (g == 0)
    for (int j = 0; j < 4; ++j) {
      po[(half * 4 + j) * 8 + 2 * t4] = o[j][0];
      po[(half * 4 + j) * 8 + 2 * t4 + 1] = o[j][1];
    }
  if (lane == 0 && half == 0) {
    float* ps = part_s + ((b * n_segments + seg) * N_HEADS + h) * 4;
    ps[0] = M;
    ps[1] = L;
    ps[2] = MEAN;
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
