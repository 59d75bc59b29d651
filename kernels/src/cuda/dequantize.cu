// ggml block formats dequantized straight to bf16 for a prefill-sized GEMM (the Qwen3 encoder's
// 4-bit linears and the transformer's quantized projections, klein_kernels::Linear): one pass
// that reads the blocks and writes bf16, instead of candle's f32 dequantization followed by a
// cast (three passes over four-byte values).
//
// Every kernel gives exactly, bit for bit, candle's CUDA f32 dequantization (candle-kernels'
// quantized.cu, dequantize_block_*) rounded once to bf16. Each weight is computed with the
// float operations that kernel compiles to (nvcc contracts its `a * b + c` to one fma), written
// out as intrinsics that --use_fast_math cannot contract or reorder. The products of an f16
// scale and small integer quants are exact in f32, so every weight is its exact value rounded
// once whichever way it is computed, except for the sign of a zero: Q4_0's fma(d, 8, −8·d) is
// +0, Q5_0's (16 − 16)·d has d's sign; following candle operation for operation keeps those.
// The flush-to-zero that --use_fast_math adds changes nothing (no value here is an f32
// subnormal: scales are f16, quants small integers), and f16 scales convert to f32 exactly.
//
// Launch: 256-thread blocks (kLaunchThreads), each ggml block handled by a fixed number of
// threads (each kernel's mapping is at its code), kLaunchThreads / that many ggml blocks per
// launch block, the last launch block's threads past the last ggml block idle; every thread
// reads a few bytes of quants and writes its weights in groups of four with 8-byte stores.
//
// The float8 (e4m3) weights of BFL's fp8 checkpoints with their per-tensor scale
// (scale_fp8_e4m3_*, klein_kernels::scale_fp8): each weight to f32 (exact), one multiply by the
// scale, rounded once to the output type, as the host computes it. With --use_fast_math's
// flush-to-zero a product below f32's smallest normal (1.2e-38) would become 0 where the host
// keeps a subnormal; an e4m3 weight is at least 2^-9, so only a scale below ~6e-36 gets there.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "ggml_blocks.cuh"

namespace {

constexpr int kLaunchThreads = 256;


// Four bytes at a 4-byte-aligned address, byte 0 lowest.
__device__ __forceinline__ uint32_t load4(const uint8_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Four bytes at a 2-byte-aligned address (inside blocks whose size is not a multiple of 4),
// byte 0 lowest.
__device__ __forceinline__ uint32_t load4_unaligned(const uint8_t* p) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  return h[0] | (uint32_t(h[1]) << 16);
}

// Byte i of v.
__device__ __forceinline__ uint32_t byte_of(uint32_t v, int i) { return (v >> (8 * i)) & 0xFF; }

// a and b rounded to bf16 (to nearest even, as candle's cast), a in the low half.
__device__ __forceinline__ uint32_t pack(float a, float b) {
  const __nv_bfloat162 r = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&r);
}

// v rounded to bf16, written with one 8-byte store (o is 8-byte aligned; one 64-bit value, as
// the compiler may split a uint2's store in two).
__device__ __forceinline__ void store4(__nv_bfloat16* o, const float (&v)[4]) {
  *reinterpret_cast<uint64_t*>(o) = pack(v[0], v[1]) | (uint64_t)pack(v[2], v[3]) << 32;
}

// The ggml block of this thread (kThreads threads per ggml block) and the thread's index t in
// it; false past the last block.
template <int kThreads>
__device__ __forceinline__ bool locate(long long n_blocks, long long& block, int& t) {
  static_assert(kLaunchThreads % kThreads == 0, "whole ggml blocks per launch block");
  block = blockIdx.x * (long long)(kLaunchThreads / kThreads) + threadIdx.x / kThreads;
  t = threadIdx.x % kThreads;
  return block < n_blocks;
}

// The 32-weight formats' fifth bits (bit j for weight j), none for the 4-bit ones.
__device__ __forceinline__ uint32_t high_bits(const BlockQ4_0&) { return 0; }
__device__ __forceinline__ uint32_t high_bits(const BlockQ4_1&) { return 0; }
__device__ __forceinline__ uint32_t high_bits(const BlockQ5_0& b) {
  return load4_unaligned(b.qh);
}
__device__ __forceinline__ uint32_t high_bits(const BlockQ5_1& b) {
  return load4_unaligned(b.qh);
}

// A 32-weight block's weight of quant q, each as candle's kernel compiles it.
// Q4_0: fma(d, q, −8·d), candle's `d * q + dm` with dm = −8·d.
struct WeightQ4_0 {
  float d;
  __device__ __forceinline__ float operator()(uint32_t q) const {
    return __fmaf_rn(d, (float)q, __fmul_rn(-8.0f, d));
  }
};
// Q5_0: (q − 16) · d, not an fma: where q = 16 the product's zero has d's sign, an fma's is +0.
struct WeightQ5_0 {
  float d;
  __device__ __forceinline__ float operator()(uint32_t q) const {
    return __fmul_rn(__fsub_rn((float)q, 16.0f), d);
  }
};
// Q4_1, Q5_1: fma(d, q, m), candle's `q * d + m`.
struct WeightWithMin {
  float d, m;
  __device__ __forceinline__ float operator()(uint32_t q) const {
    return __fmaf_rn(d, (float)q, m);
  }
};
__device__ __forceinline__ WeightQ4_0 weight(const BlockQ4_0& b) { return {half_bits(b.d)}; }
__device__ __forceinline__ WeightQ5_0 weight(const BlockQ5_0& b) { return {half_bits(b.d)}; }
__device__ __forceinline__ WeightWithMin weight(const BlockQ4_1& b) {
  return {half_bits(b.d), half_bits(b.m)};
}
__device__ __forceinline__ WeightWithMin weight(const BlockQ5_1& b) {
  return {half_bits(b.d), half_bits(b.m)};
}

// Q4_0, Q4_1, Q5_0, Q5_1: 4 threads per block, 64 blocks per launch block. Thread t
// dequantizes bytes 4t .. 4t + 3 of qs: low nibbles (and fifth bits 4t + i) are weights
// 4t + i, high nibbles (fifth bits 16 + 4t + i) weights 16 + 4t + i.
template <typename Block>
__device__ __forceinline__ void dequantize_32(const Block* __restrict__ blocks,
                                              __nv_bfloat16* __restrict__ out,
                                              long long n_blocks) {
  long long block;
  int t;
  if (!locate<4>(n_blocks, block, t)) return;
  const Block& b = blocks[block];
  const auto w = weight(b);
  const uint32_t q = load4_unaligned(b.qs + 4 * t);
  const uint32_t qh = high_bits(b);
  float lo[4], hi[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int j = 4 * t + i;
    const uint32_t byte = byte_of(q, i);
    lo[i] = w((byte & 0xF) | (((qh >> j) & 1) << 4));
    hi[i] = w((byte >> 4) | (((qh >> (j + 16)) & 1) << 4));
  }
  __nv_bfloat16* o = out + block * 32 + 4 * t;
  store4(o, lo);
  store4(o + 16, hi);
}

// Scale and min of sub-block j (ggml's get_scale_min_k4).
__device__ __forceinline__ void scale_min(int j, const uint8_t* q, float& sc, float& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// The K formats' fifth bits: bytes 4·lane .. + 3 of qh, none for Q4_K.
__device__ __forceinline__ uint32_t high_bits(const BlockQ4K&, int) { return 0; }
__device__ __forceinline__ uint32_t high_bits(const BlockQ5K& b, int lane) {
  return load4(b.qh + 4 * lane);
}

// Q4_K, Q5_K: 32 threads per super-block, 8 super-blocks per launch block. Thread t of a
// super-block dequantizes bytes 4·(t % 8) .. + 3 of 64-weight group g = t / 8 (low nibbles and
// fifth bits 2g: weights 64g + 4·(t % 8) + i; high nibbles and fifth bits 2g + 1: 32 further
// on). Each value is fma(d · scale, q, −dmin · min), as candle's `d1 * q - m1` compiles.
template <typename Block>
__device__ __forceinline__ void dequantize_k(const Block* __restrict__ blocks,
                                             __nv_bfloat16* __restrict__ out,
                                             long long n_blocks) {
  long long block;
  int t;
  if (!locate<32>(n_blocks, block, t)) return;
  const int group = t / 8;
  const int lane = t % 8;
  const Block& b = blocks[block];
  const float d = half_bits(b.d);
  const float dmin = half_bits(b.dmin);
  float sc, m;
  scale_min(2 * group, b.scales, sc, m);
  const float d1 = __fmul_rn(d, sc), m1 = __fmul_rn(dmin, m);
  scale_min(2 * group + 1, b.scales, sc, m);
  const float d2 = __fmul_rn(d, sc), m2 = __fmul_rn(dmin, m);
  const uint32_t q = load4(b.qs + 32 * group + 4 * lane);
  const uint32_t qh = high_bits(b, lane);
  float lo[4], hi[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t byte = byte_of(q, i), high = byte_of(qh, i);
    const uint32_t q_lo = (byte & 0xF) | (((high >> (2 * group)) & 1) << 4);
    const uint32_t q_hi = (byte >> 4) | (((high >> (2 * group + 1)) & 1) << 4);
    lo[i] = __fmaf_rn(d1, (float)q_lo, -m1);
    hi[i] = __fmaf_rn(d2, (float)q_hi, -m2);
  }
  __nv_bfloat16* o = out + block * 256 + 64 * group + 4 * lane;
  store4(o, lo);
  store4(o + 32, hi);
}

}  // namespace

// Each kernel: blocks, n_blocks ggml blocks of its format; out, their weights in bf16.

extern "C" __global__ void dequantize_q4_0_bf16(const BlockQ4_0* __restrict__ blocks,
                                                __nv_bfloat16* __restrict__ out,
                                                long long n_blocks) {
  dequantize_32(blocks, out, n_blocks);
}

extern "C" __global__ void dequantize_q4_1_bf16(const BlockQ4_1* __restrict__ blocks,
                                                __nv_bfloat16* __restrict__ out,
                                                long long n_blocks) {
  dequantize_32(blocks, out, n_blocks);
}

extern "C" __global__ void dequantize_q5_0_bf16(const BlockQ5_0* __restrict__ blocks,
                                                __nv_bfloat16* __restrict__ out,
                                                long long n_blocks) {
  dequantize_32(blocks, out, n_blocks);
}

extern "C" __global__ void dequantize_q5_1_bf16(const BlockQ5_1* __restrict__ blocks,
                                                __nv_bfloat16* __restrict__ out,
                                                long long n_blocks) {
  dequantize_32(blocks, out, n_blocks);
}

// Q8_0: 8 threads per block, 32 blocks per launch block; thread t dequantizes bytes
// 4t .. 4t + 3 of qs, weights 4t .. 4t + 3 (d · q, one product as in candle).
extern "C" __global__ void dequantize_q8_0_bf16(const BlockQ8_0* __restrict__ blocks,
                                                __nv_bfloat16* __restrict__ out,
                                                long long n_blocks) {
  long long block;
  int t;
  if (!locate<8>(n_blocks, block, t)) return;
  const BlockQ8_0& b = blocks[block];
  const float d = half_bits(b.d);
  const uint32_t q = load4_unaligned(reinterpret_cast<const uint8_t*>(b.qs) + 4 * t);
  float v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = __fmul_rn(d, (float)(int8_t)byte_of(q, i));
  store4(out + block * 32 + 4 * t, v);
}

extern "C" __global__ void dequantize_q4k_bf16(const BlockQ4K* __restrict__ blocks,
                                               __nv_bfloat16* __restrict__ out,
                                               long long n_blocks) {
  dequantize_k(blocks, out, n_blocks);
}

extern "C" __global__ void dequantize_q5k_bf16(const BlockQ5K* __restrict__ blocks,
                                               __nv_bfloat16* __restrict__ out,
                                               long long n_blocks) {
  dequantize_k(blocks, out, n_blocks);
}

// Q6_K: 16 threads per super-block, 16 super-blocks per launch block. Thread t of a super-block
// dequantizes l = 4·(t % 8) .. + 3 of half h = t / 8: bytes ql[64h + l ..], ql[64h + 32 + l ..]
// and qh[32h + l ..] give weights 128h + 32k + l .. + 3 for k in 0..4, each four in sub-block
// 8h + 2k + l / 16. Each value is (d · scale) · (q − 32), two products as in candle.
extern "C" __global__ void dequantize_q6k_bf16(const BlockQ6K* __restrict__ blocks,
                                               __nv_bfloat16* __restrict__ out,
                                               long long n_blocks) {
  long long block;
  int t;
  if (!locate<16>(n_blocks, block, t)) return;
  const int h = t / 8;
  const int l = 4 * (t % 8);
  const BlockQ6K& b = blocks[block];
  const float d = half_bits(b.d);
  const uint32_t ql[2] = {load4_unaligned(b.ql + 64 * h + l),
                          load4_unaligned(b.ql + 64 * h + 32 + l)};
  const uint32_t qh = load4_unaligned(b.qh + 32 * h + l);
  const int8_t* sc = b.scales + 8 * h + l / 16;
  __nv_bfloat16* o = out + block * 256 + 128 * h + l;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    // Weights 32k further on: the low nibbles of ql[0], ql[1], then their high nibbles; top
    // bits 2k, 2k + 1 of qh.
    const float ds = __fmul_rn(d, (float)sc[2 * k]);
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t low = (byte_of(ql[k % 2], i) >> (4 * (k / 2))) & 0xF;
      const uint32_t top = (byte_of(qh, i) >> (2 * k)) & 3;
      v[i] = __fmul_rn(ds, (float)((int)(low | (top << 4)) - 32));
    }
    store4(o + 32 * k, v);
  }
}

// w: n float8 e4m3 weights; out: n weights times scale. Grid-stride, one weight a thread.
template <typename T>
__device__ __forceinline__ void scale_fp8(const __nv_fp8_e4m3* __restrict__ w, float scale,
                                          T* __restrict__ out, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    out[i] = static_cast<T>(__fmul_rn(static_cast<float>(w[i]), scale));
  }
}

extern "C" __global__ void scale_fp8_e4m3_f32(const __nv_fp8_e4m3* __restrict__ w, float scale,
                                              float* __restrict__ out, long long n) {
  scale_fp8(w, scale, out, n);
}

extern "C" __global__ void scale_fp8_e4m3_bf16(const __nv_fp8_e4m3* __restrict__ w, float scale,
                                               __nv_bfloat16* __restrict__ out, long long n) {
  scale_fp8(w, scale, out, n);
}

extern "C" __global__ void scale_fp8_e4m3_f16(const __nv_fp8_e4m3* __restrict__ w, float scale,
                                              __half* __restrict__ out, long long n) {
  scale_fp8(w, scale, out, n);
}
