// The arithmetic of FLUX.2's per-head QK RMSNorm + interleaved RoPE on eight consecutive
// columns of a head (pairs 4l..4l+3 of a 16-byte chunk l), shared by the norm kernel
// (elementwise.cu) and Hopper's attention, which applies it to Q in shared memory, so that both
// give the same bits; and the 16-byte bf16 unpacking both read their chunks with.
#pragma once

#include <cuda_bf16.h>

namespace {

// Eight bf16 values held in 16 bytes, as floats.
__device__ __forceinline__ void unpack8(const uint4& u, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// y = RoPE(round(round(v · rstd) · w)) for the chunk's four pairs: the normalised value rounded
// to bf16, times the weight rounded again (transformers' RMSNorm), then rotated in f32 (FLUX.2
// applies RoPE in f32) with the pairs' cos / sin; y is rounded to bf16 by the caller's store.
__device__ __forceinline__ void norm_rope8(const float (&v)[8], float rstd, const float (&w)[8],
                                           const float4& c, const float4& s, float (&y)[8]) {
  const float cs[4] = {c.x, c.y, c.z, c.w}, sn[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const float y0 = __bfloat162float(__float2bfloat16_rn(
        __bfloat162float(__float2bfloat16_rn(v[2 * p] * rstd)) * w[2 * p]));
    const float y1 = __bfloat162float(__float2bfloat16_rn(
        __bfloat162float(__float2bfloat16_rn(v[2 * p + 1] * rstd)) * w[2 * p + 1]));
    y[2 * p] = y0 * cs[p] - y1 * sn[p];
    y[2 * p + 1] = y1 * cs[p] + y0 * sn[p];
  }
}

// The chunk's sum of squares over the head: its own eight, then across the 16 lanes of its
// half-warp that hold the head's other chunks (every lane of the warp calls it).
__device__ __forceinline__ float head_rstd(const float (&v)[8], float eps) {
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) sq += v[i] * v[i];
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffff, sq, o);
  return rsqrtf(sq / 128 + eps);
}

}  // namespace
