// Which cuBLASLt algorithm runs the klein-4B step's GEMMs fastest once the card sits at its power
// cap (bf16, f32 accumulation). Two modes:
//   gemm-algos          the heuristic's candidates (up to 24) for each of the step's shapes;
//   gemm-algos search   every configuration cuBLASLt accepts for the large shapes (each algorithm
//                       id × tile × stages × cluster shape × CTA swizzle × custom option, no
//                       split-K), screened in short turns at the power cap; the fastest 12 and
//                       the heuristic's first three go on to the round-robin below.
// The round-robin gives each candidate ~40 ms of back-to-back calls in turn, with no idle time
// between, so every candidate is measured in the same sustained, power-capped state (short
// bursts over-promise: docs/performance.md, eleventh session). Prints, per shape and candidate,
// the median ms over the rounds, its TFLOP/s, its ratio to the heuristic's first choice, and its
// output's largest difference from the first choice's. Built by tools/gpu/build.sh; run by
// tools/gpu/device.sh gemm-algos / gemm-search.
#include <cublasLt.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "lt_gemm.cuh"

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

// A shape's operation and layouts (lt_describe; the algorithm is each candidate's).
using Problem = LtGemm;

const size_t kWorkspace = 32u << 20;

struct Bench {
  cublasLtHandle_t lt;
  void* ws;
  __nv_bfloat16 *w, *x, *y, *y0;
  float* diff;
  cudaEvent_t start, stop;
};

cublasStatus_t run(Bench& b, const Problem& p, const cublasLtMatmulAlgo_t& algo,
                   __nv_bfloat16* dst) {
  return lt_run_with(b.lt, p, algo, b.w, b.x, dst, b.ws, kWorkspace);
}

// Mean ms of `calls` back-to-back calls.
float turn(Bench& b, const Problem& p, const cublasLtMatmulAlgo_t& algo, int calls) {
  return mean_ms(b.start, b.stop, [&] { run(b, p, algo, b.y); }, calls);
}

template <typename T>
T config(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  T v{};
  size_t got;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, sizeof v, &got);
  return v;
}

void describe_algo(const cublasLtMatmulAlgo_t& a, char* out, size_t n) {
  std::snprintf(out, n, "id %d tile %u stages %u split %u swizzle %u custom %u cluster %u",
                config<int>(a, CUBLASLT_ALGO_CONFIG_ID),
                config<uint32_t>(a, CUBLASLT_ALGO_CONFIG_TILE_ID),
                config<uint32_t>(a, CUBLASLT_ALGO_CONFIG_STAGES_ID),
                config<uint32_t>(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                config<uint32_t>(a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
                config<uint32_t>(a, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
                (unsigned)config<uint16_t>(a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID));
}

// A capability that is a list of ids (tiles, stages); {0} when the algorithm reports none.
std::vector<uint32_t> cap_ids(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoCapAttributes_t c) {
  size_t bytes = 0;
  if (cublasLtMatmulAlgoCapGetAttribute(&algo, c, nullptr, 0, &bytes) != 0 || bytes == 0)
    return {0};
  std::vector<uint32_t> ids(bytes / sizeof(uint32_t));
  cublasLtMatmulAlgoCapGetAttribute(&algo, c, ids.data(), bytes, &bytes);
  return ids;
}

uint32_t cap_u32(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoCapAttributes_t c) {
  uint32_t v = 0;
  size_t got;
  cublasLtMatmulAlgoCapGetAttribute(&algo, c, &v, sizeof v, &got);
  return v;
}

// Every configuration cuBLASLt accepts for this problem without split-K, at most `limit`.
std::vector<cublasLtMatmulAlgo_t> enumerate(Bench& b, const Problem& p, size_t limit) {
  int ids[256], n_ids = 0;
  cublasLtMatmulAlgoGetIds(b.lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF, CUDA_R_16BF,
                           CUDA_R_16BF, CUDA_R_16BF, 256, ids, &n_ids);
  const uint16_t clusters[] = {CUBLASLT_CLUSTER_SHAPE_AUTO, CUBLASLT_CLUSTER_SHAPE_1x1x1,
                               CUBLASLT_CLUSTER_SHAPE_2x1x1, CUBLASLT_CLUSTER_SHAPE_1x2x1,
                               CUBLASLT_CLUSTER_SHAPE_2x2x1, CUBLASLT_CLUSTER_SHAPE_4x1x1,
                               CUBLASLT_CLUSTER_SHAPE_1x4x1};
  std::vector<cublasLtMatmulAlgo_t> out;
  for (int k = 0; k < n_ids && out.size() < limit; k++) {
    cublasLtMatmulAlgo_t algo;
    if (cublasLtMatmulAlgoInit(b.lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF, CUDA_R_16BF,
                               CUDA_R_16BF, CUDA_R_16BF, ids[k], &algo) != 0)
      continue;
    const auto tiles = cap_ids(algo, CUBLASLT_ALGO_CAP_TILE_IDS);
    const auto stages = cap_ids(algo, CUBLASLT_ALGO_CAP_STAGES_IDS);
    const uint32_t swizzles = cap_u32(algo, CUBLASLT_ALGO_CAP_CTA_SWIZZLING_SUPPORT) ? 2 : 1;
    const uint32_t customs = cap_u32(algo, CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX) + 1;
    const uint32_t split = 1, scheme = CUBLASLT_REDUCTION_SCHEME_NONE;
    int accepted = 0;
    for (uint32_t tile : tiles)
      for (uint32_t stage : stages)
        for (uint16_t cluster : clusters)
          for (uint32_t swizzle = 0; swizzle < swizzles; swizzle++)
            for (uint32_t custom = 0; custom < customs; custom++) {
              if (out.size() >= limit) break;
              cublasLtMatmulAlgo_t a = algo;
              cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile,
                                                   sizeof tile);
              cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stage,
                                                   sizeof stage);
              if (cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID,
                                                       &cluster, sizeof cluster) != 0)
                continue;
              cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING,
                                                   &swizzle, sizeof swizzle);
              cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &custom,
                                                   sizeof custom);
              cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split,
                                                   sizeof split);
              cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
                                                   &scheme, sizeof scheme);
              cublasLtMatmulHeuristicResult_t r;
              if (cublasLtMatmulAlgoCheck(b.lt, p.op, p.a, p.b, p.d, p.d, &a, &r) != 0 ||
                  r.workspaceSize > kWorkspace)
                continue;
              out.push_back(a);
              accepted++;
            }
    std::printf("  algorithm id %d: %zu tiles, %zu stages, %u swizzles, %u custom options, %d "
                "configurations accepted\n",
                ids[k], tiles.size(), stages.size(), swizzles, customs, accepted);
  }
  return out;
}

// Times `cands` round-robin at the power cap and prints them against cands[0].
int compare(Bench& b, const Shape& s, const Problem& p,
            const std::vector<cublasLtMatmulAlgo_t>& cands) {
  const int rounds = 7;
  const double flop = 2.0 * s.tokens * s.in * (double)s.out;
  const size_t outputs = (size_t)s.tokens * s.out;
  // Calls per turn: ~40 ms at 700 TFLOP/s.
  const int calls = std::max(4, (int)(40e-3 * 700e12 / flop));
  const size_t n = cands.size();
  std::vector<bool> ok(n);
  std::vector<float> max_abs(n, 0.f);
  CHECK(run(b, p, cands[0], b.y0));
  for (size_t i = 0; i < n; i++) {
    ok[i] = run(b, p, cands[i], b.y) == CUBLAS_STATUS_SUCCESS;
    if (!ok[i]) continue;
    CHECK(cudaMemset(b.diff, 0, 4));
    max_diff<<<1024, 256>>>(b.y, b.y0, outputs, b.diff);
    CHECK(cudaMemcpy(&max_abs[i], b.diff, 4, cudaMemcpyDeviceToHost));
  }
  std::vector<std::vector<float>> ms(n);
  for (int r = 0; r < rounds; r++)
    for (size_t i = 0; i < n; i++)
      if (ok[i]) ms[i].push_back(turn(b, p, cands[i], calls));
  float first = 0;
  char what[160];
  for (size_t i = 0; i < n; i++) {
    if (!ok[i]) {
      std::printf("  candidate %2zu: does not run\n", i);
      continue;
    }
    std::sort(ms[i].begin(), ms[i].end());
    const float med = ms[i][ms[i].size() / 2];
    if (i == 0) first = med;
    describe_algo(cands[i], what, sizeof what);
    std::printf("  candidate %2zu: %.4f ms (min %.4f max %.4f), %.0f TFLOP/s, %.3fx first, "
                "max |diff| %.3g [%s]\n",
                i, med, ms[i].front(), ms[i].back(), flop / (med * 1e-3) / 1e12, med / first,
                max_abs[i], what);
  }
  return 0;
}

int main(int argc, char** argv) {
  const bool search = argc > 1 && std::strcmp(argv[1], "search") == 0;
  const size_t n_w = (size_t)27648 * 3072, n_x = (size_t)4608 * 12288, n_y = (size_t)4608 * 27648;
  Bench b;
  CHECK(cublasLtCreate(&b.lt));
  CHECK(cudaMalloc(&b.ws, kWorkspace));
  CHECK(cudaMalloc(&b.w, n_w * 2));
  CHECK(cudaMalloc(&b.x, n_x * 2));
  CHECK(cudaMalloc(&b.y, n_y * 2));
  CHECK(cudaMalloc(&b.y0, n_y * 2));
  CHECK(cudaMalloc(&b.diff, 4));
  fill_normal<<<(n_w + 255) / 256, 256>>>(b.w, n_w, 1, 0.02f);
  fill_normal<<<(n_x + 255) / 256, 256>>>(b.x, n_x, 2, 1.f);
  CHECK(cudaDeviceSynchronize());
  cudaEventCreate(&b.start);
  cudaEventCreate(&b.stop);

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
  // The search covers the shapes of at least ~200 GFLOP.
  const int searched = 5, max_heuristic = 24, screened = 12;
  for (int k = 0; k < (search ? searched : 8); k++) {
    const Shape& s = shapes[k];
    Problem p;
    CHECK(lt_describe(s.tokens, s.in, s.out, &p));
    cublasLtMatmulPreference_t pref;
    CHECK(cublasLtMatmulPreferenceCreate(&pref));
    CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                               &kWorkspace, sizeof kWorkspace));
    cublasLtMatmulHeuristicResult_t found[max_heuristic];
    int n = 0;
    CHECK(cublasLtMatmulAlgoGetHeuristic(b.lt, p.op, p.a, p.b, p.d, p.d, pref, max_heuristic,
                                         found, &n));
    std::vector<cublasLtMatmulAlgo_t> cands;
    for (int i = 0; i < n; i++) cands.push_back(found[i].algo);
    std::printf("== %s: %d x %d -> %d (%d a step), %d heuristic candidates\n", s.name, s.tokens,
                s.in, s.out, s.per_step, n);
    if (search) {
      const auto all = enumerate(b, p, 6000);
      const double flop = 2.0 * s.tokens * s.in * (double)s.out;
      const int heat = std::max(4, (int)(300e-3 * 700e12 / flop));
      const int calls = std::max(2, (int)(4e-3 * 700e12 / flop));
      turn(b, p, cands[0], heat);
      std::vector<std::pair<float, size_t>> screen;
      for (size_t i = 0; i < all.size(); i++) {
        if (run(b, p, all[i], b.y) != CUBLAS_STATUS_SUCCESS) continue;
        screen.push_back({turn(b, p, all[i], calls), i});
        // The first choice again every 16 configurations, so the screen stays at the power cap
        // as it would for a long list of slow ones too.
        if (i % 16 == 15) turn(b, p, cands[0], calls);
      }
      const float ref = turn(b, p, cands[0], calls * 4);
      std::sort(screen.begin(), screen.end());
      std::printf("  %zu configurations ran; screen: first choice %.4f ms, best %.4f ms\n",
                  screen.size(), ref, screen.empty() ? 0.f : screen[0].first);
      cands.resize(std::min(n, 3));
      for (size_t i = 0; i < screen.size() && (int)i < screened; i++)
        cands.push_back(all[screen[i].second]);
    }
    CHECK(compare(b, s, p, cands));
    cublasLtMatmulPreferenceDestroy(pref);
  }
  return 0;
}
