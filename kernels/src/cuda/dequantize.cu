// ggml block formats dequantized straight to bf16 for a prefill-sized GEMM (the Qwen3 encoder's
// 4-bit linears): one pass that reads the blocks and writes bf16, instead of candle's f32
// dequantization followed by a cast (three passes over four-byte values).
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

// Q4_K super-block (ggml's block_q4_K): 256 weights as 8 sub-blocks of 32 with 6-bit scales
// and mins. Weight = d · scale · q − dmin · min.
struct BlockQ4K {
  __half_raw d;
  __half_raw dmin;
  uint8_t scales[12];
  uint8_t qs[128];
};
static_assert(sizeof(BlockQ4K) == 144, "block_q4_K is 144 bytes");

__device__ __forceinline__ float half_bits(__half_raw h) {
  return __half2float(__half(h));
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

}  // namespace

// blocks: n_blocks Q4_K super-blocks; out: n_blocks · 256 bf16. 32 threads per super-block,
// 8 super-blocks per 256-thread block: thread t of a super-block dequantizes bytes
// 4·(t % 8) .. +4 of 64-weight group t / 8 (low nibbles: weights 64·g + 4·(t % 8) + i, high
// nibbles: 32 further on). Each value is computed as candle's CUDA kernel computes it
// (fma(d · scale, q, −dmin · min) in f32), then rounded once.
extern "C" __global__ void dequantize_q4k_bf16(const BlockQ4K* __restrict__ blocks,
                                               __nv_bfloat16* __restrict__ out,
                                               long long n_blocks) {
  const long long block = blockIdx.x * 8LL + threadIdx.x / 32;
  if (block >= n_blocks) return;
  const int t = threadIdx.x % 32;
  const int group = t / 8;
  const int lane = t % 8;
  const BlockQ4K& b = blocks[block];
  const float d = half_bits(b.d);
  const float dmin = half_bits(b.dmin);
  float sc, m;
  scale_min(2 * group, b.scales, sc, m);
  const float d1 = d * sc, m1 = dmin * m;
  scale_min(2 * group + 1, b.scales, sc, m);
  const float d2 = d * sc, m2 = dmin * m;
  const uint32_t q = *reinterpret_cast<const uint32_t*>(b.qs + 32 * group + 4 * lane);
  __nv_bfloat16* o = out + block * 256 + 64 * group + 4 * lane;
  __align__(8) __nv_bfloat16 lo[4], hi[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t byte = (q >> (8 * i)) & 0xFF;
    lo[i] = __float2bfloat16_rn(__fmaf_rn(d1, (float)(byte & 0xF), -m1));
    hi[i] = __float2bfloat16_rn(__fmaf_rn(d2, (float)(byte >> 4), -m2));
  }
  *reinterpret_cast<uint2*>(o) = *reinterpret_cast<const uint2*>(lo);
  *reinterpret_cast<uint2*>(o + 32) = *reinterpret_cast<const uint2*>(hi);
}
