// Flash attention forward for Hopper (sm_90a): the FLUX.2 joint attention (every key, H_kv = H,
// head dim 128) on warpgroup matrix instructions and the tensor memory accelerator. The result
// of `flash_attention_bf16_hd128` in flash_attention.cu: bf16 in, f32 accumulation, online
// softmax in the exp2 domain, P rounded to bf16 for P·V.
//
// Q, K and V come as tensor maps over (batch, head, row, col) with 128-byte swizzling (built by
// the host from the tensors' strides: heads are read in place). V may come in two parts: key
// rows below v_split from v, the others from v_tail (row − v_split), v_split a multiple of the
// 128-key tile (the FLUX.2 double block's text and image values, each read in place from its
// stream's projection). The output is written as (B, S_q, H·128) through out_batch_stride /
// out_row_stride (elements).
//
// One block per SM: 128 query rows, two consumer warpgroups of 64 rows each and one producer
// warpgroup (FlashAttention-3's warp specialisation). The producer's first thread loads Q once,
// then K and V tiles of 128 keys into two rings of STAGES slots each: a "full" mbarrier per
// slot counts the bytes landing, an "empty" one the eight consumer warps done with the slot (K_j
// once S_j is computed, V_j once P_j·V_j is), so K runs a tile ahead of V. The producer hands its
// registers to the consumers (setmaxnreg). Shared memory holds the tiles in the layout the copy
// engine writes and the tensor cores read: a tile is two 64-column halves, each row 128 bytes,
// the 16-byte chunk c of row r stored at chunk c ^ (r % 8).
//
// Each consumer warpgroup overlaps its softmax with its own matrix products: it issues
// S_j = Q·K_jᵀ (m64n128k16, both operands from shared memory, K-major) and O += P_{j−1}·V_{j−1}
// (m64n128k16, P from registers: the previous scores rounded to bf16 are the A fragments; V from
// shared memory as an MN-major operand, no transposition), waits for S_j only, computes its
// softmax while P·V runs on the tensor cores, then waits for P·V, rescales O and packs P_j.
#include <cuda_bf16.h>
#include <cuda.h>
#include <stdint.h>

namespace {

typedef __nv_bfloat16 bf16;

// Two consumer warpgroups and the producer warpgroup.
constexpr int THREADS = 384;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr int HD = 128;
constexpr int BLOCK_M = 128;
constexpr int BLOCK_N = 128;
constexpr int STAGES = 3;
constexpr int CONSUMER_WARPS = 8;
constexpr uint32_t Q_BYTES = BLOCK_M * HD * 2;
constexpr uint32_t KV_BYTES = BLOCK_N * HD * 2;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// Waits until at most N of this warpgroup's committed groups are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accesses to wgmma operands across its issue and wait.
template <int N>
__device__ __forceinline__ void fence_registers(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

template <int N>
__device__ __forceinline__ void fence_registers(uint32_t (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(d[i][e])::"memory");
  }
}

// Hands registers back (the producer) or takes them (the consumers): every warp of the
// warpgroup runs it.
template <int REGS>
__device__ __forceinline__ void shrink_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

template <int REGS>
__device__ __forceinline__ void grow_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}

// This thread expects `bytes` more to land on `bar` (and arrives on it).
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile(
      "{\n.reg .b64 state;\n"
      "mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(bar),
      "r"(bytes)
      : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile(
      "{\n.reg .b64 state;\n"
      "mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar)
      : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// One box of a (batch, head, row, col) tensor map into shared memory; completion counted on bar.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int col, int row,
                                         int head, int batch, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(head), "r"(batch), "r"(bar)
      : "memory");
}

// Rows [row0, row0 + ROWS) of one head: its two 64-column halves, ROWS · 128 bytes apart.
template <int ROWS>
__device__ __forceinline__ void tma_tile(uint32_t dst, const CUtensorMap* map, int row0, int head,
                                         int batch, uint32_t bar) {
  tma_load(dst, map, 0, row0, head, batch, bar);
  tma_load(dst + ROWS * 128, map, 64, row0, head, batch, bar);
}

// A shared-memory matrix descriptor with 128-byte swizzling: start address, leading and stride
// byte offsets.
__device__ __forceinline__ uint64_t descriptor(uint32_t addr, uint32_t leading, uint32_t stride) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>(leading >> 4) << 16) |
         (static_cast<uint64_t>(stride >> 4) << 32) | (1ull << 62);
}

// The 64 accumulator operands of an m64n128 wgmma.
#define ACC_64 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), \
  "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
  "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), \
  "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
  "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
  "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), \
  "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), \
  "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), \
  "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define REGS_64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, " \
  "%8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, " \
  "%40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, " \
  "%56, %57, %58, %59, %60, %61, %62, %63}"

// d = A·B (accumulate = 0) or d += A·B for one m64n128k16 step; A and B in shared memory, both
// K-major.
__device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " REGS_64
      ", %64, %65, p, 1, 1, 0, 0;\n}\n"
      : ACC_64
      : "l"(a), "l"(b), "r"(accumulate));
}

// d += A·B for one m64n128k16 step; A in registers, B in shared memory, MN-major.
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " REGS_64
      ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : ACC_64
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Issues S = Q·Kᵀ over the head dim in 16-wide steps: 4 per 64-column half, 32 bytes apart in
// a swizzled row; 8-row groups 1024 bytes apart.
__device__ __forceinline__ void issue_scores(float (&s)[64], uint32_t q_rows, uint32_t sk) {
  fence_registers(s);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    const uint32_t step = (kk % 4) * 32;
    wgmma_ss(s, descriptor(q_rows + (kk / 4) * Q_BYTES / 2 + step, 16, 1024),
             descriptor(sk + (kk / 4) * KV_BYTES / 2 + step, 16, 1024), kk > 0);
  }
  wgmma_commit();
}

// Issues O += P·V over the tile's keys in 16-key steps (2048 bytes apart); V's two 64-column
// halves are the operand's two 64-wide MN atoms (KV_BYTES / 2 apart), its 8-key groups 1024
// bytes.
__device__ __forceinline__ void issue_values(float (&o)[64], const uint32_t (&p)[BLOCK_N / 16][4],
                                             uint32_t sv) {
  fence_registers(o);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
    wgmma_rs(o, p[kk], descriptor(sv + kk * 2048, KV_BYTES / 2, 1024));
  }
  wgmma_commit();
}

// The online softmax of one tile's scores, in place: masks keys past s_kv, updates this
// thread's two rows' running max (row_max) and sum (row_sum, rescaled), leaves exp2 of the
// shifted scores in s and returns each row's rescaling of O in alpha.
__device__ __forceinline__ void softmax(float (&s)[64], float (&row_max)[2], float (&row_sum)[2],
                                        float (&alpha)[2], int key0, int s_kv, int lane,
                                        float scale_log2) {
  if (key0 + BLOCK_N > s_kv) {
#pragma unroll
    for (int i = 0; i < BLOCK_N / 2; ++i) {
      const int key = key0 + 8 * (i / 4) + 2 * (lane % 4) + (i & 1);
      s[i] = key >= s_kv ? -INFINITY : s[i];
    }
  }
  float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
  for (int i = 0; i < BLOCK_N / 2; ++i) tile_max[(i / 2) % 2] = fmaxf(tile_max[(i / 2) % 2], s[i]);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
    alpha[r] = exp2f((row_max[r] - tile_max[r]) * scale_log2);
    row_max[r] = tile_max[r];
    row_sum[r] *= alpha[r];
  }
  const float shift[2] = {row_max[0] * scale_log2, row_max[1] * scale_log2};
#pragma unroll
  for (int i = 0; i < BLOCK_N / 2; ++i) {
    s[i] = exp2f(fmaf(s[i], scale_log2, -shift[(i / 2) % 2]));
    row_sum[(i / 2) % 2] += s[i];
  }
}

// The A fragments of P·V: 16 keys per step, this thread's two rows (lane / 4, + 8) and columns
// 2·(lane % 4) (+ 8) of each step, from the score accumulators of the same positions.
__device__ __forceinline__ void pack_scores(uint32_t (&p)[BLOCK_N / 16][4], const float (&s)[64]) {
#pragma unroll
  for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
#pragma unroll
    for (int e = 0; e < 4; ++e) p[kk][e] = pack_bf16(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
  }
}

#endif

}  // namespace

// Shared memory: Q, the K ring, the V ring, 1024 bytes to align the tiles, the mbarriers
// (SHARED_BYTES in kernels/src/attention/sm90.rs).
extern "C" __global__ void __launch_bounds__(THREADS, 1) flash_attention_sm90_bf16_hd128(
    const __grid_constant__ CUtensorMap q, const __grid_constant__ CUtensorMap k,
    const __grid_constant__ CUtensorMap v, const __grid_constant__ CUtensorMap v_tail, int v_split,
    bf16* out, int s_q, int s_kv, int heads, float scale_log2, long long out_batch_stride,
    long long out_row_stride) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem[];
  // The swizzle pattern repeats every 1024 bytes: tiles start on that boundary.
  const uint32_t base = (smem_addr(smem) + 1023) & ~1023u;
  // Q, the K slots, the V slots; then the mbarriers: Q's, and each slot's K full, V full, K
  // empty and V empty.
  const uint32_t sq = base;
  const auto k_tile = [&](int t) { return sq + Q_BYTES + t * KV_BYTES; };
  const auto v_tile = [&](int t) { return sq + Q_BYTES + (STAGES + t) * KV_BYTES; };
  const uint32_t q_full = sq + Q_BYTES + 2 * STAGES * KV_BYTES;
  const auto k_full = [&](int t) { return q_full + 8 + 32 * t; };
  const auto v_full = [&](int t) { return q_full + 16 + 32 * t; };
  const auto k_empty = [&](int t) { return q_full + 24 + 32 * t; };
  const auto v_empty = [&](int t) { return q_full + 32 + 32 * t; };

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int m0 = blockIdx.x * BLOCK_M;
  const int b = blockIdx.y / heads;
  const int h = blockIdx.y % heads;
  const int tiles = (s_kv + BLOCK_N - 1) / BLOCK_N;

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int t = 0; t < STAGES; ++t) {
      mbar_init(k_full(t), 1);
      mbar_init(v_full(t), 1);
      mbar_init(k_empty(t), CONSUMER_WARPS);
      mbar_init(v_empty(t), CONSUMER_WARPS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp >= CONSUMER_WARPS) {
    // The producer: K and V tile j go to slot j % STAGES of their ring once every consumer warp
    // released the slot's previous use (K_j once S_j is computed, V_j once P_j·V_j is). Its
    // registers go to the consumers: 24 + 2 · 240 per thread for each SM sub-partition's three
    // warps fits its register file (16384). Every register the consumers take, the producer
    // must have freed (setmaxnreg.inc waits for them: 32 + 240 deadlocks).
    shrink_registers<24>();
    if (warp == CONSUMER_WARPS && lane == 0) {
      mbar_expect(q_full, Q_BYTES);
      tma_tile<BLOCK_M>(sq, &q, m0, h, b, q_full);
      for (int j = 0; j < tiles; ++j) {
        const int t = j % STAGES, use = j / STAGES;
        if (use > 0) mbar_wait(k_empty(t), (use - 1) & 1);
        mbar_expect(k_full(t), KV_BYTES);
        tma_tile<BLOCK_N>(k_tile(t), &k, j * BLOCK_N, h, b, k_full(t));
        if (use > 0) mbar_wait(v_empty(t), (use - 1) & 1);
        mbar_expect(v_full(t), KV_BYTES);
        if (j * BLOCK_N < v_split) {
          tma_tile<BLOCK_N>(v_tile(t), &v, j * BLOCK_N, h, b, v_full(t));
        } else {
          tma_tile<BLOCK_N>(v_tile(t), &v_tail, j * BLOCK_N - v_split, h, b, v_full(t));
        }
      }
    }
    return;
  }

  grow_registers<240>();
  const int wg = warp / 4;
  // This warpgroup's 64 query rows in each half of the Q tile.
  const uint32_t q_rows = sq + wg * 64 * 128;
  const auto release = [&](uint32_t empty) {
    __syncwarp();
    if (lane == 0) mbar_arrive(empty);
  };

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  // This thread's two rows of the warpgroup's 64: lane / 4 (e = 0, 1) and lane / 4 + 8 (e = 2, 3)
  // of the warp's 16, in each 8-column group n of S and O: columns 8n + 2·(lane % 4) + e % 2.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  float alpha[2];
  float s[64];
  uint32_t p[BLOCK_N / 16][4];

  mbar_wait(q_full, 0);
  mbar_wait(k_full(0), 0);
  issue_scores(s, q_rows, k_tile(0));
  wgmma_wait<0>();
  fence_registers(s);
  release(k_empty(0));
  softmax(s, row_max, row_sum, alpha, 0, s_kv, lane, scale_log2);
  pack_scores(p, s);

  for (int j = 1; j < tiles; ++j) {
    const int t = j % STAGES, prev = (j - 1) % STAGES;
    mbar_wait(k_full(t), (j / STAGES) & 1);
    mbar_wait(v_full(prev), ((j - 1) / STAGES) & 1);
    issue_scores(s, q_rows, k_tile(t));
    issue_values(o, p, v_tile(prev));
    // S_j is done, P_{j−1}·V_{j−1} may still run: its operands stay untouched until the wait.
    wgmma_wait<1>();
    fence_registers(s);
    release(k_empty(t));
    softmax(s, row_max, row_sum, alpha, j * BLOCK_N, s_kv, lane, scale_log2);
    wgmma_wait<0>();
    fence_registers(o);
    fence_registers(p);
    release(v_empty(prev));
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] *= alpha[(i / 2) % 2];
    pack_scores(p, s);
  }
  const int last = (tiles - 1) % STAGES;
  mbar_wait(v_full(last), ((tiles - 1) / STAGES) & 1);
  issue_values(o, p, v_tile(last));
  wgmma_wait<0>();
  fence_registers(o);

  bf16* ob = out + (size_t)b * out_batch_stride + (size_t)h * HD + 2 * (lane % 4);
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 2);
    inv[r] = 1.f / row_sum[r];
  }
  const int row = m0 + wg * 64 + (warp % 4) * 16 + lane / 4;
#pragma unroll
  for (int n = 0; n < 16; ++n) {
    if (row < s_q) {
      *reinterpret_cast<uint32_t*>(ob + (size_t)row * out_row_stride + n * 8) =
          pack_bf16(o[4 * n] * inv[0], o[4 * n + 1] * inv[0]);
    }
    if (row + 8 < s_q) {
      *reinterpret_cast<uint32_t*>(ob + (size_t)(row + 8) * out_row_stride + n * 8) =
          pack_bf16(o[4 * n + 2] * inv[1], o[4 * n + 3] * inv[1]);
    }
  }
#endif
}
