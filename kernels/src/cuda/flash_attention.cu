// Flash attention forward: O = softmax(Q Kᵀ · scale) V without the score matrix. bf16 in, f32
// accumulation (mma.sync m16n8k16), online softmax in f32 (exp2 domain), P rounded to bf16 for
// the P·V product (as every flash kernel, torch's included).
//
// Q (B, H, S_q, HD), K and V (B, H_kv, S_kv, HD), each with a contiguous last axis and
// (batch, head, row) strides in elements, multiples of 8 (16-byte rows: e.g. V's columns of a
// fused projection, read in place); query head h reads key/value head h / (H / H_kv)
// (grouped-query attention). O is written as (B, S_q, H·HD) through
// out_batch_stride / out_row_stride (elements), i.e. with the heads already merged.
//
// Two instantiations per head dim: `flash_attention_bf16_hd*` attends every key of its own head
// (H_kv = H; the FLUX.2 joint attention); `flash_attention_masked_bf16_hd*` also takes grouped
// key/value heads, `causal` (query i sees keys j <= i; S_q == S_kv) and an optional key mask
// (B, S_kv) u32, 0 = padding (Qwen3). Key tiles past the causal diagonal are skipped. A query
// row that sees no key at all gets zeros.
//
// One block = 4 warps = 128 query rows. Each warp owns 32 rows (two 16-row mma tiles), so every
// K and V fragment it reads from shared memory feeds two mma: shared-memory traffic per FLOP
// is what bounds a 16-row warp. Q stays in shared memory (its fragments are re-read per tile;
// registers hold the two O and S accumulators). K/V tiles of 32 keys are double-buffered with
// cp.async. Shared rows are XOR-swizzled in 16-byte chunks so that ldmatrix
// reads are free of bank conflicts.
#include <cuda_bf16.h>
#include <stdint.h>

#include "tiles.cuh"

namespace {

typedef __nv_bfloat16 bf16;

constexpr int WARPS = 4;
constexpr int M_TILES = 2;  // 16-row query tiles per warp
constexpr int WARP_ROWS = 16 * M_TILES;
constexpr int BLOCK_M = WARPS * WARP_ROWS;
constexpr int BLOCK_N = 32;
constexpr int THREADS = 32 * WARPS;

// d += a · b for one 16×8×16 tile (a row-major 16×16, b column-major 16×8).
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// (batch, head, row) strides of one input, in elements (each below 2³¹).
struct Strides {
  int batch, head, row;
};

template <int HD, bool MASKED>
__device__ __forceinline__ void flash_forward(const bf16* __restrict__ q,
                                              const bf16* __restrict__ k,
                                              const bf16* __restrict__ v, bf16* __restrict__ out,
                                              Strides qs, Strides ks, Strides vs, int s_q,
                                              int s_kv, int heads, int kv_heads,
                                              float scale_log2, long long out_batch_stride,
                                              long long out_row_stride, int causal,
                                              const unsigned int* __restrict__ key_mask) {
  constexpr int KSTEPS = HD / 16;  // 16-wide slices of the head dim (Q·Kᵀ)
  constexpr int NTILES = BLOCK_N / 8;  // 8-key column tiles of S
  constexpr int DTILES = HD / 8;  // 8-wide column tiles of O
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sq = reinterpret_cast<bf16*>(smem);
  bf16* sk = sq + BLOCK_M * HD;
  bf16* sv = sk + 2 * BLOCK_N * HD;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int m0 = blockIdx.x * BLOCK_M;
  const int bh = blockIdx.y;
  const int b = bh / heads;
  const int h = bh % heads;
  const int kv_head = MASKED ? h / (heads / kv_heads) : h;
  const bf16* qg = q + (size_t)b * qs.batch + (size_t)h * qs.head;
  const bf16* kg = k + (size_t)b * ks.batch + (size_t)kv_head * ks.head;
  const bf16* vg = v + (size_t)b * vs.batch + (size_t)kv_head * vs.head;
  const unsigned int* mask = MASKED && key_mask ? key_mask + (size_t)b * s_kv : nullptr;

  load_tile<HD, BLOCK_M, THREADS>(sq, qg, qs.row, m0, s_q);
  load_tile<HD, BLOCK_N, THREADS>(sk, kg, ks.row, 0, s_kv);
  load_tile<HD, BLOCK_N, THREADS>(sv, vg, vs.row, 0, s_kv);
  cp_async_commit();

  // Row of this lane's ldmatrix address in each of the warp's 16-row query tiles.
  const int q_row = warp * WARP_ROWS + (lane % 8) + ((lane / 8) % 2) * 8;
  float o[M_TILES][DTILES][4];
  float row_max[M_TILES][2];
  float row_sum[M_TILES][2];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
    for (int d = 0; d < DTILES; ++d) o[mt][d][0] = o[mt][d][1] = o[mt][d][2] = o[mt][d][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  // Keys this block can see: all of them, or up to its last query row when causal.
  const int kv_end = MASKED && causal ? min(s_kv, m0 + BLOCK_M) : s_kv;
  const int tiles = (kv_end + BLOCK_N - 1) / BLOCK_N;
  for (int j = 0; j < tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < tiles) {
      const int next = (j + 1) * BLOCK_N;
      load_tile<HD, BLOCK_N, THREADS>(sk + (stage ^ 1) * BLOCK_N * HD, kg, ks.row, next, s_kv);
      load_tile<HD, BLOCK_N, THREADS>(sv + (stage ^ 1) * BLOCK_N * HD, vg, vs.row, next, s_kv);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* ks = sk + stage * BLOCK_N * HD;
    const bf16* vs = sv + stage * BLOCK_N * HD;

    // S = Q·Kᵀ: each K fragment feeds every query tile of the warp.
    float s[M_TILES][NTILES][4];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int n = 0; n < NTILES; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      uint32_t qf[M_TILES][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt) {
        ldmatrix_x4(qf[mt], smem_addr(sq + swz<HD>(q_row + mt * 16, kk * 16 + (lane / 16) * 8)));
      }
#pragma unroll
      for (int np = 0; np < NTILES / 2; ++np) {
        uint32_t kf[4];
        const int row = np * 16 + (lane % 8) + (lane / 16) * 8;
        ldmatrix_x4(kf, smem_addr(ks + swz<HD>(row, kk * 16 + ((lane / 8) % 2) * 8)));
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma(s[mt][2 * np], qf[mt], kf[0], kf[1]);
          mma(s[mt][2 * np + 1], qf[mt], kf[2], kf[3]);
        }
      }
    }

    // Online softmax; per query tile the thread holds rows lane/4 (e = 0, 1) and lane/4 + 8
    // (e = 2, 3).
    const int key0 = j * BLOCK_N + 2 * (lane % 4);
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
      // This thread's query rows in the tile: row0 (e = 0, 1) and row0 + 8 (e = 2, 3).
      const int row0 = m0 + warp * WARP_ROWS + mt * 16 + lane / 4;
      float tile_max[2] = {row_max[mt][0], row_max[mt][1]};
#pragma unroll
      for (int n = 0; n < NTILES; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // The key exists, is not padding, and (causal) does not follow the query.
          const int key = key0 + n * 8 + (e & 1);
          bool valid = key < s_kv;
          if (MASKED) {
            valid = valid && (!mask || mask[key] != 0) && (!causal || key <= row0 + (e / 2) * 8);
          }
          s[mt][n][e] = valid ? s[mt][n][e] * scale_log2 : -INFINITY;
          tile_max[e / 2] = fmaxf(tile_max[e / 2], s[mt][n][e]);
        }
      }
      float alpha[2];
      // The exponent's reference: the running max, or 0 while a masked row has seen no key
      // (then every term is exp2(-inf) = 0 instead of NaN).
      float ref[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
        ref[r] = MASKED && tile_max[r] == -INFINITY ? 0.f : tile_max[r];
        alpha[r] = exp2f(row_max[mt][r] - ref[r]);
        row_max[mt][r] = tile_max[r];
        row_sum[mt][r] *= alpha[r];
      }
#pragma unroll
      for (int n = 0; n < NTILES; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][n][e] = exp2f(s[mt][n][e] - ref[e / 2]);
          row_sum[mt][e / 2] += s[mt][n][e];
        }
      }
#pragma unroll
      for (int d = 0; d < DTILES; ++d) {
        o[mt][d][0] *= alpha[0];
        o[mt][d][1] *= alpha[0];
        o[mt][d][2] *= alpha[1];
        o[mt][d][3] *= alpha[1];
      }
    }

    // O += P·V; the S accumulator layout is the A-operand layout of the next mma, and each V
    // fragment feeds every query tile of the warp.
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
      uint32_t pf[M_TILES][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt) {
        pf[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pf[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pf[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pf[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
      const int row = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
#pragma unroll
      for (int dp = 0; dp < DTILES / 2; ++dp) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, smem_addr(vs + swz<HD>(row, dp * 16 + (lane / 16) * 8)));
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma(o[mt][2 * dp], pf[mt], vf[0], vf[1]);
          mma(o[mt][2 * dp + 1], pf[mt], vf[2], vf[3]);
        }
      }
    }
    __syncthreads();
  }

  bf16* ob = out + (size_t)b * out_batch_stride + (size_t)h * HD + 2 * (lane % 4);
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_sum[mt][r] += __shfl_xor_sync(0xffffffff, row_sum[mt][r], 1);
      row_sum[mt][r] += __shfl_xor_sync(0xffffffff, row_sum[mt][r], 2);
      inv[r] = MASKED && row_sum[mt][r] == 0.f ? 0.f : 1.f / row_sum[mt][r];
    }
    const int row = m0 + warp * WARP_ROWS + mt * 16 + lane / 4;
#pragma unroll
    for (int d = 0; d < DTILES; ++d) {
      if (row < s_q) {
        *reinterpret_cast<uint32_t*>(ob + (size_t)row * out_row_stride + d * 8) =
            pack_bf16(o[mt][d][0] * inv[0], o[mt][d][1] * inv[0]);
      }
      if (row + 8 < s_q) {
        *reinterpret_cast<uint32_t*>(ob + (size_t)(row + 8) * out_row_stride + d * 8) =
            pack_bf16(o[mt][d][2] * inv[1], o[mt][d][3] * inv[1]);
      }
    }
  }
}

}  // namespace

#define FLASH_ATTENTION(HD)                                                                    \
  extern "C" __global__ void __launch_bounds__(THREADS) flash_attention_bf16_hd##HD(          \
      const bf16* q, const bf16* k, const bf16* v, bf16* out, Strides qs, Strides ks,         \
      Strides vs, int s_q, int s_kv, int heads, int kv_heads, float scale_log2,               \
      long long out_batch_stride, long long out_row_stride) {                                 \
    flash_forward<HD, false>(q, k, v, out, qs, ks, vs, s_q, s_kv, heads, kv_heads, scale_log2,\
                             out_batch_stride, out_row_stride, 0, nullptr);                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(THREADS) flash_attention_masked_bf16_hd##HD(   \
      const bf16* q, const bf16* k, const bf16* v, bf16* out, Strides qs, Strides ks,         \
      Strides vs, int s_q, int s_kv, int heads, int kv_heads, float scale_log2,               \
      long long out_batch_stride, long long out_row_stride, int causal,                       \
      const unsigned int* key_mask) {                                                         \
    flash_forward<HD, true>(q, k, v, out, qs, ks, vs, s_q, s_kv, heads, kv_heads, scale_log2, \
                            out_batch_stride, out_row_stride, causal, key_mask);              \
  }

FLASH_ATTENTION(32)
FLASH_ATTENTION(64)
FLASH_ATTENTION(128)
