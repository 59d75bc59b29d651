// The bf16 matmul rate a card sustains, against the rate of a short burst: cuBLASLt (its
// heuristic's first algorithm, f32 accumulation) on the klein-4B step's GEMM shapes right after
// the card idled, then a 8192³ GEMM run back to back for about three seconds, reported per
// window. tools/gpu/device.sh gemm-power samples the SM clock, power and throttle reasons next
// to it. Built by tools/gpu/build.sh (nvcc, linked against the CUDA 13 cuBLASLt).
#include <cublasLt.h>
#include <cuda_bf16.h>

#include <cstdio>

#include "gemm_common.cuh"

struct Gemm {
  cublasLtMatmulDesc_t op;
  cublasLtMatrixLayout_t a, b, d;
  cublasLtMatmulAlgo_t algo;
};

// y (tokens × out) = x (tokens × in) · Wᵀ, row-major: column-major D (out × tokens) = Wᵀ · x.
int plan(cublasLtHandle_t lt, size_t workspace, int tokens, int in, int out, Gemm* g) {
  CHECK(cublasLtMatmulDescCreate(&g->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t t = CUBLAS_OP_T;
  CHECK(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t));
  CHECK(cublasLtMatrixLayoutCreate(&g->a, CUDA_R_16BF, in, out, in));
  CHECK(cublasLtMatrixLayoutCreate(&g->b, CUDA_R_16BF, in, tokens, in));
  CHECK(cublasLtMatrixLayoutCreate(&g->d, CUDA_R_16BF, out, tokens, out));
  cublasLtMatmulPreference_t pref;
  CHECK(cublasLtMatmulPreferenceCreate(&pref));
  CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &workspace, sizeof workspace));
  cublasLtMatmulHeuristicResult_t h;
  int found = 0;
  CHECK(cublasLtMatmulAlgoGetHeuristic(lt, g->op, g->a, g->b, g->d, g->d, pref, 1, &h, &found));
  if (found == 0) return 1;
  g->algo = h.algo;
  return cublasLtMatmulPreferenceDestroy(pref);
}

// Milliseconds per call over `calls` back-to-back calls.
float time_calls(cublasLtHandle_t lt, const Gemm& g, const void* w, const void* x, void* y,
                 void* ws, size_t workspace, int calls) {
  const float one = 1.f, zero = 0.f;
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  const float ms = mean_ms(
      start, stop,
      [&] {
        cublasLtMatmul(lt, g.op, &one, w, g.a, x, g.b, &zero, y, g.d, y, g.d, &g.algo, ws,
                       workspace, 0);
      },
      calls);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms;
}

int main() {
  const size_t workspace = 32u << 20, big = (size_t)8192 * 8192;
  auto at_least_big = [&](size_t n) { return n > big ? n : big; };
  const size_t n_w = at_least_big((size_t)27648 * 3072), n_x = at_least_big((size_t)4608 * 12288),
               n_y = at_least_big((size_t)4608 * 27648);
  cublasLtHandle_t lt;
  CHECK(cublasLtCreate(&lt));
  void* ws;
  __nv_bfloat16 *w, *x, *y;
  CHECK(cudaMalloc(&ws, workspace));
  CHECK(cudaMalloc(&w, n_w * 2));
  CHECK(cudaMalloc(&x, n_x * 2));
  CHECK(cudaMalloc(&y, n_y * 2));
  fill_normal<<<(n_w + 255) / 256, 256>>>(w, n_w, 1, 0.02f);
  fill_normal<<<(n_x + 255) / 256, 256>>>(x, n_x, 2, 1.f);
  CHECK(cudaDeviceSynchronize());

  // The step's shapes (tokens, in, out), each a short burst: 3 warm-up calls, best of 3 × 20.
  const int shapes[][3] = {{4608, 3072, 27648}, {4608, 12288, 3072}, {4096, 3072, 9216},
                           {4096, 3072, 3072},  {4096, 3072, 18432}, {4096, 9216, 3072},
                           {512, 3072, 9216},   {512, 9216, 3072}};
  for (const auto& s : shapes) {
    Gemm g;
    CHECK(plan(lt, workspace, s[0], s[1], s[2], &g));
    time_calls(lt, g, w, x, y, ws, workspace, 3);
    float best = 1e9f;
    for (int r = 0; r < 3; r++) {
      float ms = time_calls(lt, g, w, x, y, ws, workspace, 20);
      best = ms < best ? ms : best;
    }
    std::printf("burst %d x %d -> %d: %.3f ms, %.0f TFLOP/s\n", s[0], s[1], s[2], best,
                2.0 * s[0] * s[1] * (double)s[2] / (best * 1e-3) / 1e12);
  }

  // 8192³ back to back: 12 windows of 160 calls (~0.25 s each on an H100).
  Gemm g;
  CHECK(plan(lt, workspace, 8192, 8192, 8192, &g));
  for (int window = 0; window < 12; window++) {
    float ms = time_calls(lt, g, w, x, y, ws, workspace, 160);
    std::printf("sustained 8192^3, window %d: %.3f ms, %.0f TFLOP/s\n", window, ms,
                2.0 * 8192.0 * 8192.0 * 8192.0 / (ms * 1e-3) / 1e12);
  }
  return 0;
}
