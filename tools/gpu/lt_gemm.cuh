// The matmul probes' cuBLASLt product (gemm_power.cu, gemm_algos.cu, gemm_sm90.cu,
// gemm_overlap.cu): its description, the heuristic's first algorithm, a call.
#pragma once
#include <cublasLt.h>

#include "gemm_common.cuh"

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

// Enqueues y = x · Wᵀ with `algo` on `stream`.
inline cublasStatus_t lt_run_with(cublasLtHandle_t lt, const LtGemm& g,
                                  const cublasLtMatmulAlgo_t& algo, const void* w, const void* x,
                                  void* y, void* ws, size_t workspace, cudaStream_t stream = 0) {
  const float one = 1.f, zero = 0.f;
  return cublasLtMatmul(lt, g.op, &one, w, g.a, x, g.b, &zero, y, g.d, y, g.d, &algo, ws,
                        workspace, stream);
}

// The same with g's own algorithm.
inline cublasStatus_t lt_run(cublasLtHandle_t lt, const LtGemm& g, const void* w, const void* x,
                             void* y, void* ws, size_t workspace, cudaStream_t stream = 0) {
  return lt_run_with(lt, g, g.algo, w, x, y, ws, workspace, stream);
}

inline void lt_destroy(LtGemm& g) {
  cublasLtMatrixLayoutDestroy(g.a);
  cublasLtMatrixLayoutDestroy(g.b);
  cublasLtMatrixLayoutDestroy(g.d);
  cublasLtMatmulDescDestroy(g.op);
}
