// How many thread-block clusters a persistent kernel can keep resident at once
// (cudaOccupancyMaxActiveClusters) for blocks shaped like Hopper's attention (384 threads, the
// 144- and 128-key variants' shared memory) and the GEMM probe's (384 threads, 227 KiB), in
// clusters of 1, 2 and 4: a persistent grid in clusters must not be larger than that times the
// cluster size. Built by tools/gpu/build.sh; run by tools/gpu/device.sh clusters.
#include <cuda_runtime.h>

#include <cstdio>

#include "gemm_common.cuh"

__global__ void one_block_per_sm() {}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CHECK(cudaFuncSetAttribute(one_block_per_sm, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             227 * 1024));
  CHECK(cudaFuncSetAttribute(one_block_per_sm, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  std::printf("%d SMs\n", sms);
  const struct {
    const char* what;
    int shared;
  } shapes[] = {{"attention, 144-key tiles", 181328},
                {"attention, 128-key tiles", 230512},
                {"GEMM probe", 227 * 1024}};
  for (const auto& s : shapes) {
    for (int size : {1, 2, 4}) {
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(sms / size * size);
      cfg.blockDim = dim3(384);
      cfg.dynamicSmemBytes = s.shared;
      cudaLaunchAttribute attr;
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = size;
      attr.val.clusterDim.y = 1;
      attr.val.clusterDim.z = 1;
      cfg.attrs = &attr;
      cfg.numAttrs = 1;
      int clusters = 0;
      CHECK(cudaOccupancyMaxActiveClusters(&clusters, one_block_per_sm, &cfg));
      std::printf("%s (%d bytes of shared memory), clusters of %d: %d resident (%d blocks)\n",
                  s.what, s.shared, size, clusters, clusters * size);
    }
  }
  return 0;
}
