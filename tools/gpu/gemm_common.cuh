// What the matmul probes (gemm_power.cu, gemm_algos.cu, gemm_sm90.cu, gemm_overlap.cu) share: a
// status check that returns from main, random bf16 operands, the mean time of back-to-back calls,
// a cuBLASLt product of the step's kind.
#pragma once
#include <cublasLt.h>
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

// y (tokens × out) = x (tokens × in) · Wᵀ on cuBLASLt, bf16 with f32 accumulation: row-major y is
// column-major D (out × tokens) = Wᵀ · x. Its operation, layouts and algorithm.
struct LtGemm {
  cublasLtMatmulDesc_t op;
  cublasLtMatrixLayout_t a, b, d;
  cublasLtMatmulAlgo_t algo;
};

// The operation and layouts of `g` (no algorithm yet).
inline int lt_describe(int tokens, int in, int out, LtGemm* g) {
  CHECK(cublasLtMatmulDescCreate(&g->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t t = CUBLAS_OP_T;
  CHECK(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t));
  CHECK(cublasLtMatrixLayoutCreate(&g->a, CUDA_R_16BF, in, out, in));
  CHECK(cublasLtMatrixLayoutCreate(&g->b, CUDA_R_16BF, in, tokens, in));
  CHECK(cublasLtMatrixLayoutCreate(&g->d, CUDA_R_16BF, out, tokens, out));
  return 0;
}

// lt_describe, then the heuristic's first algorithm within `workspace` bytes.
inline int lt_plan(cublasLtHandle_t lt, size_t workspace, int tokens, int in, int out,
                   LtGemm* g) {
  CHECK(lt_describe(tokens, in, out, g));
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

// Enqueues y = x · Wᵀ with g's algorithm on `stream`.
inline cublasStatus_t lt_run(cublasLtHandle_t lt, const LtGemm& g, const void* w, const void* x,
                             void* y, void* ws, size_t workspace, cudaStream_t stream = 0) {
  const float one = 1.f, zero = 0.f;
  return cublasLtMatmul(lt, g.op, &one, w, g.a, x, g.b, &zero, y, g.d, y, g.d, &g.algo, ws,
                        workspace, stream);
}

inline void lt_destroy(LtGemm& g) {
  cublasLtMatrixLayoutDestroy(g.a);
  cublasLtMatrixLayoutDestroy(g.b);
  cublasLtMatrixLayoutDestroy(g.d);
  cublasLtMatmulDescDestroy(g.op);
}
