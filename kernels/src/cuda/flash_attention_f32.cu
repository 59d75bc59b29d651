// Flash attention in f32 for heads of 512 (the VAE mid block's attention over the image's
// positions, spec §1.4; 32 for the tiny test VAE): O = softmax(Q Kᵀ · scale) V without the score matrix, f32 in and out,
// with f32-class accuracy on the tensor cores (split TF32, as the VAE's convolutions): each
// operand x = x_hi + x_lo, x_hi its top 19 bits (exact in TF32), and
// a·b ≈ a_hi·b_hi + a_lo·b_hi + a_hi·b_lo, three mma.sync m16n8k8 TF32 products with f32
// accumulation (the dropped a_lo·b_lo and lo's own TF32 truncation are ~2⁻²⁰ of the product).
// Online softmax in f32 (exp2 domain).
//
// Q, K, V (B, H, S, HD) f32 with a contiguous last axis and (batch, head, row) strides in
// elements, multiples of 4 (16-byte rows); O is written as (B, S_q, H·HD) through
// out_batch_stride / out_row_stride. Every key is attended.
//
// One block = 8 warps = 32 query rows; K/V tiles of 32 keys. Shared memory holds Q, one K tile,
// one V tile and four 32 × 32 partial score tiles (213 KiB at HD 512: one block per SM):
// K_{j+1} loads (cp.async) while the softmax and P·V_j run, V_{j+1} while S_{j+1} runs.
// - S = Q K_jᵀ: warp w computes rows 16·(w % 2) … + 15 against all 32 keys over a quarter of
//   the head dim, (w / 2)·HD/4 … + HD/4 − 1; the softmax adds the four quarters.
// - Softmax: warp w owns rows 4w … 4w + 3, one key per lane.
// - O += P V_j: warp w owns rows 16·(w % 2) and a quarter of the columns, HD / 4 (at HD 512:
//   16 n-tiles, 64 accumulator registers per thread).
// The tensor cores' f32 accumulation truncates instead of rounding, an error that grows with
// the number of products chained into one accumulator (at 16 384 keys, 3e-5 rel-L2 when O
// was one chain). So S's chains are 4 k-steps and O's one K/V tile, each then added into f32
// registers with rounding to nearest.
// Row strides are padded (Q, K: HD + 4 floats; V: HD + 8; scores: 36) so that every fragment
// read is free of bank conflicts.
#include <stdint.h>

#include "cp_async.cuh"

namespace {

constexpr int WARPS = 8;
constexpr int THREADS = 32 * WARPS;
constexpr int BLOCK_M = 32;
constexpr int BLOCK_N = 32;
constexpr int P_STRIDE = BLOCK_N + 4;

// The TF32 part of v (its top 19 bits) and the exact remainder.
__device__ __forceinline__ void split(float v, uint32_t& hi, uint32_t& lo) {
  hi = __float_as_uint(v) & 0xffffe000u;
  lo = __float_as_uint(v - __uint_as_float(hi));
}

// d += a · b for one 16×8×8 TF32 tile (a row-major 16×8, b column-major 8×8).
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The A fragment of the 16 × 8 tile at (row0, k0) of a row-major shared matrix, split.
__device__ __forceinline__ void load_a(const float* m, int stride, int row0, int k0,
                                       uint32_t (&hi)[4], uint32_t (&lo)[4]) {
  const int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
  const float* p = m + (row0 + g) * stride + k0 + t;
  split(p[0], hi[0], lo[0]);
  split(p[8 * stride], hi[1], lo[1]);
  split(p[4], hi[2], lo[2]);
  split(p[8 * stride + 4], hi[3], lo[3]);
}

// Rows [row0, row0 + ROWS) of a (len, HD) matrix whose rows are `stride` elements apart into a
// shared tile of rows `tile_stride` apart; rows past len are zero.
template <int HD, int ROWS>
__device__ __forceinline__ void load_tile(float* tile, int tile_stride, const float* src,
                                          int stride, int row0, int len) {
  constexpr int CHUNKS = HD / 4;
  for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS) {
    const int r = i / CHUNKS, c = (i % CHUNKS) * 4;
    const bool valid = row0 + r < len;
    cp_async16(tile + r * tile_stride + c, src + (size_t)(valid ? row0 + r : 0) * stride + c,
               valid);
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

}  // namespace

// (batch, head, row) strides of one input, in elements (each below 2³¹).
struct Strides {
  int batch, head, row;
};

namespace {

template <int HD>
__device__ __forceinline__ void flash_forward(const float* __restrict__ q,
                                              const float* __restrict__ k,
                                              const float* __restrict__ v,
                                              float* __restrict__ out, Strides qs, Strides ks,
                                              Strides vs, int s_q, int s_kv, int heads,
                                              float scale_log2, long long out_batch_stride,
                                              long long out_row_stride) {
  constexpr int QK_STRIDE = HD + 4;
  constexpr int V_STRIDE = HD + 8;
  constexpr int K_SLICE = HD / (WARPS / 2);  // head dims per warp in S
  constexpr int O_COLS = HD / (WARPS / 2);   // output columns per warp
  constexpr int S_TILES = BLOCK_N / 8;
  constexpr int O_TILES = O_COLS / 8;
  extern __shared__ __align__(16) float smem[];
  float* q_tile = smem;
  float* k_tile = q_tile + BLOCK_M * QK_STRIDE;
  float* v_tile = k_tile + BLOCK_N * QK_STRIDE;
  // The four head-dim slices' partial scores; the probabilities replace the first.
  float* s_part = v_tile + BLOCK_N * V_STRIDE;
  float* p_tile = s_part;
  float* row_scale = s_part + 4 * BLOCK_M * P_STRIDE;  // per row: the step's rescale, then 1 / l

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int b = blockIdx.y / heads, h = blockIdx.y % heads;
  const int m0 = blockIdx.x * BLOCK_M;
  const float* qb = q + (size_t)b * qs.batch + (size_t)h * qs.head;
  const float* kb = k + (size_t)b * ks.batch + (size_t)h * ks.head;
  const float* vb = v + (size_t)b * vs.batch + (size_t)h * vs.head;

  load_tile<HD, BLOCK_M>(q_tile, QK_STRIDE, qb, qs.row, m0, s_q);
  load_tile<HD, BLOCK_N>(k_tile, QK_STRIDE, kb, ks.row, 0, s_kv);
  cp_async_commit();
  load_tile<HD, BLOCK_N>(v_tile, V_STRIDE, vb, vs.row, 0, s_kv);
  cp_async_commit();

  // Rows of this warp's S and O tiles; its head-dim slice of S and its columns of O.
  const int row0 = 16 * (warp % 2);
  const int k_slice0 = K_SLICE * (warp / 2), o_col0 = O_COLS * (warp / 2);
  float* s_mine = s_part + (warp / 2) * BLOCK_M * P_STRIDE;
  // Softmax: this warp's rows and their running max (exp2 domain) and sum.
  float row_max[4], row_sum[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  float o[O_TILES][4];
#pragma unroll
  for (int j = 0; j < O_TILES; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  const int tiles = (s_kv + BLOCK_N - 1) / BLOCK_N;
  for (int tile = 0; tile < tiles; ++tile) {
    const int n0 = tile * BLOCK_N;
    cp_async_wait<1>();  // K_j (and Q) are in; V_j may still be loading
    __syncthreads();
    {
      // Partial S over this warp's head-dim slice, all 32 keys. The tensor cores' f32
      // accumulation truncates, so its error grows with the chain: every 4 k-steps the
      // accumulators are added (rounding to nearest) into f32 sums.
      float sum[S_TILES][4] = {};
#pragma unroll
      for (int k0 = 0; k0 < K_SLICE; k0 += 32) {
        float hh[S_TILES][4] = {}, cross[S_TILES][4] = {};
#pragma unroll
        for (int kk = k0; kk < k0 + 32 && kk < K_SLICE; kk += 8) {
          uint32_t a_hi[4], a_lo[4];
          load_a(q_tile, QK_STRIDE, row0, k_slice0 + kk, a_hi, a_lo);
#pragma unroll
          for (int n = 0; n < S_TILES; ++n) {
            const float* kp = k_tile + (8 * n + g) * QK_STRIDE + k_slice0 + kk + t;
            uint32_t b0_hi, b0_lo, b1_hi, b1_lo;
            split(kp[0], b0_hi, b0_lo);
            split(kp[4], b1_hi, b1_lo);
            mma(hh[n], a_hi, b0_hi, b1_hi);
            mma(cross[n], a_lo, b0_hi, b1_hi);
            mma(cross[n], a_hi, b0_lo, b1_lo);
          }
        }
#pragma unroll
        for (int n = 0; n < S_TILES; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) sum[n][i] += hh[n][i] + cross[n][i];
      }
      // c0, c1: row g, keys 2t, 2t + 1; c2, c3: row g + 8.
#pragma unroll
      for (int n = 0; n < S_TILES; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          s_mine[(row0 + g + 8 * (i / 2)) * P_STRIDE + 8 * n + 2 * t + i % 2] = sum[n][i];
    }
    __syncthreads();  // K_j is read, the partial scores are in
    if (tile + 1 < tiles) {
      load_tile<HD, BLOCK_N>(k_tile, QK_STRIDE, kb, ks.row, n0 + BLOCK_N, s_kv);
    }
    cp_async_commit();
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int at = (4 * warp + r) * P_STRIDE + lane;
      constexpr int SLICE = BLOCK_M * P_STRIDE;
      const float dot = (s_part[at] + s_part[at + SLICE]) +
                        (s_part[at + 2 * SLICE] + s_part[at + 3 * SLICE]);
      // Keys past s_kv score −∞; the first tile always holds a key, so m is finite.
      const float s = n0 + lane < s_kv ? dot * scale_log2 : -INFINITY;
      const float m = fmaxf(row_max[r], warp_max(s));
      const float p = exp2f(s - m);
      const float rescale = exp2f(row_max[r] - m);
      row_sum[r] = row_sum[r] * rescale + warp_sum(p);
      row_max[r] = m;
      p_tile[at] = p;
      if (lane == 0) row_scale[4 * warp + r] = rescale;
    }
    cp_async_wait<1>();  // V_j is in; K_{j+1} may still be loading
    __syncthreads();
    {
      // This tile's P·V in fresh accumulators (a short truncating chain), then added to the
      // rescaled running O with rounding to nearest.
      uint32_t a_hi[S_TILES][4], a_lo[S_TILES][4];
#pragma unroll
      for (int kt = 0; kt < S_TILES; ++kt) load_a(p_tile, P_STRIDE, row0, 8 * kt, a_hi[kt], a_lo[kt]);
      const float r_lo = row_scale[row0 + g], r_hi = row_scale[row0 + g + 8];
#pragma unroll
      for (int j = 0; j < O_TILES; ++j) {
        float acc[4] = {};
#pragma unroll
        for (int kt = 0; kt < S_TILES; ++kt) {
          const float* vp = v_tile + (8 * kt + t) * V_STRIDE + o_col0 + 8 * j + g;
          uint32_t b0_hi, b0_lo, b1_hi, b1_lo;
          split(vp[0], b0_hi, b0_lo);
          split(vp[4 * V_STRIDE], b1_hi, b1_lo);
          mma(acc, a_hi[kt], b0_hi, b1_hi);
          mma(acc, a_lo[kt], b0_hi, b1_hi);
          mma(acc, a_hi[kt], b0_lo, b1_lo);
        }
        o[j][0] = fmaf(o[j][0], r_lo, acc[0]);
        o[j][1] = fmaf(o[j][1], r_lo, acc[1]);
        o[j][2] = fmaf(o[j][2], r_hi, acc[2]);
        o[j][3] = fmaf(o[j][3], r_hi, acc[3]);
      }
    }
    __syncthreads();  // V_j and P are read
    if (tile + 1 < tiles) {
      load_tile<HD, BLOCK_N>(v_tile, V_STRIDE, vb, vs.row, n0 + BLOCK_N, s_kv);
    }
    cp_async_commit();
  }

#pragma unroll
  for (int r = 0; r < 4; ++r)
    if (lane == 0) row_scale[4 * warp + r] = 1.f / row_sum[r];
  __syncthreads();
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + g + 8 * half;
    if (m0 + row >= s_q) continue;
    const float inv = row_scale[row];
    float* dst = out + b * out_batch_stride + (long long)(m0 + row) * out_row_stride +
                 (long long)h * HD + o_col0 + 2 * t;
#pragma unroll
    for (int j = 0; j < O_TILES; ++j)
      *reinterpret_cast<float2*>(dst + 8 * j) =
          make_float2(o[j][2 * half] * inv, o[j][2 * half + 1] * inv);
  }
}

}  // namespace

#define FLASH_F32(HD)                                                                          \
  extern "C" __global__ void __launch_bounds__(THREADS, 1) flash_attention_f32_hd##HD(        \
      const float* q, const float* k, const float* v, float* out, Strides qs, Strides ks,      \
      Strides vs, int s_q, int s_kv, int heads, float scale_log2, long long out_batch_stride, \
      long long out_row_stride) {                                                              \
    flash_forward<HD>(q, k, v, out, qs, ks, vs, s_q, s_kv, heads, scale_log2,                 \
                      out_batch_stride, out_row_stride);                                       \
  }

FLASH_F32(32)
FLASH_F32(512)
