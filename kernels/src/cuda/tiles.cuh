// 16-bit operand tiles in shared memory for the mma.sync flash-attention kernels: rows of HD
// elements, XOR-swizzled in 16-byte chunks so that ldmatrix reads are free of bank conflicts,
// filled with cp.async.
#pragma once
#include <stdint.h>

#include "cp_async.cuh"

namespace {

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Element offset of (row, col) in a swizzled [rows][HD] tile; col is a multiple of 8 for
// 16-byte accesses.
template <int HD>
__device__ __forceinline__ int swz(int row, int col) {
  constexpr int CHUNKS = HD / 8;
  constexpr int MASK = (CHUNKS < 8 ? CHUNKS : 8) - 1;
  return row * HD + (((col >> 3) ^ (row & MASK)) << 3) + (col & 7);
}

// Rows [row0, row0 + ROWS) of a (len, HD) matrix whose rows are `stride` elements apart into a
// swizzled tile, by a block of THREADS; rows past len are zero.
template <int HD, int ROWS, int THREADS, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int stride, int row0, int len) {
  static_assert(sizeof(T) == 2, "16-bit elements");
  constexpr int CHUNKS = HD / 8;
  for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS) {
    const int r = i / CHUNKS;
    const int c = (i % CHUNKS) * 8;
    const bool valid = row0 + r < len;
    cp_async16(tile + swz<HD>(r, c), src + (size_t)(valid ? row0 + r : 0) * stride + c, valid);
  }
}

}  // namespace
