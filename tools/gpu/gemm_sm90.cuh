// Klein's own Hopper GEMM (sm_90a), y = x·Wᵀ on warpgroup matrix instructions and the tensor
// memory accelerator, bf16 in, f32 accumulation, bf16 out, in the order cuBLAS's Hopper kernels
// accumulate (the same bits as cuBLASLt's first choice on every shape tried, on H100 and H200).
// Timed against cuBLASLt by tools/gpu/gemm_sm90.cu (tools/gpu/device.sh gemm-sm90): at the
// power cap it runs the step's wide products 2–4 % faster than cuBLASLt's first choice but not
// faster than the 168 × 128 tile the linear layers' tuner picks, so the service does not use
// it (docs/performance.md, twenty-first session). It stays here as the base for fused
// epilogues, the route that section describes.
//
// x comes as a tensor map over (batch, row, col) (rows may be strided: read in place), W (n, k)
// as one over (row, col), the output as one over (batch, row, col), written through the copy
// engine (rows and columns past its extent clipped), all with 128-byte swizzling.
//
// Persistent blocks, one per SM, each taking output tiles t = blockIdx.x + i · gridDim.x of BM ×
// BN, the row tiles of every batch item fastest (consecutive blocks share W's tile in L2). The
// producer warpgroup's first thread loads each tile's K steps (BK columns of x's BM rows and of
// W's BN rows, as two boxes of BN / 2 rows) into a ring of STAGES slots; a "full" mbarrier per
// slot counts the bytes landing, an "empty" one the eight consumer warps done with it. Two
// consumer warpgroups take 64 rows each: m64n256k16 products from shared memory (both operands
// K-major), one step's group left in flight while the next is issued. The epilogue goes
// through a staging buffer and the producer warpgroup's second warp (see gemm_body), so that
// the tensor cores never wait for it: with per-thread stores from registers instead, each tile
// cost ~5 µs more.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "../../kernels/src/cuda/sm90.cuh"

namespace {

typedef __nv_bfloat16 bf16;

// Two consumer warpgroups and the producer warpgroup.
constexpr int GEMM_THREADS = 384;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr int BM = 128;
constexpr int BN = 256;
constexpr int BK = 64;
constexpr int GEMM_CONSUMER_WARPS = 8;
constexpr uint32_t A_BYTES = BM * BK * 2;
constexpr uint32_t B_HALF_BYTES = (BN / 2) * BK * 2;
constexpr uint32_t STAGE_BYTES = A_BYTES + 2 * B_HALF_BYTES;
// The staging buffer of a consumer warpgroup's part of the output tile: four boxes of 64 rows
// × 64 columns.
constexpr uint32_t BOX_BYTES = 64 * 64 * 2;
constexpr uint32_t STAGING_BYTES = 4 * BOX_BYTES;

// Box (col, row, batch) of a 3-d tensor map into shared memory; completion counted on bar.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int col, int row,
                                            int batch, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3, %4}], [%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(batch), "r"(bar)
      : "memory");
}

// Box (col, row) of a 2-d tensor map into shared memory; completion counted on bar.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int col, int row,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, "
      "{%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(bar)
      : "memory");
}

// Box (col, row, batch) of a 3-d tensor map from shared memory to global memory (rows past the
// map's clipped), in this thread's bulk group.
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, uint32_t src, int col,
                                             int row, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(col), "r"(row), "r"(batch), "r"(src)
      : "memory");
}

__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

// Waits until this thread's bulk stores no longer read shared memory.
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}

// Four 8 × 8 bf16 matrices from the mma fragments of a warp into shared memory: this lane's
// row of matrix lane / 8 at `row`.
__device__ __forceinline__ void stmatrix_x4(uint32_t row, uint32_t a, uint32_t b, uint32_t c,
                                            uint32_t d) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(row),
               "r"(a), "r"(b), "r"(c), "r"(d)
               : "memory");
}

// The 128 accumulator operands of an m64n256 wgmma and their list in the instruction.
#define ACC_128 \
  ACC_64, \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), \
  "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), \
  "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), \
  "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), \
  "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), \
  "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), \
  "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), \
  "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), \
  "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
#define REGS_128 \
  "{" OPERANDS_64 ", " \
  "%64, %65, %66, %67, %68, %69, %70, %71, " \
  "%72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, " \
  "%88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, " \
  "%104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, " \
  "%120, %121, %122, %123, %124, %125, %126, %127" "}"

// d = A·B (accumulate = 0) or d += A·B for one m64n256k16 step, both operands in shared memory,
// K-major.
__device__ __forceinline__ void mma_m64n256k16(float (&d)[128], uint64_t a, uint64_t b,
                                               int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " REGS_128
      ", %128, %129, p, 1, 1, 0, 0;\n}\n"
      : ACC_128
      : "l"(a), "l"(b), "r"(accumulate));
}

// The output tiles: row tiles over every batch item fastest, then column tiles.
struct GemmTiles {
  int row_tiles;  // per batch item
  int batches;
  int col_tiles;

  __device__ int count() const { return row_tiles * batches * col_tiles; }
  __device__ void at(int t, int& batch, int& row0, int& col_tile) const {
    const int m = t % (row_tiles * batches);
    col_tile = t / (row_tiles * batches);
    batch = m / row_tiles;
    row0 = (m % row_tiles) * BM;
  }
};

// The byte offset of 16-byte chunk cc (of 32) in row r of the staging buffer: box cc / 8, its
// 128-byte rows swizzled (chunk c of row r at chunk c ^ (r % 8)).
__device__ __forceinline__ uint32_t staged_chunk(int r, int cc) {
  return (cc / 8) * BOX_BYTES + r * 128 + (((cc % 8) ^ (r % 8)) * 16);
}

#endif

}  // namespace

// x (batch, rows, k) through tensor map `a` (boxes of BK columns × BM rows), W through `b`
// (boxes of BK columns × BN / 2 rows), out (batch, rows, ·) through `c` (boxes of 64 columns ×
// 64 rows). Shared memory: STAGES slots of STAGE_BYTES, the staging buffer, 1024 bytes to align
// them, the mbarriers (`kShared` in gemm_sm90.cu).
//
// The consumer warpgroups hand their parts of each finished tile to the producer warpgroup's
// second warp through one staging buffer, the first warpgroup's part then the second's: each
// writes its values, rounded to bf16, into the buffer (stmatrix) and arrives on `staged`; that
// warp's first thread hands the part to the copy engine and, once it has been read out, arrives
// on the other warpgroup's `released`, which that warpgroup waits on before it stages. The
// second warpgroup thus waits for the first's part to be written out while the first already
// runs the next tile's products, and runs that far behind it from then on: each warpgroup's
// epilogue overlaps the other's products. (Four slots and two staging buffers do not fit in
// shared memory; three slots were 5 % slower.)
template <int STAGES>
__device__ __forceinline__ void gemm_body(const CUtensorMap& a, const CUtensorMap& b,
                                          const CUtensorMap& c_map, int rows, int batches, int k,
                                          int n) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t base = (smem_addr(smem) + 1023) & ~1023u;
  const auto a_tile = [&](int s) { return base + s * STAGE_BYTES; };
  const auto b_tile = [&](int s) { return base + s * STAGE_BYTES + A_BYTES; };
  const uint32_t staging = base + STAGES * STAGE_BYTES;
  const uint32_t bars = staging + STAGING_BYTES;
  const auto full = [&](int s) { return bars + 16 * s; };
  const auto empty = [&](int s) { return bars + 16 * s + 8; };
  const uint32_t staged = bars + 16 * STAGES;
  const auto released = [&](int wg) { return staged + 8 + 8 * wg; };

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int k_steps = (k + BK - 1) / BK;
  const GemmTiles tiles{(rows + BM - 1) / BM, batches, (n + BN - 1) / BN};

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), GEMM_CONSUMER_WARPS);
    }
    mbar_init(staged, GEMM_CONSUMER_WARPS / 2);
    mbar_init(released(0), 1);
    mbar_init(released(1), 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  int batch, row0, col_tile;
  if (warp >= GEMM_CONSUMER_WARPS) {
    // The producer warpgroup hands registers to the consumers: 56 + 2 · 224 per thread for each
    // SM sub-partition's three warps fits its register file.
    shrink_registers<56>();
    if (warp > GEMM_CONSUMER_WARPS + 1 || lane != 0) return;
    if (warp == GEMM_CONSUMER_WARPS) {
      // The loads: K step c of the block's sequence goes to slot c % STAGES once the consumers
      // released the slot's previous use.
      int c = 0;
      for (int t = blockIdx.x; t < tiles.count(); t += gridDim.x) {
        tiles.at(t, batch, row0, col_tile);
        const int w0 = col_tile * BN, w1 = w0 + BN / 2;
        for (int ks = 0; ks < k_steps; ++ks, ++c) {
          const int s = c % STAGES, use = c / STAGES;
          if (use > 0) mbar_wait(empty(s), (use - 1) & 1);
          mbar_expect(full(s), STAGE_BYTES);
          tma_load_3d(a_tile(s), &a, ks * BK, row0, batch, full(s));
          tma_load_2d(b_tile(s), &b, ks * BK, w0, full(s));
          tma_load_2d(b_tile(s) + B_HALF_BYTES, &b, ks * BK, w1, full(s));
        }
      }
      return;
    }
    // The epilogue: each staged part to global memory.
    int u = 0;
    for (int t = blockIdx.x; t < tiles.count(); t += gridDim.x) {
      tiles.at(t, batch, row0, col_tile);
      for (int wg = 0; wg < 2; ++wg, ++u) {
        mbar_wait(staged, u & 1);
        for (int box = 0; box < 4; ++box) {
          tma_store_3d(&c_map, staging + box * BOX_BYTES, col_tile * BN + 64 * box,
                       row0 + 64 * wg, batch);
        }
        bulk_commit();
        bulk_wait_read();
        mbar_arrive(released(1 - wg));
      }
    }
    return;
  }

  grow_registers<224>();
  const int wg = warp / 4;
  const auto release = [&](int s) {
    __syncwarp();
    if (lane == 0) mbar_arrive(empty(s));
  };
  // This thread's rows lane / 4 (e = 0, 1) and lane / 4 + 8 (e = 2, 3) of its warp's 16, in
  // each 8-column group n of the tile: columns 8n + 2·(lane % 4) + e % 2, value d[4n + e].
  float d[128];
  // This lane's row of its stmatrix matrix lane / 8 in the warpgroup's 64: rows 0–7 of the
  // warp's 16 for matrices 0 and 2, rows 8–15 for 1 and 3.
  const int r = (warp % 4) * 16 + (lane / 8 % 2) * 8 + lane % 8;
  int c = 0, m = 0;
  for (int tile = blockIdx.x; tile < tiles.count(); tile += gridDim.x, ++m) {
    tiles.at(tile, batch, row0, col_tile);
    for (int ks = 0; ks < k_steps; ++ks, ++c) {
      const int s = c % STAGES;
      mbar_wait(full(s), (c / STAGES) & 1);
      fence_registers(d);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        mma_m64n256k16(d, descriptor(a_tile(s) + wg * 64 * 128 + kk * 32, 16, 1024),
                       descriptor(b_tile(s) + kk * 32, 16, 1024), ks > 0 || kk > 0);
      }
      wgmma_commit();
      // The previous step's products are done: its slot is free.
      wgmma_wait<1>();
      fence_registers(d);
      if (ks > 0) release((c - 1) % STAGES);
    }
    wgmma_wait<0>();
    fence_registers(d);
    release((c - 1) % STAGES);

    // This warpgroup's part into the staging buffer once the part before it (the other
    // warpgroup's) has been read out of it.
    if (m > 0 || wg == 1) mbar_wait(released(wg), (wg == 1 ? m : m - 1) & 1);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      // Column chunk 2j + lane / 16 of the tile's 32.
      stmatrix_x4(staging + staged_chunk(r, 2 * j + lane / 16),
                  pack_bf16(d[8 * j], d[8 * j + 1]), pack_bf16(d[8 * j + 2], d[8 * j + 3]),
                  pack_bf16(d[8 * j + 4], d[8 * j + 5]), pack_bf16(d[8 * j + 6], d[8 * j + 7]));
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncwarp();
    if (lane == 0) mbar_arrive(staged);
  }
#endif
}

// Four slots of 48 KiB (with the staging buffer, 225 of the 227 KiB a block may have).
extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 1)
    gemm_sm90_bf16(const __grid_constant__ CUtensorMap a, const __grid_constant__ CUtensorMap b,
                   const __grid_constant__ CUtensorMap c, int rows, int batches, int k, int n) {
  gemm_body<4>(a, b, c, rows, batches, k, n);
}
