// Klein's own Hopper GEMM (gemm_sm90.cuh) against cuBLASLt's heuristic first choice on
// the klein-4B step's shapes, at the card's power cap: each output checked against cuBLASLt's
// (rel-L2 and largest difference), then both timed round-robin as gemm_algos.cu does (300 ms of
// heat, seven rounds of ~40 ms turns, no idle time between). Built by tools/gpu/build.sh; run by
// tools/gpu/device.sh gemm-sm90.
#include <cublasLt.h>
#include <cuda.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <vector>

#include "gemm_sm90.cuh"
#include "lt_gemm.cuh"

namespace probe {

const size_t kWorkspace = 32u << 20;
constexpr int kShared = 4 * (128 * 64 * 2 + 256 * 64 * 2) + 4 * 64 * 64 * 2 + 1024 + 16 * 4 + 24;

// A tensor map over a row-major bf16 matrix (batch, rows, cols) whose rows are `ld` elements
// apart, boxes of 64 columns × box_rows.
CUtensorMap tensor_map(const __nv_bfloat16* p, int rank, int batch, int rows, int cols, int ld,
                       int box_rows) {
  CUtensorMap m;
  const cuuint64_t dims[3] = {(cuuint64_t)cols, (cuuint64_t)rows, (cuuint64_t)batch};
  const cuuint64_t strides[2] = {(cuuint64_t)ld * 2, (cuuint64_t)ld * rows * 2};
  const cuuint32_t box[3] = {64, (cuuint32_t)box_rows, 1}, unit[3] = {1, 1, 1};
  const CUresult r = cuTensorMapEncodeTiled(
      &m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank, (void*)p, dims, strides, box,
      unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) std::printf("cuTensorMapEncodeTiled failed: %d\n", (int)r);
  return m;
}

// Sum of squared differences, sum of squares of b, largest |a − b| (atomics into out[0..2]).
__global__ void diff(const __nv_bfloat16* a, const __nv_bfloat16* b, size_t n, float* out) {
  float sd = 0.f, sb = 0.f, m = 0.f;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const float x = __bfloat162float(a[i]), y = __bfloat162float(b[i]);
    sd += (x - y) * (x - y);
    sb += y * y;
    m = fmaxf(m, fabsf(x - y));
  }
  atomicAdd(out, sd);
  atomicAdd(out + 1, sb);
  atomicMax(reinterpret_cast<int*>(out + 2), __float_as_int(m));
}

struct Shape {
  int tokens, in, out;
  const char* name;
};

int run() {
  const size_t n_w = (size_t)27648 * 12288, n_x = (size_t)4608 * 12288, n_y = (size_t)4608 * 27648;
  __nv_bfloat16 *w, *x, *y, *y_ref;
  float* sums;
  void* ws;
  cublasLtHandle_t lt;
  CHECK(cublasLtCreate(&lt));
  CHECK(cudaMalloc(&ws, kWorkspace));
  CHECK(cudaMalloc(&w, n_w * 2));
  CHECK(cudaMalloc(&x, n_x * 2));
  CHECK(cudaMalloc(&y, n_y * 2));
  CHECK(cudaMalloc(&y_ref, n_y * 2));
  CHECK(cudaMalloc(&sums, 12));
  fill_normal<<<(n_w + 255) / 256, 256>>>(w, n_w, 1, 0.02f);
  fill_normal<<<(n_x + 255) / 256, 256>>>(x, n_x, 2, 1.f);
  CHECK(cudaFuncSetAttribute(gemm_sm90_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kShared));
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaEvent_t ev0, ev1;
  cudaEventCreate(&ev0);
  cudaEventCreate(&ev1);
  CHECK(cudaDeviceSynchronize());

  const Shape shapes[] = {
      {4608, 3072, 27648, "single to_qkv_mlp_proj"},
      {4096, 3072, 18432, "double img ff linear_in"},
      {4096, 3072, 9216, "double img to_qkv"},
      {4608, 12288, 3072, "single to_out"},
      {4096, 9216, 3072, "double img ff linear_out"},
      {1101, 3072, 1000, "partial tiles"},
  };
  for (const Shape& s : shapes) {
    LtGemm g;
    CHECK(lt_plan(lt, kWorkspace, s.tokens, s.in, s.out, &g));
    const auto cublas = [&] { lt_run(lt, g, w, x, y_ref, ws, kWorkspace); };
    const CUtensorMap ma = tensor_map(x, 3, 1, s.tokens, s.in, s.in, 128);
    const CUtensorMap mb = tensor_map(w, 2, 1, s.out, s.in, s.in, 128);
    const CUtensorMap mc = tensor_map(y, 3, 1, s.tokens, s.out, s.out, 64);
    const int tiles = ((s.tokens + 127) / 128) * ((s.out + 255) / 256);
    const auto ours = [&] {
      gemm_sm90_bf16<<<std::min(sms, tiles), 384, kShared>>>(ma, mb, mc, s.tokens, 1, s.in,
                                                             s.out);
    };
    const size_t outputs = (size_t)s.tokens * s.out;
    CHECK(cudaMemset(y, 0xff, outputs * 2));
    cublas();
    ours();
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemset(sums, 0, 12));
    diff<<<1024, 256>>>(y, y_ref, outputs, sums);
    float h[3];
    CHECK(cudaMemcpy(h, sums, 12, cudaMemcpyDeviceToHost));
    const double flop = 2.0 * s.tokens * s.in * (double)s.out;
    std::printf("== %s: %d x %d -> %d, %d tiles\n", s.name, s.tokens, s.in, s.out, tiles);
    std::printf("  ours vs cuBLASLt: rel-L2 %.3g, max |diff| %.3g\n", std::sqrt(h[0] / h[1]),
                h[2]);
    const std::pair<const char*, std::function<void()>> cands[] = {
        {"cuBLASLt first choice", cublas}, {"ours", ours}};
    const int calls = std::max(4, (int)(40e-3 * 700e12 / flop));
    mean_ms(ev0, ev1, cublas, std::max(4, (int)(300e-3 * 700e12 / flop)));
    std::vector<std::vector<float>> ms(2);
    for (int r = 0; r < 7; r++)
      for (int i = 0; i < 2; i++) ms[i].push_back(mean_ms(ev0, ev1, cands[i].second, calls));
    CHECK(cudaGetLastError());
    float first = 0;
    for (int i = 0; i < 2; i++) {
      std::sort(ms[i].begin(), ms[i].end());
      const float med = ms[i][ms[i].size() / 2];
      if (i == 0) first = med;
      std::printf("  %-22s %.4f ms (min %.4f max %.4f), %.0f TFLOP/s, %.3fx the first\n",
                  cands[i].first, med, ms[i].front(), ms[i].back(), flop / (med * 1e-3) / 1e12,
                  med / first);
    }
    lt_destroy(g);
  }
  return 0;
}

}  // namespace probe

int main() { return probe::run(); }
