// The bf16 matmul rate a card sustains, against the rate of a short burst: cuBLASLt (its
// heuristic's first algorithm, f32 accumulation) on the klein-4B step's GEMM shapes right after
// the card idled, then a 8192³ GEMM run back to back for about three seconds, reported per
// window. tools/gpu/device.sh gemm-power samples the SM clock, power and throttle reasons next
// to it. Built by tools/gpu/build.sh (nvcc, linked against the CUDA 13 cuBLASLt).
#include <cstdio>

#include "lt_gemm.cuh"

// Milliseconds per call over `calls` back-to-back calls.
float time_calls(cublasLtHandle_t lt, const LtGemm& g, const void* w, const void* x, void* y,
                 void* ws, size_t workspace, int calls) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  const float ms = mean_ms(start, stop, [&] { lt_run(lt, g, w, x, y, ws, workspace); }, calls);
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
    LtGemm g;
    CHECK(lt_plan(lt, workspace, s[0], s[1], s[2], &g));
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
  LtGemm g;
  CHECK(lt_plan(lt, workspace, 8192, 8192, 8192, &g));
  for (int window = 0; window < 12; window++) {
    float ms = time_calls(lt, g, w, x, y, ws, workspace, 160);
    std::printf("sustained 8192^3, window %d: %.3f ms, %.0f TFLOP/s\n", window, ms,
                2.0 * 8192.0 * 8192.0 * 8192.0 / (ms * 1e-3) / 1e12);
  }
  return 0;
}
