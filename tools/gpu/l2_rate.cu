// How fast the SMs read data that sits in L2: every block reads an L2-resident buffer (8, 16 and
// 32 MiB) over and over in 16-byte loads that skip L1 (ld.global.cg), for ~1 s per size after
// ~1 s of heat, and reports bytes per second. The klein-4B single block's attention streams
// each head's K and V to every one of its 36 query tiles: 2.04 GB per call from L2, 4.7 TB/s at
// 0.436 ms (docs/performance.md, twenty-second session). Built by tools/gpu/build.sh; run by
// tools/gpu/device.sh l2-rate.
#include <cuda_runtime.h>

#include <cstdio>

#include "gemm_common.cuh"

// Each thread sums its 16-byte vectors of `n` over `passes` passes; one word out per thread
// keeps the loads alive.
__global__ void read_l2(const uint4* __restrict__ buf, size_t n, int passes, unsigned* out) {
  unsigned acc = 0;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (int p = 0; p < passes; ++p) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += stride) {
      const uint4 v = __ldcg(buf + i);
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int blocks = sms * 4, threads = 512;
  const size_t max_bytes = 32u << 20;
  uint4* buf;
  unsigned* out;
  CHECK(cudaMalloc(&buf, max_bytes));
  CHECK(cudaMalloc(&out, (size_t)blocks * threads * 4));
  CHECK(cudaMemset(buf, 1, max_bytes));
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (size_t mib : {8, 16, 32}) {
    const size_t bytes = mib << 20, n = bytes / 16;
    const int passes = 64;
    const auto launch = [&] { read_l2<<<blocks, threads>>>(buf, n, passes, out); };
    const float once = mean_ms(a, b, launch, 2);
    const int calls = (int)(1000.f / once) + 1;
    mean_ms(a, b, launch, calls);
    const float ms = mean_ms(a, b, launch, calls);
    CHECK(cudaGetLastError());
    std::printf("L2-resident %zu MiB, %d blocks x %d threads: %.2f TB/s (%.3f ms a call)\n", mib,
                blocks, threads, (double)bytes * passes / (ms * 1e-3) / 1e12, ms);
  }
  return 0;
}
