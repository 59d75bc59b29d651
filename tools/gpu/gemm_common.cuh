// What the probes share: a status check that returns from main, random bf16 operands, the mean
// time of back-to-back calls. lt_gemm.cuh adds a cuBLASLt product of the step's kind.
#pragma once
#include <cuda_bf16.h>

#include <cstdio>

#define CHECK(x)                                                          \
  do {                                                                    \
    int status = (int)(x);                                                \
    if (status != 0) {                                                    \
      std::printf("%s failed with %d (line %d)\n", #x, status, __LINE__); \
      return 1;                                                           \
    }                                                                     \
  } while (0)

// Standard-normal-like values times `scale` from a per-element hash (Box-Muller).
__global__ void fill_normal(__nv_bfloat16* p, size_t n, unsigned seed, float scale) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  unsigned h = (unsigned)i * 2654435761u ^ seed;
  h ^= h >> 13;
  h *= 0x5bd1e995u;
  h ^= h >> 15;
  unsigned g = h * 0x27d4eb2du;
  g ^= g >> 15;
  float u1 = ((h & 0xffff) + 1) / 65537.f, u2 = ((g >> 8) & 0xffff) / 65536.f;
  p[i] = __float2bfloat16(sqrtf(-2.f * logf(u1)) * cospif(2.f * u2) * scale);
}

// Mean ms per call of `calls` back-to-back calls of f, timed with events a and b.
template <class F>
float mean_ms(cudaEvent_t a, cudaEvent_t b, F&& f, int calls) {
  cudaEventRecord(a);
  for (int c = 0; c < calls; c++) f();
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  return ms / calls;
}
