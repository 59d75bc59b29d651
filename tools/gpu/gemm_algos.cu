// Which cuBLASLt algorithm runs the klein-4B step's GEMMs fastest once the card sits at its power
// cap. For each of the step's shapes, up to 24 algorithms from cuBLASLt's heuristic (bf16, f32
// accumulation) are timed round-robin: each takes ~40 ms of back-to-back calls in turn, with no
// idle time between, so every algorithm is measured in the same sustained, power-capped state
// (short bursts over-promise: docs/performance.md, eleventh session). Prints, per shape and
// algorithm, the median ms over the rounds, its TFLOP/s, its ratio to the heuristic's first
// choice, and its output's largest difference from the first choice's. Built by
// tools/gpu/build.sh; run by tools/gpu/device.sh gemm-algos.
#include <cublasLt.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "gemm_common.cuh"

// The largest |a − b| over n values, into *out (one float, zeroed by the caller).
__global__ void max_diff(const __nv_bfloat16* a, const __nv_bfloat16* b, size_t n, float* out) {
  float m = 0.f;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    m = fmaxf(m, fabsf(__bfloat162float(a[i]) - __bfloat162float(b[i])));
  atomicMax(reinterpret_cast<int*>(out), __float_as_int(m));
}

struct Shape {
  int tokens, in, out, per_step;
  const char* name;
};

struct Problem {
  cublasLtMatmulDesc_t op;
  cublasLtMatrixLayout_t a, b, d;
};

// y (tokens × out) = x (tokens × in) · Wᵀ, row-major: column-major D (out × tokens) = Wᵀ · x.
int describe(const Shape& s, Problem* p) {
  CHECK(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t t = CUBLAS_OP_T;
  CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t));
  CHECK(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, s.in, s.out, s.in));
  CHECK(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, s.in, s.tokens, s.in));
  CHECK(cublasLtMatrixLayoutCreate(&p->d, CUDA_R_16BF, s.out, s.tokens, s.out));
  return 0;
}

int main() {
  const size_t workspace = 32u << 20;
  const size_t n_w = (size_t)27648 * 3072, n_x = (size_t)4608 * 12288, n_y = (size_t)4608 * 27648;
  cublasLtHandle_t lt;
  CHECK(cublasLtCreate(&lt));
  void* ws;
  __nv_bfloat16 *w, *x, *y, *y0;
  float* diff;
  CHECK(cudaMalloc(&ws, workspace));
  CHECK(cudaMalloc(&w, n_w * 2));
  CHECK(cudaMalloc(&x, n_x * 2));
  CHECK(cudaMalloc(&y, n_y * 2));
  CHECK(cudaMalloc(&y0, n_y * 2));
  CHECK(cudaMalloc(&diff, 4));
  fill_normal<<<(n_w + 255) / 256, 256>>>(w, n_w, 1, 0.02f);
  fill_normal<<<(n_x + 255) / 256, 256>>>(x, n_x, 2, 1.f);
  CHECK(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  const float one = 1.f, zero = 0.f;

  const Shape shapes[] = {
      {4608, 3072, 27648, 20, "single to_qkv_mlp_proj"},
      {4608, 12288, 3072, 20, "single to_out"},
      {4096, 3072, 18432, 5, "double img ff linear_in"},
      {4096, 9216, 3072, 5, "double img ff linear_out"},
      {4096, 3072, 9216, 5, "double img to_qkv"},
      {4096, 3072, 3072, 5, "double img to_out"},
      {512, 3072, 18432, 5, "double txt ff linear_in"},
      {512, 3072, 9216, 5, "double txt add_qkv_proj"},
  };
  const int max_algos = 24, rounds = 7;
  for (const Shape& s : shapes) {
    Problem p;
    CHECK(describe(s, &p));
    cublasLtMatmulPreference_t pref;
    CHECK(cublasLtMatmulPreferenceCreate(&pref));
    CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                               &workspace, sizeof workspace));
    cublasLtMatmulHeuristicResult_t found[max_algos];
    int n = 0;
    CHECK(cublasLtMatmulAlgoGetHeuristic(lt, p.op, p.a, p.b, p.d, p.d, pref, max_algos, found,
                                         &n));
    const double flop = 2.0 * s.tokens * s.in * (double)s.out;
    const size_t outputs = (size_t)s.tokens * s.out;
    std::printf("== %s: %d x %d -> %d (%d a step), %d algorithms\n", s.name, s.tokens, s.in, s.out,
                s.per_step, n);
    // Calls per turn: ~40 ms at 700 TFLOP/s.
    const int calls = std::max(4, (int)(40e-3 * 700e12 / flop));
    auto run = [&](int i, __nv_bfloat16* dst) {
      return cublasLtMatmul(lt, p.op, &one, w, p.a, x, p.b, &zero, dst, p.d, dst, p.d,
                            &found[i].algo, ws, workspace, 0);
    };
    std::vector<bool> ok(n);
    std::vector<float> max_abs(n, 0.f);
    CHECK(run(0, y0));
    for (int i = 0; i < n; i++) {
      ok[i] = run(i, y) == CUBLAS_STATUS_SUCCESS;
      if (!ok[i]) continue;
      CHECK(cudaMemset(diff, 0, 4));
      max_diff<<<1024, 256>>>(y, y0, outputs, diff);
      CHECK(cudaMemcpy(&max_abs[i], diff, 4, cudaMemcpyDeviceToHost));
    }
    std::vector<std::vector<float>> ms(n);
    for (int r = 0; r < rounds; r++) {
      for (int i = 0; i < n; i++) {
        if (!ok[i]) continue;
        cudaEventRecord(start);
        for (int c = 0; c < calls; c++) run(i, y);
        cudaEventRecord(stop);
        cudaEventSynchronize(stop);
        float t = 0;
        cudaEventElapsedTime(&t, start, stop);
        ms[i].push_back(t / calls);
      }
    }
    float first = 0;
    for (int i = 0; i < n; i++) {
      if (!ok[i]) {
        std::printf("  algo %2d: does not run\n", i);
        continue;
      }
      std::sort(ms[i].begin(), ms[i].end());
      const float med = ms[i][ms[i].size() / 2];
      if (i == 0) first = med;
      int id = 0, tile = 0, stages = 0, split = 0, cluster = 0;
      size_t got;
      cublasLtMatmulAlgoConfigGetAttribute(&found[i].algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof id,
                                           &got);
      cublasLtMatmulAlgoConfigGetAttribute(&found[i].algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile,
                                           sizeof tile, &got);
      cublasLtMatmulAlgoConfigGetAttribute(&found[i].algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages,
                                           sizeof stages, &got);
      cublasLtMatmulAlgoConfigGetAttribute(&found[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split,
                                           sizeof split, &got);
      cublasLtMatmulAlgoConfigGetAttribute(&found[i].algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID,
                                           &cluster, sizeof cluster, &got);
      std::printf(
          "  algo %2d: %.4f ms (min %.4f max %.4f), %.0f TFLOP/s, %.3fx first, max |diff| %.3g "
          "[id %d tile %d stages %d split %d cluster %d, workspace %zu]\n",
          i, med, ms[i].front(), ms[i].back(), flop / (med * 1e-3) / 1e12, med / first,
          max_abs[i], id, tile, stages, split, cluster, found[i].workspaceSize);
    }
    cublasLtMatmulPreferenceDestroy(pref);
  }
  return 0;
}
