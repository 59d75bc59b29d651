// Flash attention forward for Hopper (sm_90a): the FLUX.2 joint attention (every key, H_kv = H,
// head dim 128) on warpgroup matrix instructions and the tensor memory accelerator. The result
// of `flash_attention_bf16_hd128` in flash_attention.cu: bf16 in, f32 accumulation, online
// softmax in the exp2 domain, P rounded to bf16 for P·V.
//
// Q, K and V come as tensor maps over (batch, head, row, col) with 128-byte swizzling (built by
// the host from the tensors' strides: heads are read in place). V may come in two parts: key
// rows below v_split from v, the others from v_tail (row − v_split), v_split a multiple of
// V_STRIP (the FLUX.2 double block's text and image values, each read in place from its
// stream's projection). The output is written as (B, S_q, H·128) through out_batch_stride /
// out_row_stride (elements).
//
// Persistent blocks, one per SM, each working through a list of query tiles (Schedule): 128
// query rows, two consumer warpgroups of 64 rows each and one producer warpgroup
// (FlashAttention-3's warp specialisation). The producer's first thread loads each tile's Q, then
// its K and V tiles of BLOCK_N keys (128 or 144: one kernel each) into two rings of STAGES slots: a
// "full" mbarrier per slot counts the bytes landing, an "empty" one the eight consumer warps done
// with the slot (K_j once S_j's softmax is done, V_j once P_j·V_j is), so K runs a tile ahead of V,
// and the next tile's loads start while the consumers finish this one. The producer hands its
// registers to the consumers (setmaxnreg). Shared memory holds the tiles in the layout the copy
// engine writes and the tensor cores read: a tile is two 64-column halves, each row 128 bytes, the
// 16-byte chunk c of row r stored at chunk c ^ (r % 8).
//
// Each consumer warpgroup overlaps its softmax with its own matrix products: it issues S_j = Q·K_jᵀ
// (m64nNk16 for N = BLOCK_N keys, both operands from shared memory, K-major) and O +=
// P_{j−1}·V_{j−1} (m64n128k16, P from registers: the previous scores rounded to bf16 are the A
// fragments; V from shared memory as an MN-major operand, no transposition), waits for S_j only,
// computes its softmax while P·V runs on the tensor cores, then waits for P·V, rescales O (only
// when a row's max grew by more than RESCALE_LOG2) and packs P_j. After an item's first tile the
// softmax takes no max: it shifts by the running max as it stands (softmax_kept), and only a tile
// whose exponentials' sums pass KEPT_SUM is computed again, S_j and all, with the softmax that
// moves the max. The two consumer warpgroups take turns issuing their products
// (FlashAttention-3's ping-pong), so one's softmax runs while the other's products do. Only an
// item's last key tile can pass the keys' end: the tiles before it skip the mask. The shared-memory
// descriptors are kept in uniform registers (uniform): the tensor cores read them from there.
//
// With q_weight (FLUX.2's blocks), Q holds the projections' raw q heads: each consumer
// warpgroup applies the per-head RMSNorm and interleaved RoPE to its 64 rows of a Q tile in
// shared memory as the tile lands (norm_rope_q), what qk_norm_rope_interleaved128_bf16 would
// have written, bit for bit.
#include <cuda_bf16.h>
#include <cuda.h>
#include <stdint.h>

#include <type_traits>

#include "qk_norm_rope.cuh"
#include "sm90.cuh"

namespace {

typedef __nv_bfloat16 bf16;

// Two consumer warpgroups and the producer warpgroup.
constexpr int THREADS = 384;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr int HD = 128;
constexpr int BLOCK_M = 128;
constexpr int CONSUMER_WARPS = 8;
constexpr uint32_t Q_BYTES = BLOCK_M * HD * 2;
// Rows of a V strip: a tile across V's split loads in strips (v_split a multiple of it).
constexpr int V_STRIP = 16;
// Bytes of a K or V tile of n keys.
__host__ __device__ constexpr uint32_t kv_bytes(int n) { return n * HD * 2; }

template <int N>
__device__ __forceinline__ void fence_registers(uint32_t (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(d[i][e])::"memory");
  }
}

// x, as the warp's lane 0 has it: the compiler then knows it uniform and keeps it in a uniform
// register.
__device__ __forceinline__ uint32_t uniform(uint32_t x) { return __shfl_sync(0xffffffff, x, 0); }

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

// The accumulator operands of an m64n144 wgmma (72), after the m64n128 one's (ACC_64).
#define ACC_72 \
  ACC_64, "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), \
  "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71])
// Their operand lists in the instruction: %0 … %63, then %64 … %71.
#define REGS_64 "{" OPERANDS_64 "}"
#define REGS_72 "{" OPERANDS_64 ", %64, %65, %66, %67, %68, %69, %70, %71}"

// d = A·B (accumulate = 0) or d += A·B for one m64nNk16 step of the scores (N keys); A and B in
// shared memory, both K-major.
template <int N>
struct ScoreMma;

template <>
struct ScoreMma<128> {
  __device__ __forceinline__ static void run(float (&d)[64], uint64_t a, uint64_t b,
                                             int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " REGS_64
        ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : ACC_64
        : "l"(a), "l"(b), "r"(accumulate));
  }
};

template <>
struct ScoreMma<144> {
  __device__ __forceinline__ static void run(float (&d)[72], uint64_t a, uint64_t b,
                                             int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %74, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n144k16.f32.bf16.bf16 " REGS_72
        ", %72, %73, p, 1, 1, 0, 0;\n}\n"
        : ACC_72
        : "l"(a), "l"(b), "r"(accumulate));
  }
};

// d += A·B for one m64n128k16 step; A in registers, B in shared memory, MN-major.
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " REGS_64
      ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : ACC_64
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// Issues S = Q·Kᵀ over the head dim in 16-wide steps: 4 per 64-column half, 32 bytes apart in
// a swizzled row; 8-row groups 1024 bytes apart. q_lo and k_lo: the descriptors' low words at the
// warpgroup's Q rows and the K tile (descriptor_lo, leading offset 16), each step a constant on.
template <int BLOCK_N>
__device__ __forceinline__ void issue_scores(float (&s)[BLOCK_N / 2], uint32_t q_lo,
                                             uint32_t k_lo) {
  fence_registers(s);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    const uint32_t step = (kk % 4) * 32;
    ScoreMma<BLOCK_N>::run(s, descriptor_of(q_lo + ((kk / 4) * Q_BYTES / 2 + step) / 16, 1024),
                           descriptor_of(k_lo + ((kk / 4) * kv_bytes(BLOCK_N) / 2 + step) / 16,
                                         1024),
                           kk > 0);
  }
  wgmma_commit();
}

// Issues O += P·V over the tile's keys in 16-key steps (2048 bytes apart); V's two 64-column
// halves are the operand's two 64-wide MN atoms (KV_BYTES / 2 apart), its 8-key groups 1024
// bytes. v_lo: the descriptor's low word at the V tile (descriptor_lo, that leading offset).
template <int BLOCK_N>
__device__ __forceinline__ void issue_values(float (&o)[64], const uint32_t (&p)[BLOCK_N / 16][4],
                                             uint32_t v_lo) {
  fence_registers(o);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
    wgmma_rs(o, p[kk], descriptor_of(v_lo + kk * 2048 / 16, 1024));
  }
  wgmma_commit();
}

// In softmax (the one that takes a tile's max), a row keeps its running max until the tile's
// passes it by more than this (in the exp2 domain): its exponentials then stay below 2^8, and O
// is rescaled only when the max moves (FlashAttention-4's lazy rescaling). P's bf16 rounding is
// relative, so its accuracy does not depend on the shift; the sum and O use the same one.
constexpr float RESCALE_LOG2 = 8.f;

// A tile's scores of keys past s_kv set to −∞ (MASK: the tile may pass it).
template <int BLOCK_N, bool MASK>
__device__ __forceinline__ void mask_scores(float (&s)[BLOCK_N / 2], int key0, int s_kv,
                                            int lane) {
  if (MASK && key0 + BLOCK_N > s_kv) {
#pragma unroll
    for (int i = 0; i < BLOCK_N / 2; ++i) {
      const int key = key0 + 8 * (i / 4) + 2 * (lane % 4) + (i & 1);
      s[i] = key >= s_kv ? -INFINITY : s[i];
    }
  }
}

// While this thread's part of a row's sum of one tile's exponentials (against the running max)
// stays at most this, none of them exceeds 2^16: no score passed the max by more than 16 in the
// exp2 domain, the values are far from any overflow, and P's bf16 rounding, being relative, is
// as accurate as against the tile's own max. A larger part sends the tile to softmax.
constexpr float KEPT_SUM = 65536.f;

// The online softmax of one tile's scores, in place, against the rows' running max as it
// stands (no max is taken): masks keys past s_kv, leaves exp2 of the shifted scores in s and
// their sums, this thread's part of each row, in tile_sum. False when a row's part passes
// KEPT_SUM: a score may have passed its running max by more than 16, and the caller redoes
// the tile with softmax.
template <int BLOCK_N, bool MASK>
__device__ __forceinline__ bool softmax_kept(float (&s)[BLOCK_N / 2], const float (&row_max)[2],
                                             float (&tile_sum)[2], int key0, int s_kv, int lane,
                                             float scale_log2) {
  mask_scores<BLOCK_N, MASK>(s, key0, s_kv, lane);
  const float shift[2] = {row_max[0] * scale_log2, row_max[1] * scale_log2};
  tile_sum[0] = tile_sum[1] = 0.f;
#pragma unroll
  for (int i = 0; i < BLOCK_N / 2; ++i) {
    s[i] = exp2f(fmaf(s[i], scale_log2, -shift[(i / 2) % 2]));
    tile_sum[(i / 2) % 2] += s[i];
  }
  // Written so that a NaN sum fails too.
  return tile_sum[0] <= KEPT_SUM && tile_sum[1] <= KEPT_SUM;
}

// The online softmax of one tile's scores, in place: masks keys past s_kv (MASK: the tile may
// pass it), updates this thread's two rows' running max (row_max: kept unless the tile's passes
// it by more than RESCALE_LOG2) and sum (row_sum, rescaled), leaves exp2 of the shifted scores
// in s and returns each row's rescaling of O in alpha (1: kept) and whether any of the warp's
// rows has one other than 1.
template <int BLOCK_N, bool MASK>
__device__ __forceinline__ bool softmax(float (&s)[BLOCK_N / 2], float (&row_max)[2],
                                        float (&row_sum)[2], float (&alpha)[2], int key0,
                                        int s_kv, int lane, float scale_log2) {
  mask_scores<BLOCK_N, MASK>(s, key0, s_kv, lane);
  // Each row's max in four independent chains, then combined: 8 + 3 dependent steps a row
  // instead of 36 (a max is exact, so the order changes nothing). Elements 0..7 start the
  // chains: row (i / 2) % 2, chain i % 2 + 2 · ((i / 4) % 2).
  float chain[2][4];
#pragma unroll
  for (int i = 0; i < BLOCK_N / 2; ++i) {
    float& m = chain[(i / 2) % 2][(i % 2) + 2 * ((i / 4) % 2)];
    m = i < 8 ? s[i] : fmaxf(m, s[i]);
  }
  float tile_max[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    tile_max[r] = fmaxf(fmaxf(fmaxf(chain[r][0], chain[r][1]), fmaxf(chain[r][2], chain[r][3])),
                        row_max[r]);
  }
  bool grows = false;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
    const bool grow = (tile_max[r] - row_max[r]) * scale_log2 > RESCALE_LOG2;
    alpha[r] = grow ? exp2f((row_max[r] - tile_max[r]) * scale_log2) : 1.f;
    row_max[r] = grow ? tile_max[r] : row_max[r];
    row_sum[r] *= alpha[r];
    grows |= grow;
  }
  const float shift[2] = {row_max[0] * scale_log2, row_max[1] * scale_log2};
#pragma unroll
  for (int i = 0; i < BLOCK_N / 2; ++i) {
    s[i] = exp2f(fmaf(s[i], scale_log2, -shift[(i / 2) % 2]));
    row_sum[(i / 2) % 2] += s[i];
  }
  return __any_sync(0xffffffff, grows);
}

// The A fragments of P·V: 16 keys per step, this thread's two rows (lane / 4, + 8) and columns
// 2·(lane % 4) (+ 8) of each step, from the score accumulators of the same positions.
template <int BLOCK_N>
__device__ __forceinline__ void pack_scores(uint32_t (&p)[BLOCK_N / 16][4],
                                            const float (&s)[BLOCK_N / 2]) {
#pragma unroll
  for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
#pragma unroll
    for (int e = 0; e < 4; ++e) p[kk][e] = pack_bf16(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
  }
}


// One block's share of the work, the same sequence for its producer and its consumers. A work
// item is one query tile (128 rows of one batch item and head) against its key tiles [kb0,
// kb1). The first `rounds` items of block g are whole tiles n · gridDim.x + g. The query tiles
// left after them (fewer than the blocks) would run as one partial wave; instead their
// (tile, key tile) pairs, in order, are cut into split_blocks equal ranges, one per block:
// block g takes [g · W / P, (g + 1) · W / P), one item per tile the range touches. An item
// short of its tile's keys writes its partial result to slot 2g (its range's first tile) or
// 2g + 1 (its last), and the tile's last part to finish merges them.
struct Schedule {
  int tiles;         // query tiles over every batch item and head
  int key_tiles;     // key tiles a query tile attends
  int rounds;        // whole tiles a block takes before the split
  int split_blocks;  // blocks sharing the remaining tiles' key tiles (0: none remain)

  __device__ int first_split_tile() const { return rounds * gridDim.x; }
  __device__ int split_units() const { return (tiles - first_split_tile()) * key_tiles; }
  __device__ int range_start(int g) const {
    return static_cast<int>(static_cast<long long>(g) * split_units() / split_blocks);
  }
  // The block whose range holds split unit u.
  __device__ int block_of(int u) const {
    const long long w = split_units();
    return static_cast<int>(((u + 1ll) * split_blocks + w - 1) / w) - 1;
  }
  // Block g's item n: false past its last.
  __device__ bool item(int g, int n, int& tile, int& kb0, int& kb1, int& slot) const {
    if (n < rounds) {
      tile = n * gridDim.x + g;
      kb0 = 0;
      kb1 = key_tiles;
      slot = -1;
      return true;
    }
    if (g >= split_blocks) return false;
    const int begin = range_start(g), end = range_start(g + 1);
    const int first = begin / key_tiles, t = first + n - rounds;
    if (t * key_tiles >= end) return false;
    tile = first_split_tile() + t;
    kb0 = max(begin - t * key_tiles, 0);
    kb1 = min(end - t * key_tiles, key_tiles);
    slot = kb0 == 0 && kb1 == key_tiles ? -1 : 2 * g + (t != first);
    return true;
  }
  __device__ bool has_item(int g, int n) const {
    int tile, kb0, kb1, slot;
    return item(g, n, tile, kb0, kb1, slot);
  }
};

// A partial result: per consumer warpgroup, O unnormalised (16 float4 per thread, stored
// float4-index-major so a warp's stores are contiguous), then each thread's two rows' max and
// sum.
constexpr int PART_O = 64 * 128;
constexpr int PART_FLOATS = PART_O + 4 * 128;

// Q's per-head RMSNorm (weight after rounding) and interleaved RoPE, in place on this consumer
// warpgroup's 64 rows of the Q tile at `rows` (query q0 + r in row r): 16 threads a row, thread
// l of them the row's columns 8l..8l+7, chunk l % 8 of half l / 8, which the 128-byte swizzle
// stores at chunk (l % 8) ^ (r % 8). Rows past s_q (zeros) are left as they are. The caller
// makes the writes visible to the tensor cores (fence.proxy.async, then a warpgroup barrier).
__device__ __forceinline__ void norm_rope_q(uint32_t rows, int t, int q0, int s_q, const bf16* w,
                                            const float* cos, const float* sin, int rope_offset,
                                            float eps) {
  const int l = t % 16;
  float wv[8];
  const uint4 raw = *reinterpret_cast<const uint4*>(w + 8 * l);
  unpack8(raw, wv);
#pragma unroll 4
  for (int i = 0; i < 8; ++i) {
    const int r = 8 * i + t / 16, q = q0 + r;
    const uint32_t at = rows + (l / 8) * (BLOCK_M * 128) + r * 128 + (((l % 8) ^ (r % 8)) * 16);
    uint32_t u[4];
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(u[0]), "=r"(u[1]), "=r"(u[2]), "=r"(u[3])
                 : "r"(at));
    float v[8];
    unpack8(*reinterpret_cast<const uint4*>(u), v);
    const float rstd = head_rstd(v, eps);
    if (q >= s_q) continue;
    const size_t row = (size_t)(rope_offset + q) * 64;
    const float4 c = reinterpret_cast<const float4*>(cos + row)[l];
    const float4 sn = reinterpret_cast<const float4*>(sin + row)[l];
    float y[8];
    norm_rope8(v, rstd, wv, c, sn, y);
#pragma unroll
    for (int e = 0; e < 4; ++e) u[e] = pack_bf16(y[2 * e], y[2 * e + 1]);
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(at), "r"(u[0]), "r"(u[1]),
                 "r"(u[2]), "r"(u[3])
                 : "memory");
  }
}

// Whether any of the warpgroup's 128 threads passes `x` (a barrier among them).
__device__ __forceinline__ bool any_in_warpgroup(int id, bool x) {
  uint32_t r;
  asm volatile(
      "{\n.reg .pred p, q;\nsetp.ne.u32 q, %1, 0;\nbar.red.or.pred p, %2, 128, q;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(r)
      : "r"(static_cast<uint32_t>(x)), "r"(id)
      : "memory");
  return r != 0;
}

// This thread's 64 values of O scaled per row, as bf16, into rows row and row + 8 below s_q.
__device__ __forceinline__ void store_rows(bf16* ob, const float (&o)[64], const float (&f)[2],
                                           int row, int s_q, long long out_row_stride) {
#pragma unroll
  for (int n = 0; n < 16; ++n) {
    if (row < s_q) {
      *reinterpret_cast<uint32_t*>(ob + (size_t)row * out_row_stride + n * 8) =
          pack_bf16(o[4 * n] * f[0], o[4 * n + 1] * f[0]);
    }
    if (row + 8 < s_q) {
      *reinterpret_cast<uint32_t*>(ob + (size_t)(row + 8) * out_row_stride + n * 8) =
          pack_bf16(o[4 * n + 2] * f[1], o[4 * n + 3] * f[1]);
    }
  }
}

// Stores this warpgroup's part of a split tile; the last of the tile's parts to arrive (counted
// per tile and warpgroup) merges every part, in block order, into o and sum (true).
__device__ __forceinline__ bool merge_parts(float (&o)[64], float (&row_max)[2],
                                            float (&row_sum)[2], const Schedule& sched,
                                            int tile, int slot, int wg, float* partials,
                                            unsigned* arrivals, float scale_log2) {
  const int tid = threadIdx.x % 128;
  float* part = partials + (static_cast<size_t>(slot) * 2 + wg) * PART_FLOATS;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    __stcg(reinterpret_cast<float4*>(part) + i * 128 + tid,
           make_float4(o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]));
  }
  __stcg(part + PART_O + tid, row_max[0]);
  __stcg(part + PART_O + 128 + tid, row_max[1]);
  __stcg(part + PART_O + 256 + tid, row_sum[0]);
  __stcg(part + PART_O + 384 + tid, row_sum[1]);
  __threadfence();
  named_barrier(1 + wg);
  const int t = tile - sched.first_split_tile();
  const int g0 = sched.block_of(t * sched.key_tiles);
  const int g1 = sched.block_of((t + 1) * sched.key_tiles - 1);
  bool last = false;
  if (tid == 0) {
    // The last part resets the count: every part has arrived, and the next launch (in stream
    // order) finds it zero.
    last = atomicAdd(arrivals + 2 * t + wg, 1u) == static_cast<unsigned>(g1 - g0);
    if (last) arrivals[2 * t + wg] = 0;
  }
  if (!any_in_warpgroup(1 + wg, last)) return false;
  __threadfence();
  const auto slot_of = [&](int g) {
    return 2 * g + (t != sched.range_start(g) / sched.key_tiles);
  };
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  for (int g = g0; g <= g1; ++g) {
    const float* p = partials + (static_cast<size_t>(slot_of(g)) * 2 + wg) * PART_FLOATS;
#pragma unroll
    for (int r = 0; r < 2; ++r) row_max[r] = fmaxf(row_max[r], __ldcg(p + PART_O + 128 * r + tid));
  }
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  for (int g = g0; g <= g1; ++g) {
    const float* p = partials + (static_cast<size_t>(slot_of(g)) * 2 + wg) * PART_FLOATS;
    float f[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      f[r] = exp2f((__ldcg(p + PART_O + 128 * r + tid) - row_max[r]) * scale_log2);
      row_sum[r] += __ldcg(p + PART_O + 256 + 128 * r + tid) * f[r];
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(p) + i * 128 + tid);
      o[4 * i] += v.x * f[0];
      o[4 * i + 1] += v.y * f[0];
      o[4 * i + 2] += v.z * f[1];
      o[4 * i + 3] += v.w * f[1];
    }
  }
  return true;
}

#endif

}  // namespace

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The kernel's body for key tiles of BLOCK_N keys in rings of STAGES slots.
template <int BLOCK_N, int STAGES>
__device__ __forceinline__ void attend(
    const CUtensorMap& q, const CUtensorMap& k, const CUtensorMap& v, const CUtensorMap& v_tail,
    const CUtensorMap& v_strips, const CUtensorMap& v_tail_strips, int v_split, bf16* out,
    int s_q, int s_kv, int heads, float scale_log2, long long out_batch_stride,
    long long out_row_stride, int q_tiles, int tiles, int rounds, int split_blocks,
    float* partials, unsigned* arrivals, const bf16* q_weight, const float* q_cos,
    const float* q_sin, int q_rope_offset, float q_eps, const CUtensorMap& q_tail, int q_split,
    const bf16* q_tail_weight) {
  extern __shared__ __align__(1024) unsigned char smem[];
  // The swizzle pattern repeats every 1024 bytes: tiles start on that boundary.
  const uint32_t base = (smem_addr(smem) + 1023) & ~1023u;
  // Q, the K slots, the V slots; then the mbarriers: Q full and Q empty, and each slot's K
  // full, V full, K empty and V empty.
  const uint32_t sq = base;
  constexpr uint32_t KV_BYTES = kv_bytes(BLOCK_N);
  const auto k_tile = [&](int t) { return sq + Q_BYTES + t * KV_BYTES; };
  const auto v_tile = [&](int t) { return sq + Q_BYTES + (STAGES + t) * KV_BYTES; };
  const uint32_t q_full = sq + Q_BYTES + 2 * STAGES * KV_BYTES;
  const uint32_t q_empty = q_full + 8;
  const auto k_full = [&](int t) { return q_full + 16 + 32 * t; };
  const auto v_full = [&](int t) { return q_full + 24 + 32 * t; };
  const auto k_empty = [&](int t) { return q_full + 32 + 32 * t; };
  const auto v_empty = [&](int t) { return q_full + 40 + 32 * t; };

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = blockIdx.x;
  const Schedule sched{tiles, (s_kv + BLOCK_N - 1) / BLOCK_N, rounds, split_blocks};

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    mbar_init(q_empty, CONSUMER_WARPS);
    for (int t = 0; t < STAGES; ++t) {
      mbar_init(k_full(t), 1);
      mbar_init(v_full(t), 1);
      mbar_init(k_empty(t), CONSUMER_WARPS);
      mbar_init(v_empty(t), CONSUMER_WARPS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  int tile, kb0, kb1, slot;
  if (warp >= CONSUMER_WARPS) {
    // The producer: each item's Q once the consumers are done with the last one's (after its last
    // tile's softmax), then its K and V tiles through the rings: key tile c of the block's sequence
    // goes to slot c % STAGES once every consumer warp released the slot's previous use (K once S's
    // softmax is done, V once P·V is), so K runs a tile ahead of V and the next item's tiles load
    // while the consumers finish this one. Its registers go to the consumers: 24 + 2 · 240 per
    // thread for each SM sub-partition's three warps fits its register file (16384). Every register
    // the consumers take, the producer must have freed (setmaxnreg.inc waits for them: 32 + 240
    // deadlocks).
    shrink_registers<24>();
    if (warp != CONSUMER_WARPS || lane != 0) return;
    int c = 0;
    for (int n = 0; sched.item(g, n, tile, kb0, kb1, slot); ++n) {
      const int bh = tile / q_tiles, m0 = (tile % q_tiles) * BLOCK_M;
      const int b = bh / heads, h = bh % heads;
      if (n > 0) mbar_wait(q_empty, (n - 1) & 1);
      mbar_expect(q_full, Q_BYTES);
      if (m0 < q_split) {
        tma_tile<BLOCK_M>(sq, &q, m0, h, b, q_full);
      } else {
        tma_tile<BLOCK_M>(sq, &q_tail, m0 - q_split, h, b, q_full);
      }
      for (int j = kb0; j < kb1; ++j, ++c) {
        const int t = c % STAGES, use = c / STAGES;
        if (use > 0) mbar_wait(k_empty(t), (use - 1) & 1);
        mbar_expect(k_full(t), KV_BYTES);
        tma_tile<BLOCK_N>(k_tile(t), &k, j * BLOCK_N, h, b, k_full(t));
        if (use > 0) mbar_wait(v_empty(t), (use - 1) & 1);
        mbar_expect(v_full(t), KV_BYTES);
        const int row0 = j * BLOCK_N;
        if (row0 + BLOCK_N <= v_split) {
          tma_tile<BLOCK_N>(v_tile(t), &v, row0, h, b, v_full(t));
        } else if (row0 >= v_split) {
          tma_tile<BLOCK_N>(v_tile(t), &v_tail, row0 - v_split, h, b, v_full(t));
        } else {
          // A tile across the split: strips of V_STRIP rows, each from its side.
          for (int r = 0; r < BLOCK_N; r += V_STRIP) {
            const uint32_t dst = v_tile(t) + r * 128;
            if (row0 + r < v_split) {
              tma_tile<BLOCK_N>(dst, &v_strips, row0 + r, h, b, v_full(t));
            } else {
              tma_tile<BLOCK_N>(dst, &v_tail_strips, row0 + r - v_split, h, b, v_full(t));
            }
          }
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
  // This thread's two rows of the warpgroup's 64: lane / 4 (e = 0, 1) and lane / 4 + 8 (e = 2, 3)
  // of the warp's 16, in each 8-column group n of S and O: columns 8n + 2·(lane % 4) + e % 2.
  float o[64];
  float row_max[2], row_sum[2], alpha[2];
  float s[BLOCK_N / 2];
  uint32_t p[BLOCK_N / 16][4];

  // The warpgroups' turns at issuing matrix products: warpgroup wg waits for its turn on
  // barrier 3 + wg (both warpgroups' threads) and passes it on the other's. Warpgroup 0 goes
  // first; warpgroup 1 does not pass its last turn, so no arrival is left pending at exit
  // (the host launches only blocks with items).
  const auto my_turn = [&] { asm volatile("bar.sync %0, 256;\n" ::"r"(3 + wg) : "memory"); };
  const auto pass_turn = [&] { asm volatile("bar.arrive %0, 256;\n" ::"r"(4 - wg) : "memory"); };
  if (wg == 1) pass_turn();
  int c = 0;
  for (int n = 0; sched.item(g, n, tile, kb0, kb1, slot); ++n) {
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
    const int count = kb1 - kb0;
    mbar_wait(q_full, n & 1);
    if (q_weight != nullptr) {
      const int m0 = (tile % q_tiles) * BLOCK_M;
      norm_rope_q(q_rows, threadIdx.x % 128, m0 + wg * 64, s_q,
                  m0 < q_split ? q_weight : q_tail_weight, q_cos, q_sin, q_rope_offset, q_eps);
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      named_barrier(1 + wg);
    }
    const uint32_t q_lo = uniform(descriptor_lo(q_rows, 16));
    mbar_wait(k_full(c % STAGES), (c / STAGES) & 1);
    my_turn();
    issue_scores<BLOCK_N>(s, q_lo, uniform(descriptor_lo(k_tile(c % STAGES), 16)));
    pass_turn();
    wgmma_wait<0>();
    fence_registers(s);
    release(k_empty(c % STAGES));
    if (count == 1) release(q_empty);
    softmax<BLOCK_N, true>(s, row_max, row_sum, alpha, kb0 * BLOCK_N, s_kv, lane, scale_log2);
    pack_scores<BLOCK_N>(p, s);

    // The item's key tile j > 0: S_j, with P_{j−1}·V_{j−1} behind it on the tensor cores.
    const auto step = [&](int j, auto mask) {
      const int t = (c + j) % STAGES, prev = (c + j - 1) % STAGES;
      mbar_wait(k_full(t), ((c + j) / STAGES) & 1);
      mbar_wait(v_full(prev), ((c + j - 1) / STAGES) & 1);
      const uint32_t k_lo = uniform(descriptor_lo(k_tile(t), 16));
      my_turn();
      issue_scores<BLOCK_N>(s, q_lo, k_lo);
      issue_values<BLOCK_N>(o, p, uniform(descriptor_lo(v_tile(prev), KV_BYTES / 2)));
      pass_turn();
      // S_j is done, P_{j−1}·V_{j−1} may still run: its operands stay untouched until the wait.
      wgmma_wait<1>();
      fence_registers(s);
      constexpr bool MASK = decltype(mask)::value;
      const int key0 = (kb0 + j) * BLOCK_N;
      bool rescale = false;
      float tile_sum[2];
      const bool kept =
          softmax_kept<BLOCK_N, MASK>(s, row_max, tile_sum, key0, s_kv, lane, scale_log2);
      // The whole warpgroup decides: the products below are the warpgroup's.
      if (any_in_warpgroup(1 + wg, !kept)) {
        // A score passed its row's running max by more than 16: S_j again (Q and K_j are
        // still held), then the softmax that moves the max.
        issue_scores<BLOCK_N>(s, q_lo, k_lo);
        wgmma_wait<0>();
        fence_registers(s);
        rescale = softmax<BLOCK_N, MASK>(s, row_max, row_sum, alpha, key0, s_kv, lane, scale_log2);
      } else {
        row_sum[0] += tile_sum[0];
        row_sum[1] += tile_sum[1];
      }
      release(k_empty(t));
      if (j == count - 1) release(q_empty);
      wgmma_wait<0>();
      fence_registers(o);
      fence_registers(p);
      release(v_empty(prev));
      if (rescale) {
#pragma unroll
        for (int i = 0; i < 64; ++i) o[i] *= alpha[(i / 2) % 2];
      }
      pack_scores<BLOCK_N>(p, s);
    };
    // Only the item's last key tile can pass s_kv: the others run without the mask.
    const int unmasked = kb1 * BLOCK_N > s_kv ? count - 1 : count;
    for (int j = 1; j < unmasked; ++j) step(j, std::false_type{});
    if (count > 1 && unmasked < count) step(count - 1, std::true_type{});
    c += count;
    const int last = (c - 1) % STAGES;
    mbar_wait(v_full(last), ((c - 1) / STAGES) & 1);
    my_turn();
    issue_values<BLOCK_N>(o, p, uniform(descriptor_lo(v_tile(last), KV_BYTES / 2)));
    if (wg == 0 || sched.has_item(g, n + 1)) pass_turn();
    wgmma_wait<0>();
    fence_registers(o);
    fence_registers(p);
    release(v_empty(last));

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 1);
      row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 2);
    }
    if (slot >= 0 && !merge_parts(o, row_max, row_sum, sched, tile, slot, wg, partials, arrivals,
                                  scale_log2)) {
      continue;
    }
    const int bh = tile / q_tiles;
    bf16* ob = out + (size_t)(bh / heads) * out_batch_stride + (size_t)(bh % heads) * HD +
               2 * (lane % 4);
    const float inv[2] = {1.f / row_sum[0], 1.f / row_sum[1]};
    const int row = (tile % q_tiles) * BLOCK_M + wg * 64 + (warp % 4) * 16 + lane / 4;
    store_rows(ob, o, inv, row, s_q, out_row_stride);
  }
}

#endif

// The kernels' parameters: Q, K and V tensor maps (boxes of 64 columns × the block's rows or
// the key tile's), V's tail, and both again in boxes of V_STRIP rows (the tile across the
// split); the output; the schedule (Schedule) and its partial results: `partials` holds
// 2 · split_blocks slots of 2 · PART_FLOATS, `arrivals` one zeroed counter per split tile and
// consumer warpgroup (left zeroed); Q's norm weight (128 bf16, null: Q is used as it comes),
// RoPE tables (rows of 64 f32 cos / sin, query q at row q_rope_offset + q) and eps; Q's tail:
// query rows from q_split on (a multiple of BLOCK_M) come from q_tail (row − q_split),
// normalised with q_tail_weight (FLUX.2's double block: the text then the image queries, each
// from its own projection). Shared memory: Q, the K ring, the V ring, 1024 bytes to align the
// tiles, the mbarriers (`shared_bytes` in kernels/src/attention/sm90.rs).
#define ATTENTION_PARAMS                                                                      \
  const __grid_constant__ CUtensorMap q, const __grid_constant__ CUtensorMap k,               \
      const __grid_constant__ CUtensorMap v, const __grid_constant__ CUtensorMap v_tail,      \
      const __grid_constant__ CUtensorMap v_strips,                                           \
      const __grid_constant__ CUtensorMap v_tail_strips, int v_split, bf16* out, int s_q,     \
      int s_kv, int heads, float scale_log2, long long out_batch_stride,                      \
      long long out_row_stride, int q_tiles, int tiles, int rounds, int split_blocks,         \
      float* partials, unsigned* arrivals, const bf16* q_weight, const float* q_cos,           \
      const float* q_sin, int q_rope_offset, float q_eps,                                     \
      const __grid_constant__ CUtensorMap q_tail, int q_split, const bf16* q_tail_weight
#define ATTENTION_ARGS                                                                        \
  q, k, v, v_tail, v_strips, v_tail_strips, v_split, out, s_q, s_kv, heads, scale_log2,       \
      out_batch_stride, out_row_stride, q_tiles, tiles, rounds, split_blocks, partials, arrivals, \
      q_weight, q_cos, q_sin, q_rope_offset, q_eps, q_tail, q_split, q_tail_weight

// Key tiles of 128 keys, three slots a ring.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    flash_attention_sm90_bf16_hd128_n128(ATTENTION_PARAMS) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  attend<128, 3>(ATTENTION_ARGS);
#endif
}

// Key tiles of 144 keys, two slots a ring.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    flash_attention_sm90_bf16_hd128_n144(ATTENTION_PARAMS) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  attend<144, 2>(ATTENTION_ARGS);
#endif
}
