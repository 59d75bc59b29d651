// Flash attention in f32 for heads of 512 (the VAE mid block's attention over the image's
// positions, spec §1.4; 32 for the tiny test VAE): O = softmax(Q Kᵀ · scale) V without the
// score matrix, f32 in and out, with f32-class accuracy on the fp16 tensor cores.
//
// Split fp16. A pre-pass scales each of Q, K and V by the power of two that brings its largest
// magnitude into [2¹⁴, 2¹⁵) (`attention_absmax_f32`, then `attention_split_f16`) and stores
// every element x as x_hi = fp16(x) and x_lo = fp16(x − x_hi): 22 significant bits. Then
// a·b ≈ a_hi·b_hi + a_lo·b_hi + a_hi·b_lo, three mma.sync m16n8k16 products with f32
// accumulation (the dropped a_lo·b_lo is ~2⁻²² of the product). fp16 keeps TF32's 10-bit
// mantissa at twice its rate, 16 products per k-step where TF32 takes 8. The scaling keeps
// x_hi clear of fp16's overflow and puts x_lo's subnormal rounding below 2⁻³⁸ of the tensor's
// largest value. P = exp2(s − m) ∈ (0, 1] is split the same way after a scaling by 2¹⁴; the
// three scalings come off the scores' factor and the output's 1 / l, exactly.
//
// The split operands are contiguous (B·H, S, HD) fp16; O is written as (B, S_q, H·HD) f32
// through out_batch_stride / out_row_stride. Every key is attended.
//
// One block = 8 warps = ROW_GROUPS 16-row query tiles × SLICES = 8 / ROW_GROUPS slices of the
// head dim; K/V tiles of 32 keys. Shared memory holds one K tile and one V tile (hi and lo),
// the block's Q (read once into registers) and SLICES partial score tiles (212 KiB at HD 512:
// one block per SM); K_{j+1} loads (cp.async) while the softmax and P·V_j run, V_{j+1} while
// S_{j+1} runs. Three barriers a tile: K_j in (and V's tile free), the partial scores in, V_j
// in.
// - S = Q K_jᵀ: a warp computes its 16 rows against all 32 keys over its slice of the head dim,
//   Q's fragments in registers; the softmax adds the slices' partial scores.
// - Softmax: every warp of a row group computes its 16 rows' (the same values), its P staying
//   in registers as the next product's operand.
// - O += P V_j: a warp owns its 16 rows and its slice's HD / SLICES columns (at HD 512: 16
//   n-tiles, 64 accumulator registers per thread).
// The tensor cores' f32 accumulation truncates instead of rounding, an error that grows with
// the number of products chained into one accumulator (at 16 384 keys, 3e-5 rel-L2 when O was
// one chain). So S's chains are 2 k-steps and O's one K/V tile, each then added into f32
// registers with rounding to nearest.
#include <cuda_fp16.h>
#include <stdint.h>

#include "tiles.cuh"

namespace {

constexpr int WARPS = 8;
constexpr int THREADS = 32 * WARPS;
constexpr int BLOCK_N = 32;
constexpr int S_STRIDE = BLOCK_N + 8;  // partial score rows: float2 accesses free of conflicts
constexpr int CHAIN = 2;               // k-steps of S per truncating accumulator
constexpr float P_SCALE = 16384.f;     // 2¹⁴

// 2^e for e in [-126, 127].
__device__ __forceinline__ float pow2(int e) { return __int_as_float((e + 127) << 23); }

// The exponent of the power of two the pre-pass scales a tensor by, from its largest
// magnitude's bits: that magnitude into [2¹⁴, 2¹⁵); 0 for an all-zero or non-finite tensor.
__device__ __forceinline__ int scale_shift(unsigned max_bits) {
  const int e = static_cast<int>(max_bits >> 23);
  if (max_bits == 0 || e >= 255) return 0;
  return 14 - min(max(e - 127, -100), 100);
}

__device__ __forceinline__ uint32_t pack(__half lo, __half hi) {
  const __half2 v = __halves2half2(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d += a · b for one 16×8×16 tile (a row-major 16×16, b column-major 16×8).
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

}  // namespace

// (batch, head, row) strides of one input, in elements (each below 2³¹).
struct Strides {
  int batch, head, row;
};

// The largest |x| of a (B, H, rows, hd) f32 tensor, as its bits, into *max_bits (zeroed by the
// caller; non-negative floats order as their bits). Rows are 16-byte aligned, hd % 4 == 0.
// Grid (any, B·H).
extern "C" __global__ void attention_absmax_f32(const float* __restrict__ x, Strides s, int heads,
                                                int rows, int hd, unsigned* max_bits) {
  const int b = blockIdx.y / heads, h = blockIdx.y % heads;
  const float* base = x + (size_t)b * s.batch + (size_t)h * s.head;
  const int chunks = hd / 4;
  unsigned m = 0;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)rows * chunks;
       i += (long long)gridDim.x * blockDim.x) {
    const int r = static_cast<int>(i / chunks), c = static_cast<int>(i % chunks) * 4;
    const float4 v = *reinterpret_cast<const float4*>(base + (size_t)r * s.row + c);
    m = max(m, max(max(abs_bits(v.x), abs_bits(v.y)), max(abs_bits(v.z), abs_bits(v.w))));
  }
  m = __reduce_max_sync(0xffffffffu, m);
  if (threadIdx.x % 32 == 0) atomicMax(max_bits, m);
}

// The split of a (B, H, rows, hd) f32 tensor scaled as `max_bits` says: x_hi and x_lo, each
// contiguous (B·H, rows, hd) fp16. Grid (any, B·H).
extern "C" __global__ void attention_split_f16(const float* __restrict__ x, Strides s, int heads,
                                               int rows, int hd,
                                               const unsigned* __restrict__ max_bits,
                                               __half* __restrict__ hi, __half* __restrict__ lo) {
  const float scale = pow2(scale_shift(*max_bits));
  const int b = blockIdx.y / heads, h = blockIdx.y % heads;
  const float* base = x + (size_t)b * s.batch + (size_t)h * s.head;
  const size_t out0 = (size_t)blockIdx.y * rows * hd;
  const int chunks = hd / 4;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)rows * chunks;
       i += (long long)gridDim.x * blockDim.x) {
    const int r = static_cast<int>(i / chunks), c = static_cast<int>(i % chunks) * 4;
    const float4 v = *reinterpret_cast<const float4*>(base + (size_t)r * s.row + c);
    const float xs[4] = {v.x * scale, v.y * scale, v.z * scale, v.w * scale};
    __half xh[4], xl[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      xh[e] = __float2half_rn(xs[e]);
      xl[e] = __float2half_rn(xs[e] - __half2float(xh[e]));
    }
    const size_t at = out0 + (size_t)r * hd + c;
    *reinterpret_cast<uint2*>(hi + at) = make_uint2(pack(xh[0], xh[1]), pack(xh[2], xh[3]));
    *reinterpret_cast<uint2*>(lo + at) = make_uint2(pack(xl[0], xl[1]), pack(xl[2], xl[3]));
  }
}

namespace {

// One split operand: its high and low parts, (B·H, rows, HD) fp16.
struct Split {
  const __half* hi;
  const __half* lo;
};

template <int HD, int ROW_GROUPS>
__device__ __forceinline__ void flash_forward(Split q, Split k, Split v, float* __restrict__ out,
                                              const unsigned* __restrict__ max_bits, int s_q,
                                              int s_kv, int heads, float scale_log2,
                                              long long out_batch_stride,
                                              long long out_row_stride) {
  constexpr int SLICES = WARPS / ROW_GROUPS;
  constexpr int BLOCK_M = 16 * ROW_GROUPS;
  constexpr int SLICE = HD / SLICES;     // head dims per warp in S, output columns in O
  constexpr int Q_STEPS = SLICE / 16;    // k-steps of S per warp
  constexpr int S_TILES = BLOCK_N / 8;   // 8-key n-tiles of S
  constexpr int O_TILES = SLICE / 8;     // 8-column n-tiles of O per warp
  static_assert(SLICE % 16 == 0, "a slice is whole k-steps");
  extern __shared__ __align__(128) unsigned char smem[];
  __half* k_hi = reinterpret_cast<__half*>(smem);
  __half* k_lo = k_hi + BLOCK_N * HD;
  __half* v_hi = k_lo + BLOCK_N * HD;
  __half* v_lo = v_hi + BLOCK_N * HD;
  __half* q_hi = v_lo + BLOCK_N * HD;
  __half* q_lo = q_hi + BLOCK_M * HD;
  float* s_part = reinterpret_cast<float*>(q_lo + BLOCK_M * HD);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int m0 = blockIdx.x * BLOCK_M;
  const size_t q0 = (size_t)blockIdx.y * s_q * HD, kv0 = (size_t)blockIdx.y * s_kv * HD;

  load_tile<HD, BLOCK_M, THREADS>(q_hi, q.hi + q0, HD, m0, s_q);
  load_tile<HD, BLOCK_M, THREADS>(q_lo, q.lo + q0, HD, m0, s_q);
  load_tile<HD, BLOCK_N, THREADS>(k_hi, k.hi + kv0, HD, 0, s_kv);
  load_tile<HD, BLOCK_N, THREADS>(k_lo, k.lo + kv0, HD, 0, s_kv);
  cp_async_commit();
  load_tile<HD, BLOCK_N, THREADS>(v_hi, v.hi + kv0, HD, 0, s_kv);
  load_tile<HD, BLOCK_N, THREADS>(v_lo, v.lo + kv0, HD, 0, s_kv);
  cp_async_commit();

  // This warp's 16 rows and its slice: head dims of S, columns of O.
  const int row0 = 16 * (warp % ROW_GROUPS);
  const int col0 = SLICE * (warp / ROW_GROUPS);
  // The scalings: S' = 2^(shift_q + shift_k) S, O' = 2^(shift_v) · P_SCALE · O.
  const int shift_q = scale_shift(max_bits[0]), shift_k = scale_shift(max_bits[1]);
  const int shift_v = scale_shift(max_bits[2]);
  const float s_factor = static_cast<float>(scale_log2 * ldexp(1.0, -(shift_q + shift_k)));

  cp_async_wait<1>();  // Q and K_0 are in
  __syncthreads();
  uint32_t qh[Q_STEPS][4], ql[Q_STEPS][4];
#pragma unroll
  for (int kk = 0; kk < Q_STEPS; ++kk) {
    const int at = swz<HD>(row0 + lane % 8 + (lane / 8 % 2) * 8, col0 + kk * 16 + lane / 16 * 8);
    ldmatrix_x4(qh[kk], smem_addr(q_hi + at));
    ldmatrix_x4(ql[kk], smem_addr(q_lo + at));
  }

  // Rows g and g + 8 of the warp's tile: running max (exp2 domain) and this thread's part of
  // the running sum.
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  float o[O_TILES][4];
#pragma unroll
  for (int j = 0; j < O_TILES; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  const int tiles = (s_kv + BLOCK_N - 1) / BLOCK_N;
  for (int tile = 0; tile < tiles; ++tile) {
    const int n0 = tile * BLOCK_N;
    if (tile > 0) {
      cp_async_wait<0>();  // K_j is in
      __syncthreads();     // ... and every warp is past P·V_{j-1}: V's tile is free
      load_tile<HD, BLOCK_N, THREADS>(v_hi, v.hi + kv0, HD, n0, s_kv);
      load_tile<HD, BLOCK_N, THREADS>(v_lo, v.lo + kv0, HD, n0, s_kv);
      cp_async_commit();
    }
    // Partial S over this warp's slice of the head dim, two n-tiles (16 keys) at a time.
    float* mine = s_part + (warp / ROW_GROUPS) * BLOCK_M * S_STRIDE;
#pragma unroll
    for (int np = 0; np < S_TILES / 2; ++np) {
      float sum[2][4] = {};
#pragma unroll
      for (int kc = 0; kc < Q_STEPS; kc += CHAIN) {
        float hh[2][4] = {}, cross[2][4] = {};
#pragma unroll
        for (int kk = kc; kk < kc + CHAIN && kk < Q_STEPS; ++kk) {
          const int at = swz<HD>(np * 16 + lane % 8 + lane / 16 * 8,
                                 col0 + kk * 16 + (lane / 8 % 2) * 8);
          uint32_t kh[4], kl[4];
          ldmatrix_x4(kh, smem_addr(k_hi + at));
          ldmatrix_x4(kl, smem_addr(k_lo + at));
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            mma(hh[e], qh[kk], kh[2 * e], kh[2 * e + 1]);
            mma(cross[e], ql[kk], kh[2 * e], kh[2 * e + 1]);
            mma(cross[e], qh[kk], kl[2 * e], kl[2 * e + 1]);
          }
        }
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
          for (int i = 0; i < 4; ++i) sum[e][i] += hh[e][i] + cross[e][i];
      }
      // c0, c1: row g, keys 8n + 2t, + 1; c2, c3: row g + 8.
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = 8 * (2 * np + e) + 2 * t;
        *reinterpret_cast<float2*>(mine + (row0 + g) * S_STRIDE + key) =
            make_float2(sum[e][0], sum[e][1]);
        *reinterpret_cast<float2*>(mine + (row0 + g + 8) * S_STRIDE + key) =
            make_float2(sum[e][2], sum[e][3]);
      }
    }
    __syncthreads();  // K_j is read, the partial scores are in
    if (tile + 1 < tiles) {
      load_tile<HD, BLOCK_N, THREADS>(k_hi, k.hi + kv0, HD, n0 + BLOCK_N, s_kv);
      load_tile<HD, BLOCK_N, THREADS>(k_lo, k.lo + kv0, HD, n0 + BLOCK_N, s_kv);
    }
    cp_async_commit();

    // The softmax of rows g (e = 0, 1) and g + 8 (e = 2, 3), keys 8n + 2t + e % 2.
    float s[S_TILES][4];
    float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int n = 0; n < S_TILES; ++n) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float* at = s_part + (row0 + g + 8 * half) * S_STRIDE + 8 * n + 2 * t;
        float2 dot = *reinterpret_cast<const float2*>(at);
#pragma unroll
        for (int sl = 1; sl < SLICES; ++sl) {
          const float2 part = *reinterpret_cast<const float2*>(at + sl * BLOCK_M * S_STRIDE);
          dot.x += part.x;
          dot.y += part.y;
        }
        const int key = n0 + 8 * n + 2 * t;
        // Keys past s_kv score −∞; the first tile always holds a key, so the max is finite.
        s[n][2 * half] = key < s_kv ? dot.x * s_factor : -INFINITY;
        s[n][2 * half + 1] = key + 1 < s_kv ? dot.y * s_factor : -INFINITY;
        tile_max[half] = fmaxf(tile_max[half], fmaxf(s[n][2 * half], s[n][2 * half + 1]));
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      alpha[r] = exp2f(row_max[r] - tile_max[r]);
      row_max[r] = tile_max[r];
      row_sum[r] *= alpha[r];
    }
    // P · 2¹⁴ split into fp16 parts, packed as the A operands of P·V's k-steps.
    uint32_t ph[S_TILES / 2][4], pl[S_TILES / 2][4];
#pragma unroll
    for (int n = 0; n < S_TILES; ++n) {
      __half h[4], l[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[n][e] - row_max[e / 2]);
        row_sum[e / 2] += p;
        const float scaled = p * P_SCALE;
        h[e] = __float2half_rn(scaled);
        l[e] = __float2half_rn(scaled - __half2float(h[e]));
      }
      // n-tile 2kt fills a0 (row g) and a1 (row g + 8), n-tile 2kt + 1 a2 and a3.
      ph[n / 2][2 * (n % 2)] = pack(h[0], h[1]);
      ph[n / 2][2 * (n % 2) + 1] = pack(h[2], h[3]);
      pl[n / 2][2 * (n % 2)] = pack(l[0], l[1]);
      pl[n / 2][2 * (n % 2) + 1] = pack(l[2], l[3]);
    }
    cp_async_wait<1>();  // V_j is in; K_{j+1} may still be loading
    __syncthreads();
    // This tile's P·V in fresh accumulators (a short truncating chain), then added to the
    // rescaled running O with rounding to nearest.
#pragma unroll
    for (int dp = 0; dp < O_TILES / 2; ++dp) {
      float acc[2][4] = {};
#pragma unroll
      for (int kt = 0; kt < S_TILES / 2; ++kt) {
        const int at = swz<HD>(kt * 16 + lane % 8 + (lane / 8 % 2) * 8, col0 + dp * 16 + lane / 16 * 8);
        uint32_t vh[4], vl[4];
        ldmatrix_x4_trans(vh, smem_addr(v_hi + at));
        ldmatrix_x4_trans(vl, smem_addr(v_lo + at));
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          mma(acc[e], ph[kt], vh[2 * e], vh[2 * e + 1]);
          mma(acc[e], pl[kt], vh[2 * e], vh[2 * e + 1]);
          mma(acc[e], ph[kt], vl[2 * e], vl[2 * e + 1]);
        }
      }
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float* oj = o[2 * dp + e];
        oj[0] = fmaf(oj[0], alpha[0], acc[e][0]);
        oj[1] = fmaf(oj[1], alpha[0], acc[e][1]);
        oj[2] = fmaf(oj[2], alpha[1], acc[e][2]);
        oj[3] = fmaf(oj[3], alpha[1], acc[e][3]);
      }
    }
  }

  const int b = blockIdx.y / heads, h = blockIdx.y % heads;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float l = row_sum[half];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = m0 + row0 + g + 8 * half;
    if (row >= s_q) continue;
    const float inv = static_cast<float>(ldexp(1.0 / l, -shift_v) / P_SCALE);
    float* dst = out + b * out_batch_stride + (long long)row * out_row_stride + (long long)h * HD +
                 col0 + 2 * t;
#pragma unroll
    for (int j = 0; j < O_TILES; ++j)
      *reinterpret_cast<float2*>(dst + 8 * j) =
          make_float2(o[j][2 * half] * inv, o[j][2 * half + 1] * inv);
  }
}

}  // namespace

#define FLASH_F32(HD, ROW_GROUPS)                                                              \
  extern "C" __global__ void __launch_bounds__(THREADS, 1) flash_attention_f32_hd##HD(        \
      const __half* q_hi, const __half* q_lo, const __half* k_hi, const __half* k_lo,          \
      const __half* v_hi, const __half* v_lo, float* out, const unsigned* max_bits, int s_q,   \
      int s_kv, int heads, float scale_log2, long long out_batch_stride,                       \
      long long out_row_stride) {                                                              \
    flash_forward<HD, ROW_GROUPS>({q_hi, q_lo}, {k_hi, k_lo}, {v_hi, v_lo}, out, max_bits,     \
                                  s_q, s_kv, heads, scale_log2, out_batch_stride,              \
                                  out_row_stride);                                             \
  }

FLASH_F32(32, 4)
FLASH_F32(512, 2)
