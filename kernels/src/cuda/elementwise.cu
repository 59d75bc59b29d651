// Fused elementwise kernels of the FLUX.2 transformer and the Qwen3 text encoder, bf16 in and
// out, f32 inside. Each one
// rounds to bf16 exactly where the op-by-op composition it replaces rounds (torch's rounding,
// spec §7.1), so the fused result equals the composition up to f32 summation order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "qk_norm_rope.cuh"

namespace {

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf16x2;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// The elements i of one (batch, channel) plane of hw values, the plane being blockIdx.x: the
// blocks of blockIdx.y and their threads stride over it (launched with cuda::plane_grid), so the
// plane's per-channel values are read once and no element pays a 64-bit division.
#define PLANE_LOOP(i, hw)                                                             \
  for (long long i = blockIdx.y * (long long)blockDim.x + threadIdx.x; i < (hw); \
       i += (long long)gridDim.y * blockDim.x)

__device__ __forceinline__ float rnd(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

__device__ __forceinline__ float2 load2(const bf16* p) {
  return __bfloat1622float2(*reinterpret_cast<const bf16x2*>(p));
}

__device__ __forceinline__ void store2(bf16* p, float a, float b) {
  *reinterpret_cast<bf16x2*>(p) = __floats2bfloat162_rn(a, b);
}

__device__ __forceinline__ int global_warp() {
  return (blockIdx.x * blockDim.x + threadIdx.x) / 32;
}

// V consecutive bf16 values as floats: V = 8 is one 16-byte access (the pointer 16-byte
// aligned), V = 2 one 4-byte access.
template <int V>
__device__ __forceinline__ void loadv(const bf16* p, float* f) {
  if constexpr (V == 8) {
    unpack8(*reinterpret_cast<const uint4*>(p), f);
  } else {
    const float2 t = load2(p);
    f[0] = t.x;
    f[1] = t.y;
  }
}

// Eight floats rounded to bf16 in 16 bytes.
__device__ __forceinline__ uint4 pack8(const float* f) {
  uint4 u;
  bf16x2* h = reinterpret_cast<bf16x2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return u;
}

template <int V>
__device__ __forceinline__ void storev(bf16* p, const float* f) {
  if constexpr (V == 8) {
    *reinterpret_cast<uint4*>(p) = pack8(f);
  } else {
    store2(p, f[0], f[1]);
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// A row of at most ROW_VECS * 256 values that a warp keeps in registers (8 per lane and vector).
constexpr int ROW_VECS = 16;

// Loads row `xr` of `dim` values (dim % 8 == 0, 16-byte aligned) into the lane's vectors.
__device__ __forceinline__ void load_row(const bf16* xr, int dim, int lane, uint4 (&buf)[ROW_VECS]) {
#pragma unroll
  for (int k = 0; k < ROW_VECS; ++k) {
    const int c = 8 * (lane + 32 * k);
    if (c < dim) buf[k] = *reinterpret_cast<const uint4*>(xr + c);
  }
}

// Σ f(v) over a row held in registers (load_row), the lane's part then the warp's.
template <typename F>
__device__ __forceinline__ float row_sum(const uint4 (&buf)[ROW_VECS], int dim, int lane, F f) {
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < ROW_VECS; ++k) {
    if (8 * (lane + 32 * k) >= dim) break;
    float v[8];
    unpack8(buf[k], v);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += f(v[i]);
  }
  return warp_sum(acc);
}

// A row that one block (blockDim.x a multiple of 32, cuda::norm_block_per_row) holds in registers:
// thread t's vector k is the 8 values from column 8 · (t + blockDim.x · k). Rows of dim % 8 == 0,
// at most BLOCK_ROW_VECS · 8 · blockDim.x wide, 16-byte aligned.
constexpr int BLOCK_ROW_VECS = 4;

__device__ __forceinline__ bool block_row_fits(int dim) {
  return dim % 8 == 0 && dim <= BLOCK_ROW_VECS * 8 * (int)blockDim.x;
}

// Σ v over the block, every thread getting the same total; `part` holds 32 floats of shared
// memory that the next call must not reuse (back-to-back sums alternate two).
__device__ __forceinline__ float block_sum(float v, float* part) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  return warp_sum(threadIdx.x % 32 < blockDim.x / 32 ? part[threadIdx.x % 32] : 0.f);
}

// Σ f(v) over the thread's values of a row the block holds.
template <typename F>
__device__ __forceinline__ float block_row_part(const uint4 (&buf)[BLOCK_ROW_VECS], int dim, F f) {
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < BLOCK_ROW_VECS; ++k) {
    if (8 * (threadIdx.x + blockDim.x * k) >= dim) break;
    float v[8];
    unpack8(buf[k], v);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += f(v[i]);
  }
  return acc;
}

// (1 + scale) ⊙ LayerNorm(row) + shift for a row the block holds, into orow (the mean, then the
// variance about it: two passes over the registers); shift, scale and orow 16-byte aligned.
__device__ __forceinline__ void modulate_block_row(const uint4 (&buf)[BLOCK_ROW_VECS],
                                                   const bf16* sh, const bf16* sc, bf16* orow,
                                                   int dim, float eps) {
  __shared__ float part[2][32];
  const float mean = block_sum(block_row_part(buf, dim, [](float v) { return v; }), part[0]) / dim;
  const float sq = block_row_part(buf, dim, [mean](float v) { return (v - mean) * (v - mean); });
  const float2 m = make_float2(mean, rsqrtf(block_sum(sq, part[1]) / dim + eps));
#pragma unroll
  for (int k = 0; k < BLOCK_ROW_VECS; ++k) {
    const int c = 8 * (threadIdx.x + blockDim.x * k);
    if (c >= dim) break;
    float v[8], a[8], b[8];
    unpack8(buf[k], v);
    loadv<8>(sc + c, a);
    loadv<8>(sh + c, b);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = rnd(rnd(1.f + a[i]) * rnd((v[i] - m.x) * m.y)) + b[i];
    storev<8>(orow + c, v);
  }
}

}  // namespace

// out = (1 + scale) ⊙ LayerNorm(x) + shift. x, out: (rows, dim) contiguous; shift and scale:
// one dim-vector per batch item (rows_per_batch rows each), batch stride in elements.
// One block per row (cuda::norm_block_per_row); dim even. A row that fits the block's registers
// (block_row_fits) with every operand 16-byte aligned is read once in 16-byte accesses; others
// stream bf16 pairs three times.
extern "C" __global__ void layer_norm_modulate_bf16(const bf16* __restrict__ x,
                                                    const bf16* __restrict__ shift,
                                                    const bf16* __restrict__ scale,
                                                    bf16* __restrict__ out, int rows_per_batch,
                                                    int dim, long long mod_batch_stride,
                                                    float eps) {
  const size_t row = blockIdx.x;
  const bf16* xr = x + row * dim;
  const size_t mod = (row / rows_per_batch) * mod_batch_stride;
  const bf16 *sh = shift + mod, *sc = scale + mod;
  bf16* orow = out + row * dim;
  if (block_row_fits(dim) && aligned16(xr) && aligned16(sh) && aligned16(sc) && aligned16(orow)) {
    uint4 buf[BLOCK_ROW_VECS];
#pragma unroll
    for (int k = 0; k < BLOCK_ROW_VECS; ++k) {
      const int c = 8 * (threadIdx.x + blockDim.x * k);
      if (c >= dim) break;
      buf[k] = *reinterpret_cast<const uint4*>(xr + c);
    }
    modulate_block_row(buf, sh, sc, orow, dim, eps);
    return;
  }
  __shared__ float part[2][32];
  float sum = 0.f;
  for (int i = 2 * threadIdx.x; i < dim; i += 2 * blockDim.x) {
    const float2 v = load2(xr + i);
    sum += v.x + v.y;
  }
  const float mean = block_sum(sum, part[0]) / dim;
  float var = 0.f;
  for (int i = 2 * threadIdx.x; i < dim; i += 2 * blockDim.x) {
    const float2 v = load2(xr + i);
    var += (v.x - mean) * (v.x - mean) + (v.y - mean) * (v.y - mean);
  }
  const float rstd = rsqrtf(block_sum(var, part[1]) / dim + eps);
  for (int i = 2 * threadIdx.x; i < dim; i += 2 * blockDim.x) {
    const float2 v = load2(xr + i);
    const float2 b = load2(sh + i);
    const float2 a = load2(sc + i);
    const float n0 = rnd((v.x - mean) * rstd), n1 = rnd((v.y - mean) * rstd);
    store2(orow + i, rnd(rnd(1.f + a.x) * n0) + b.x, rnd(rnd(1.f + a.y) * n1) + b.y);
  }
}

// r = x + gate ⊙ y (gate_residual_bf16) into out's first rows · dim values and
// (1 + scale) ⊙ LayerNorm(r) + shift (layer_norm_modulate_bf16) into the next, the row read once
// and r kept in registers. x, y: (rows, dim) contiguous; gate, shift and scale: one dim-vector
// per batch item (rows_per_batch rows each), batch strides in elements. One block per row
// (cuda::norm_block_per_row, rows = gridDim.x); the row fits the block's registers (block_row_fits)
// and every operand is 16-byte aligned (the host checks).
extern "C" __global__ void gate_residual_layer_norm_modulate_bf16(
    const bf16* __restrict__ x, const bf16* __restrict__ y, const bf16* __restrict__ gate,
    const bf16* __restrict__ shift, const bf16* __restrict__ scale, bf16* __restrict__ out,
    int rows_per_batch, int dim, long long gate_batch_stride, long long mod_batch_stride,
    float eps) {
  const size_t row = blockIdx.x;
  const size_t at = row * dim;
  const size_t batch = row / rows_per_batch;
  const bf16* g = gate + batch * gate_batch_stride;
  uint4 buf[BLOCK_ROW_VECS];
#pragma unroll
  for (int k = 0; k < BLOCK_ROW_VECS; ++k) {
    const int c = 8 * (threadIdx.x + blockDim.x * k);
    if (c >= dim) break;
    float xv[8], yv[8], gv[8];
    loadv<8>(x + at + c, xv);
    loadv<8>(y + at + c, yv);
    loadv<8>(g + c, gv);
#pragma unroll
    for (int i = 0; i < 8; ++i) xv[i] += rnd(yv[i] * gv[i]);
    buf[k] = pack8(xv);
    *reinterpret_cast<uint4*>(out + at + c) = buf[k];
  }
  const size_t mod = batch * mod_batch_stride;
  modulate_block_row(buf, shift + mod, scale + mod, out + (size_t)gridDim.x * dim + at, dim, eps);
}

// out = weight ⊙ bf16(x · rsqrt(mean(x²) + eps)) over rows of dim: torch's RMSNorm on bf16
// (normalised in f32, rounded, then the weight product rounded). x, out: (rows, dim)
// contiguous; one warp per row; dim even; rows read once into registers (load_row).
extern "C" __global__ void rms_norm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ weight,
                                         bf16* __restrict__ out, int rows, int dim, float eps) {
  const int row = global_warp();
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const bf16* xr = x + (size_t)row * dim;
  bf16* orow = out + (size_t)row * dim;
  if (dim % 8 == 0 && dim <= ROW_VECS * 256 && aligned16(xr) && aligned16(weight) &&
      aligned16(orow)) {
    uint4 buf[ROW_VECS];
    load_row(xr, dim, lane, buf);
    const float rstd = rsqrtf(row_sum(buf, dim, lane, [](float v) { return v * v; }) / dim + eps);
#pragma unroll
    for (int k = 0; k < ROW_VECS; ++k) {
      const int c = 8 * (lane + 32 * k);
      if (c >= dim) break;
      float v[8], w[8];
      unpack8(buf[k], v);
      loadv<8>(weight + c, w);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = rnd(v[i] * rstd) * w[i];
      storev<8>(orow + c, v);
    }
    return;
  }
  float sq = 0.f;
  for (int i = 2 * lane; i < dim; i += 64) {
    const float2 v = load2(xr + i);
    sq += v.x * v.x + v.y * v.y;
  }
  const float rstd = rsqrtf(warp_sum(sq) / dim + eps);
  for (int i = 2 * lane; i < dim; i += 64) {
    const float2 v = load2(xr + i);
    const float2 w = load2(weight + i);
    store2(orow + i, rnd(v.x * rstd) * w.x, rnd(v.y * rstd) * w.y);
  }
}

// Per-head RMSNorm (weight after rounding) then RoPE, from a projection into (B, H, S, HD).
// src row (b, s) starts at b * src_batch_stride + s * src_row_stride; head h is at column
// h * head_dim (the caller offsets src to the q or k columns). cos / sin: (S_rope, HD/2) f32,
// token s uses row rope_offset + s. One warp per (b, s, h); head_dim even and <= 256.
// rotate_half = 0: pairs (2p, 2p + 1), rotated in f32 and rounded once (FLUX.2, which applies
// RoPE in f32). rotate_half = 1: pairs (p, p + HD/2) in bf16 arithmetic, every product and the
// sum rounded (transformers' `q * cos + rotate_half(q) * sin` on bf16; Qwen3).
extern "C" __global__ void qk_norm_rope_bf16(const bf16* __restrict__ src,
                                             const bf16* __restrict__ weight,
                                             const float* __restrict__ cos,
                                             const float* __restrict__ sin,
                                             bf16* __restrict__ out, int batch, int seq, int heads,
                                             int head_dim, long long src_batch_stride,
                                             long long src_row_stride, int rope_offset,
                                             float eps, int rotate_half) {
  const int idx = global_warp();
  const int lane = threadIdx.x % 32;
  if (idx >= batch * seq * heads) return;
  const int h = idx % heads;
  const int s = (idx / heads) % seq;
  const int b = idx / (heads * seq);
  const bf16* xr = src + (size_t)b * src_batch_stride + (size_t)s * src_row_stride + h * head_dim;
  const int pairs = head_dim / 2;
  // Pair p's members are elements first·p and first·p + second.
  const int first = rotate_half ? 1 : 2;
  const int second = rotate_half ? pairs : 1;
  float2 v[4];
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int p = lane + 32 * i;
    if (p >= pairs) {
      v[i] = make_float2(0.f, 0.f);
    } else if (rotate_half) {
      v[i] = make_float2(__bfloat162float(xr[p]), __bfloat162float(xr[p + pairs]));
    } else {
      v[i] = load2(xr + 2 * p);
    }
    sq += v[i].x * v[i].x + v[i].y * v[i].y;
  }
  const float rstd = rsqrtf(warp_sum(sq) / head_dim + eps);
  const float* c = cos + (size_t)(rope_offset + s) * pairs;
  const float* sn = sin + (size_t)(rope_offset + s) * pairs;
  bf16* orow = out + (((size_t)b * heads + h) * seq + s) * head_dim;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int p = lane + 32 * i;
    if (p >= pairs) break;
    const float y0 = rnd(rnd(v[i].x * rstd) * __bfloat162float(weight[first * p]));
    const float y1 = rnd(rnd(v[i].y * rstd) * __bfloat162float(weight[first * p + second]));
    if (rotate_half) {
      orow[p] = __float2bfloat16_rn(rnd(y0 * c[p]) - rnd(y1 * sn[p]));
      orow[p + pairs] = __float2bfloat16_rn(rnd(y1 * c[p]) + rnd(y0 * sn[p]));
    } else {
      store2(orow + 2 * p, y0 * c[p] - y1 * sn[p], y1 * c[p] + y0 * sn[p]);
    }
  }
}

// qk_norm_rope_bf16 for FLUX.2's case, head_dim 128 with interleaved pairs, in 16-byte
// accesses: a warp takes QK_HEADS_PER_WARP heads of one token, a half-warp one head (lane l
// holds elements 8l..8l+7, i.e. pairs 4l..4l+3, and their cos / sin); src, the weights, the
// tables' rows and out 16-byte aligned. Same arithmetic and roundings as the generic kernel
// (norm_rope8, which Hopper's attention also applies to Q).
// Tokens s < seq_a come from src_a with weight w_a, the others (s − seq_a) from src_b with w_b
// (the double-stream blocks' [txt; img]); out is (batch, heads, seq, 128).
constexpr int QK_HEADS_PER_WARP = 8;

extern "C" __global__ void qk_norm_rope_interleaved128_bf16(
    const bf16* __restrict__ src_a, const bf16* __restrict__ w_a, const bf16* __restrict__ src_b,
    const bf16* __restrict__ w_b, const float* __restrict__ cos, const float* __restrict__ sin,
    bf16* __restrict__ out, int batch, int seq_a, int seq, int heads, long long a_batch_stride,
    long long a_row_stride, long long b_batch_stride, long long b_row_stride, int rope_offset,
    float eps) {
  const int groups = (heads + QK_HEADS_PER_WARP - 1) / QK_HEADS_PER_WARP;
  const int idx = global_warp();
  if (idx >= batch * seq * groups) return;
  const int lane = threadIdx.x % 32, half = lane / 16, l = lane % 16;
  const int group = idx % groups;
  const int s = (idx / groups) % seq;
  const int b = idx / (groups * seq);
  const bool first = s < seq_a;
  const bf16* xr = (first ? src_a + (size_t)b * a_batch_stride + (size_t)s * a_row_stride
                          : src_b + (size_t)b * b_batch_stride + (size_t)(s - seq_a) * b_row_stride) +
                   8 * l;
  float w[8];
  loadv<8>((first ? w_a : w_b) + 8 * l, w);
  const float4 c4 = reinterpret_cast<const float4*>(cos + (size_t)(rope_offset + s) * 64)[l];
  const float4 s4 = reinterpret_cast<const float4*>(sin + (size_t)(rope_offset + s) * 64)[l];
  // Every head's 16 bytes are loaded before the first reduction: four loads in flight a
  // thread rather than one at a time between the shuffles.
  uint4 raw[QK_HEADS_PER_WARP / 2];
#pragma unroll
  for (int j = 0; j < QK_HEADS_PER_WARP; j += 2) {
    const int h = group * QK_HEADS_PER_WARP + j + half;
    raw[j / 2] = h < heads ? *reinterpret_cast<const uint4*>(xr + h * 128) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int j = 0; j < QK_HEADS_PER_WARP; j += 2) {
    const int h = group * QK_HEADS_PER_WARP + j + half;
    const bool live = h < heads;
    float v[8];
    unpack8(raw[j / 2], v);
    const float rstd = head_rstd(v, eps);
    if (!live) continue;
    float y[8];
    norm_rope8(v, rstd, w, c4, s4, y);
    storev<8>(out + (((size_t)b * heads + h) * seq + s) * 128 + 8 * l, y);
  }
}

// out = silu(gate) ⊙ up over (rows, width); silu rounded to bf16 first. gate, up and out rows
// are *_row_stride apart (any may be a column range of a wider buffer); width and the strides
// even. One block per row; 16-byte accesses where the row's operands allow them.
template <int V>
__device__ __forceinline__ void swiglu_row(const bf16* g, const bf16* u, bf16* o, int width) {
  for (int c = V * threadIdx.x; c < width; c += V * blockDim.x) {
    float gv[V], uv[V];
    loadv<V>(g + c, gv);
    loadv<V>(u + c, uv);
#pragma unroll
    for (int i = 0; i < V; ++i) gv[i] = rnd(gv[i] / (1.f + __expf(-gv[i]))) * uv[i];
    storev<V>(o + c, gv);
  }
}

extern "C" __global__ void swiglu_bf16(const bf16* __restrict__ gate, const bf16* __restrict__ up,
                                       bf16* __restrict__ out, int width,
                                       long long gate_row_stride, long long up_row_stride,
                                       long long out_row_stride) {
  const size_t r = blockIdx.x;
  const bf16* g = gate + r * gate_row_stride;
  const bf16* u = up + r * up_row_stride;
  bf16* o = out + r * out_row_stride;
  if (width % 8 == 0 && aligned16(g) && aligned16(u) && aligned16(o)) {
    swiglu_row<8>(g, u, o, width);
  } else {
    swiglu_row<2>(g, u, o, width);
  }
}

// out = x + gate ⊙ y, the product rounded first. x, y, out: (rows, dim) contiguous; gate: one
// dim-vector per batch item (rows_per_batch rows each), batch stride in elements; dim even.
// One block per row; 16-byte accesses where the row's operands allow them.
template <int V>
__device__ __forceinline__ void gate_residual_row(const bf16* x, const bf16* y, const bf16* g,
                                                  bf16* o, int dim) {
  for (int c = V * threadIdx.x; c < dim; c += V * blockDim.x) {
    float xv[V], yv[V], gv[V];
    loadv<V>(x + c, xv);
    loadv<V>(y + c, yv);
    loadv<V>(g + c, gv);
#pragma unroll
    for (int i = 0; i < V; ++i) xv[i] += rnd(yv[i] * gv[i]);
    storev<V>(o + c, xv);
  }
}

extern "C" __global__ void gate_residual_bf16(const bf16* __restrict__ x,
                                              const bf16* __restrict__ y,
                                              const bf16* __restrict__ gate,
                                              bf16* __restrict__ out, int rows_per_batch, int dim,
                                              long long gate_batch_stride) {
  const size_t r = blockIdx.x;
  const size_t row = r * dim;
  const bf16* g = gate + (r / rows_per_batch) * gate_batch_stride;
  if (dim % 8 == 0 && aligned16(x + row) && aligned16(y + row) && aligned16(g) &&
      aligned16(out + row)) {
    gate_residual_row<8>(x + row, y + row, g, out + row, dim);
  } else {
    gate_residual_row<2>(x + row, y + row, g, out + row, dim);
  }
}

// Sums `sum` and `sq` over the block (at most 32 warps) and stores the two totals at out[0],
// out[1] from thread 0.
__device__ __forceinline__ void block_sum2_store(float sum, float sq, float* __restrict__ out) {
  __shared__ float s_sum[32], s_sq[32];
  sum = warp_sum(sum);
  sq = warp_sum(sq);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_sum[warp] = sum;
    s_sq[warp] = sq;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    sum = lane < warps ? s_sum[lane] : 0.f;
    sq = lane < warps ? s_sq[lane] : 0.f;
    sum = warp_sum(sum);
    sq = warp_sum(sq);
    if (lane == 0) {
      out[0] = sum;
      out[1] = sq;
    }
  }
}

// GroupNorm statistics, pass 1: block (bg, split) sums x − pivot and its square over its share
// of group bg's n contiguous elements (pivot = the group's first element, which keeps the f32
// sums of a large group from cancelling). partial: [bg][split][2].
template <typename T>
__device__ __forceinline__ void group_norm_partials(const T* __restrict__ x,
                                                    float* __restrict__ partial, long long n) {
  const int bg = blockIdx.x;
  const int splits = gridDim.y;
  const T* g = x + (size_t)bg * n;
  const float pivot = (float)g[0];
  const long long per_split = (n + splits - 1) / splits;
  const long long begin = blockIdx.y * per_split;
  const long long end = min(n, begin + per_split);
  float sum = 0.f, sq = 0.f;
  for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = (float)g[i] - pivot;
    sum += v;
    sq += v * v;
  }
  block_sum2_store(sum, sq, partial + ((size_t)bg * splits + blockIdx.y) * 2);
}

// Group bg's partial sums (pass 1's [bg][split][2]) added up in f64.
__device__ __forceinline__ void sum_partials(const float* __restrict__ partial, int bg,
                                             int splits, double& sum, double& sq) {
  sum = 0.0;
  sq = 0.0;
  for (int s = 0; s < splits; ++s) {
    sum += partial[((size_t)bg * splits + s) * 2];
    sq += partial[((size_t)bg * splits + s) * 2 + 1];
  }
}

// Pass 2: per group, the partials (in f64) → mean and 1/sqrt(var + eps). stats: [bg][2].
template <typename T>
__device__ __forceinline__ void group_norm_stats(const T* __restrict__ x,
                                                 const float* __restrict__ partial,
                                                 float* __restrict__ stats, int groups_total,
                                                 int splits, long long n, float eps) {
  const int bg = blockIdx.x * blockDim.x + threadIdx.x;
  if (bg >= groups_total) return;
  double sum, sq;
  sum_partials(partial, bg, splits, sum, sq);
  const double shifted_mean = sum / n;
  const double var = fmax(sq / n - shifted_mean * shifted_mean, 0.0);
  stats[bg * 2] = (float)(shifted_mean + (double)(float)x[(size_t)bg * n]);
  stats[bg * 2 + 1] = (float)(1.0 / sqrt(var + eps));
}

// A norm's output x · scale + shift in f32, rounded to T; with silu, silu of the rounded value,
// rounded again (torch's order).
template <typename T>
__device__ __forceinline__ T affine_silu(T x, float scale, float shift, int silu) {
  float y = (float)(T)((float)x * scale + shift);
  if (silu) y = y / (1.f + __expf(-y));
  return (T)y;
}

// Pass 3: each plane bc's (= batch · channels + c) affine from its group's statistics, scale =
// rstd · w, shift = b − mean · scale: scale_shift [0][bc] = scale, [1][bc] = shift. Pass 4 is
// channel_affine (GroupNorm applies it; a convolution's prologue applies it on its way in).
extern "C" __global__ void group_norm_scale_shift(const float* __restrict__ stats,
                                                  const float* __restrict__ weight,
                                                  const float* __restrict__ bias,
                                                  float* __restrict__ scale_shift, int planes,
                                                  int channels, int cpg) {
  const int bc = blockIdx.x * blockDim.x + threadIdx.x;
  if (bc >= planes) return;
  const int c = bc % channels;
  const int bg = (bc / channels) * (channels / cpg) + c / cpg;
  const float scale = stats[bg * 2 + 1] * weight[c];
  scale_shift[bc] = scale;
  scale_shift[planes + bc] = bias[c] - stats[bg * 2] * scale;
}

#define GROUP_NORM(T, NAME)                                                                    \
  extern "C" __global__ void group_norm_partials_##NAME(const T* x, float* partial,            \
                                                        long long n) {                         \
    group_norm_partials<T>(x, partial, n);                                                     \
  }                                                                                            \
  extern "C" __global__ void group_norm_stats_##NAME(const T* x, const float* partial,         \
                                                     float* stats, int groups_total,           \
                                                     int splits, long long n, float eps) {     \
    group_norm_stats<T>(x, partial, stats, groups_total, splits, n, eps);                      \
  }

GROUP_NORM(float, f32)
GROUP_NORM(bf16, bf16)

// A tiled decode's group-norm moments (group_stats.rs, `GroupMoments`): block (bg, split) sums x
// and x² over its share of the part of group bg's planes inside rows [r0, r0 + rows) and columns
// [c0, c0 + cols); then per group the partials in f64. partial: [bg][split][2], out: [bg][2].
template <typename T>
__device__ __forceinline__ void group_region_partials(const T* __restrict__ x,
                                                      float* __restrict__ partial, int cpg, int h,
                                                      int w, int r0, int rows, int c0, int cols) {
  const int bg = blockIdx.x, splits = gridDim.y;
  const T* g = x + (size_t)bg * cpg * h * w;
  const long long plane = (long long)rows * cols, n = plane * cpg;
  const long long per_split = (n + splits - 1) / splits;
  const long long begin = blockIdx.y * per_split, end = min(n, begin + per_split);
  float sum = 0.f, sq = 0.f;
  for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const long long ch = i / plane, at = i % plane;
    const float v = (float)g[(ch * h + r0 + at / cols) * w + c0 + at % cols];
    sum += v;
    sq += v * v;
  }
  block_sum2_store(sum, sq, partial + ((size_t)bg * splits + blockIdx.y) * 2);
}

extern "C" __global__ void group_region_totals(const float* __restrict__ partial,
                                               double* __restrict__ out, int groups_total,
                                               int splits) {
  const int bg = blockIdx.x * blockDim.x + threadIdx.x;
  if (bg >= groups_total) return;
  double sum, sq;
  sum_partials(partial, bg, splits, sum, sq);
  out[bg * 2] = sum;
  out[bg * 2 + 1] = sq;
}

// y = x · scale[bc] + shift[bc] in f32, rounded to T; with silu, silu(y) from the rounded y,
// rounded again: a group norm whose statistics come from elsewhere (`ChannelAffine`).
template <typename T>
__device__ __forceinline__ void channel_affine(const T* __restrict__ x,
                                               const float* __restrict__ scale,
                                               const float* __restrict__ shift,
                                               T* __restrict__ out, long long hw, int silu) {
  const long long bc = blockIdx.x;
  const float a = scale[bc], b = shift[bc];
  PLANE_LOOP(i, hw) out[bc * hw + i] = affine_silu<T>(x[bc * hw + i], a, b, silu);
}

#define GROUP_REGION(T, NAME)                                                                   \
  extern "C" __global__ void group_region_partials_##NAME(const T* x, float* partial, int cpg,  \
                                                          int h, int w, int r0, int rows,       \
                                                          int c0, int cols) {                   \
    group_region_partials<T>(x, partial, cpg, h, w, r0, rows, c0, cols);                        \
  }                                                                                             \
  extern "C" __global__ void channel_affine_##NAME(const T* x, const float* scale,             \
                                                   const float* shift, T* out, long long hw,    \
                                                   int silu) {                                  \
    channel_affine<T>(x, scale, shift, out, hw, silu);                                          \
  }

GROUP_REGION(float, f32)
GROUP_REGION(bf16, bf16)

// The VAE's cuDNN convolutions (conv.rs): the output starts as the bias (plus the residual the
// block adds) and cuDNN accumulates its products into it (beta = 1); split-TF32 convolutions
// take each f32 value as hi + lo, hi its top 19 bits (exact in TF32), lo the exact remainder.
template <bool RESIDUAL>
__device__ __forceinline__ void conv_bias_fill(const float* __restrict__ bias,
                                               const float* __restrict__ residual,
                                               float* __restrict__ out, int channels,
                                               long long hw) {
  const long long bc = blockIdx.x;
  const float b = bias[bc % channels];
  PLANE_LOOP(i, hw) out[bc * hw + i] = RESIDUAL ? b + residual[bc * hw + i] : b;
}

extern "C" __global__ void conv_bias_fill_f32(const float* bias, float* out, int channels,
                                              long long hw) {
  conv_bias_fill<false>(bias, nullptr, out, channels, hw);
}

extern "C" __global__ void conv_bias_residual_fill_f32(const float* bias, const float* residual,
                                                       float* out, int channels, long long hw) {
  conv_bias_fill<true>(bias, residual, out, channels, hw);
}

extern "C" __global__ void tf32_split_f32(const float* __restrict__ x, float* __restrict__ hi,
                                          float* __restrict__ lo, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float v = x[i];
    const float h = __uint_as_float(__float_as_uint(v) & 0xffffe000u);
    hi[i] = h;
    lo[i] = v - h;
  }
}

// Rows [row0, row0 + rows) of every (H, W) plane of x, with zero rows above / below and zero
// columns left / right: a convolution band's padded input in one pass (conv.rs).
template <typename T>
__device__ __forceinline__ void pad_rows(const T* __restrict__ x, T* __restrict__ out,
                                         long long planes, int h, int w, int row0, int rows,
                                         int top, int bottom, int left, int right) {
  const int ow = w + left + right, oh = top + rows + bottom;
  const long long total = planes * oh * ow;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int c = (int)(i % ow) - left;
    const long long pr = i / ow;
    const int r = (int)(pr % oh) - top;
    const long long plane = pr / oh;
    out[i] = (r >= 0 && r < rows && c >= 0 && c < w) ? x[(plane * h + row0 + r) * w + c] : T(0.f);
  }
}

#define PAD_ROWS(T, NAME)                                                                      \
  extern "C" __global__ void pad_rows_##NAME(const T* x, T* out, long long planes, int h,      \
                                             int w, int row0, int rows, int top, int bottom,   \
                                             int left, int right) {                            \
    pad_rows<T>(x, out, planes, h, w, row0, rows, top, bottom, left, right);                   \
  }

PAD_ROWS(float, f32)
PAD_ROWS(bf16, bf16)

// cuDNN's TF32 convolutions run NHWC: conv.rs hands them NHWC operands (x transposed and, for
// split TF32, split on the way) and takes an NHWC output back to NCHW adding the bias and the
// residual. Tiles of 64 pixels × 32 channels through shared memory; grid (pixel tiles, channel
// tiles, batch), 256 threads. Each thread moves pairs of neighbours: two pixels of a channel
// plane on the NCHW side, two channels of a pixel on the NHWC side; with PAIRS (c, the pixel
// counts and plane strides even, every NCHW operand at an even offset) as one 8-byte (f32) or
// 4-byte (fp16) access. A convolution run in bands of rows moves a window of whole rows: the
// NCHW side's planes are `plane` elements apart (the whole tensor's h · w), the window starting
// where its pointer points.
// On the way in x may go through its prologue (conv.rs `Prologue`): with `scale` non-null the
// per-(batch, channel) affine and optionally SiLU (a group norm, rounded as channel_affine
// rounds).
// SPLIT writes x_hi = x with the low 13 mantissa bits cleared (exact in TF32) to `hi` and the
// remainder x − x_hi scaled by `lo_scale` (a power of two that keeps it out of fp16's subnormal
// range) and rounded to fp16 to `lo` (|x_lo| < 2⁻¹⁰|x|: fp16's 11 significant bits keep it to
// ~2⁻²² of x); with `hi16` non-null also x_hi / lo_scale in fp16.
constexpr int kTilePixels = 64, kTileChannels = 32;

template <bool SPLIT, bool PAIRS>
__device__ __forceinline__ void nchw_to_nhwc(const float* __restrict__ x,
                                             const float* __restrict__ scale,
                                             const float* __restrict__ shift, int silu,
                                             float* __restrict__ hi, __half* __restrict__ lo,
                                             __half* __restrict__ hi16, float lo_scale, int c,
                                             int h, int w, long long plane_stride) {
  __shared__ float tile[kTileChannels][kTilePixels + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long hw = (long long)h * w;
  const long long n = blockIdx.z, p0 = (long long)blockIdx.x * kTilePixels;
  const int c0 = blockIdx.y * kTileChannels;
  // In: a warp per channel row, a pixel pair per lane.
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = warp + 8 * j, ci = c0 + r;
    const long long p = p0 + 2 * lane;
    float v[2] = {0.f, 0.f};
    if (ci < c) {
      const float* plane = x + (n * c + ci) * plane_stride;
      if (PAIRS && p < hw) {
        const float2 t = *reinterpret_cast<const float2*>(plane + p);
        v[0] = t.x;
        v[1] = t.y;
      } else if (!PAIRS) {
        if (p < hw) v[0] = plane[p];
        if (p + 1 < hw) v[1] = plane[p + 1];
      }
      if (scale) {
        const float a = scale[n * c + ci], b = shift[n * c + ci];
        v[0] = affine_silu<float>(v[0], a, b, silu);
        v[1] = affine_silu<float>(v[1], a, b, silu);
      }
    }
    tile[r][2 * lane] = v[0];
    tile[r][2 * lane + 1] = v[1];
  }
  __syncthreads();
  // Out: a half-warp per pixel, a channel pair per lane.
  const int k = 2 * (lane & 15), ci = c0 + k;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int q = 2 * warp + (lane >> 4) + 16 * j;
    const long long p = p0 + q;
    if (p >= hw || ci >= c) continue;
    const bool both = PAIRS || ci + 1 < c;
    const float v[2] = {tile[k][q], both ? tile[k + 1][q] : 0.f};
    const long long o = (n * hw + p) * c + ci;
    if (!SPLIT) {
      if (PAIRS) {
        *reinterpret_cast<float2*>(hi + o) = make_float2(v[0], v[1]);
      } else {
        hi[o] = v[0];
        if (both) hi[o + 1] = v[1];
      }
      continue;
    }
    float vh[2];
    __half vl[2], vh16[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      vh[i] = __uint_as_float(__float_as_uint(v[i]) & 0xffffe000u);
      vl[i] = __float2half_rn((v[i] - vh[i]) * lo_scale);
      vh16[i] = __float2half_rn(vh[i] / lo_scale);
    }
    if (PAIRS) {
      *reinterpret_cast<float2*>(hi + o) = make_float2(vh[0], vh[1]);
      *reinterpret_cast<__half2*>(lo + o) = __halves2half2(vl[0], vl[1]);
      if (hi16) *reinterpret_cast<__half2*>(hi16 + o) = __halves2half2(vh16[0], vh16[1]);
    } else {
      hi[o] = vh[0];
      lo[o] = vl[0];
      if (hi16) hi16[o] = vh16[0];
      if (both) {
        hi[o + 1] = vh[1];
        lo[o + 1] = vl[1];
        if (hi16) hi16[o + 1] = vh16[1];
      }
    }
  }
}

#define NCHW_TO_NHWC(PAIRS, SUFFIX)                                                            \
  extern "C" __global__ void nchw_to_nhwc_f32##SUFFIX(                                         \
      const float* x, const float* scale, const float* shift, int silu, float* out, int c,     \
      int h, int w, long long plane) {                                                         \
    nchw_to_nhwc<false, PAIRS>(x, scale, shift, silu, out, nullptr, nullptr, 1.f, c, h, w,     \
                               plane);                                                         \
  }                                                                                            \
  extern "C" __global__ void nchw_to_nhwc_split_f32##SUFFIX(                                   \
      const float* x, const float* scale, const float* shift, int silu, float* hi, __half* lo, \
      __half* hi16, float lo_scale, int c, int h, int w, long long plane) {                    \
    nchw_to_nhwc<true, PAIRS>(x, scale, shift, silu, hi, lo, hi16, lo_scale, c, h, w, plane);  \
  }

NCHW_TO_NHWC(false, )
NCHW_TO_NHWC(true, _pairs)

// Two neighbouring channels of a convolution's NHWC output at element `at` (even): y, plus
// y_lo / lo_scale (the split's scaled fp16 low-part convolution) where y_lo is non-null.
__device__ __forceinline__ float2 output_pair(const float* __restrict__ y,
                                              const __half* __restrict__ y_lo, float lo_scale,
                                              long long at) {
  float2 v = *reinterpret_cast<const float2*>(y + at);
  if (y_lo) {
    const float2 l = __half22float2(*reinterpret_cast<const __half2*>(y_lo + at));
    v.x += l.x / lo_scale;
    v.y += l.y / lo_scale;
  }
  return v;
}

// out = y (+ y_lo / lo_scale, the split's scaled fp16 low-part convolution, where y_lo is
// non-null) + bias (+ residual), `hw` pixels per image: y's pixels `skip ..` of the `y_hw` it
// holds per image, out's (and the residual's) planes `plane` elements apart.
template <bool RESIDUAL, bool PAIRS>
__device__ __forceinline__ void nhwc_to_nchw_bias(const float* __restrict__ y,
                                                  const __half* __restrict__ y_lo, float lo_scale,
                                                  const float* __restrict__ bias,
                                                  const float* __restrict__ residual,
                                                  float* __restrict__ out, int c, long long hw,
                                                  long long y_hw, long long skip,
                                                  long long plane) {
  __shared__ float tile[kTileChannels][kTilePixels + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long n = blockIdx.z, p0 = (long long)blockIdx.x * kTilePixels;
  const int c0 = blockIdx.y * kTileChannels;
  // In: a half-warp per pixel, a channel pair per lane.
  const int k = 2 * (lane & 15);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int q = 2 * warp + (lane >> 4) + 16 * j, ci = c0 + k;
    const long long p = p0 + q;
    float v[2] = {0.f, 0.f};
    if (p < hw && ci < c) {
      const long long at = (n * y_hw + skip + p) * c + ci;
      if (PAIRS) {
        const float2 t = output_pair(y, y_lo, lo_scale, at);
        v[0] = t.x;
        v[1] = t.y;
      } else {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          if (ci + i < c) v[i] = y_lo ? y[at + i] + __half2float(y_lo[at + i]) / lo_scale : y[at + i];
        }
      }
    }
    tile[k][q] = v[0];
    tile[k + 1][q] = v[1];
  }
  __syncthreads();
  // Out: a warp per channel row, a pixel pair per lane.
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = warp + 8 * j, ci = c0 + r;
    const long long p = p0 + 2 * lane;
    if (ci >= c || p >= hw) continue;
    const long long o = (n * c + ci) * plane + p;
    float v[2] = {tile[r][2 * lane] + bias[ci], tile[r][2 * lane + 1] + bias[ci]};
    if (PAIRS) {
      if (RESIDUAL) {
        const float2 t = *reinterpret_cast<const float2*>(residual + o);
        v[0] += t.x;
        v[1] += t.y;
      }
      *reinterpret_cast<float2*>(out + o) = make_float2(v[0], v[1]);
    } else {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (p + i < hw) out[o + i] = RESIDUAL ? v[i] + residual[o + i] : v[i];
      }
    }
  }
}

#define NHWC_TO_NCHW(PAIRS, SUFFIX)                                                            \
  extern "C" __global__ void nhwc_to_nchw_bias_f32##SUFFIX(                                    \
      const float* y, const __half* y_lo, float lo_scale, const float* bias, float* out, int c, \
      long long hw, long long y_hw, long long skip, long long plane) {                          \
    nhwc_to_nchw_bias<false, PAIRS>(y, y_lo, lo_scale, bias, nullptr, out, c, hw, y_hw, skip,  \
                                    plane);                                                    \
  }                                                                                            \
  extern "C" __global__ void nhwc_to_nchw_bias_residual_f32##SUFFIX(                           \
      const float* y, const __half* y_lo, float lo_scale, const float* bias,                   \
      const float* residual, float* out, int c, long long hw, long long y_hw, long long skip,   \
      long long plane) {                                                                       \
    nhwc_to_nchw_bias<true, PAIRS>(y, y_lo, lo_scale, bias, residual, out, c, hw, y_hw, skip,  \
                                   plane);                                                     \
  }

NHWC_TO_NCHW(false, )
NHWC_TO_NCHW(true, _pairs)

// A ×2 nearest upsampling then a 3×3 convolution, run as one 2×2 convolution with padding 1
// and four phase filters over the low-resolution x (conv.rs `upsample_conv2d`): its NHWC output
// y (N, (H + 1) · (W + 1), 4C) (+ y_lo / lo_scale) holds phase (a, b)'s channels at
// [(2a + b) · C, (2a + b + 1) · C) and output pixel (2i + a, 2j + b) at y's pixel (i + a, j + b).
// out (N, C, 2H, 2W) = that + bias. C even (pairs of channels per access). In bands of
// low-resolution rows, y holds the `y_rows` pixel rows per image from row `y_row0` on (the
// band's window of x, plus one), and the grid covers rows i0 ..: Grid (⌈W / 32⌉, 2 · rows,
// N · ⌈C / 32⌉), 256 threads: a block takes 32 low-resolution pixels of row i, both column
// phases b of row phase a, 32 channels, and writes 64 neighbouring output pixels a row.
constexpr int kSubTilePixels = 32, kSubTileChannels = 32;

extern "C" __global__ void nhwc_subpixel_to_nchw_bias_f32(
    const float* __restrict__ y, const __half* __restrict__ y_lo, float lo_scale,
    const float* __restrict__ bias, float* __restrict__ out, int c, int h, int w, int i0,
    int y_rows, int y_row0) {
  __shared__ float tile[kSubTileChannels][2 * kSubTilePixels + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int j0 = blockIdx.x * kSubTilePixels, i = i0 + (blockIdx.y >> 1), a = blockIdx.y & 1;
  const int channel_tiles = (c + kSubTileChannels - 1) / kSubTileChannels;
  const int n = blockIdx.z / channel_tiles, c0 = (blockIdx.z % channel_tiles) * kSubTileChannels;
  const long long wp = w + 1;
  // In: a half-warp per (column phase, pixel), a channel pair per lane.
  const int k = 2 * (lane & 15);
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int row = 2 * warp + (lane >> 4) + 16 * it;  // 0..63: b = row / 32, pixel row % 32
    const int b = row >> 5, q = row & 31, j = j0 + q, ci = c0 + k;
    float v[2] = {0.f, 0.f};
    if (j < w && ci < c) {
      const long long pixel = ((long long)n * y_rows + i + a - y_row0) * wp + j + b;
      const long long at = pixel * 4 * c + (long long)(2 * a + b) * c + ci;
      const float2 t = output_pair(y, y_lo, lo_scale, at);
      v[0] = t.x;
      v[1] = t.y;
    }
    tile[k][2 * q + b] = v[0];
    tile[k + 1][2 * q + b] = v[1];
  }
  __syncthreads();
  // Out: a warp per channel, a pair of neighbouring output pixels (b = 0, 1) per lane.
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int r = warp + 8 * it, ci = c0 + r, j = j0 + lane;
    if (ci >= c || j >= w) continue;
    const long long o = (((long long)n * c + ci) * 2 * h + 2 * i + a) * 2 * w + 2 * j;
    const float bi = bias[ci];
    *reinterpret_cast<float2*>(out + o) =
        make_float2(tile[r][2 * lane] + bi, tile[r][2 * lane + 1] + bi);
  }
}

// Decoder output (B, 3, H, W) → (B, H, W, 3) u8 (pixels.rs): y = clamp(T(x / 2 + 0.5), 0, 1)
// in the dtype T (x / 2 is exact, so the sum rounds once to f32, then to T), then
// rint(f32(y) · 255), rint rounding ties to even as numpy's round does.
__device__ __forceinline__ float as_float(float v) { return v; }
__device__ __forceinline__ float as_float(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float in_dtype(float v, float) { return v; }
__device__ __forceinline__ float in_dtype(float v, bf16) { return rnd(v); }

template <typename T>
__device__ __forceinline__ void rgb_u8(const T* __restrict__ x, unsigned char* __restrict__ out,
                                       long long plane, long long pixels) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < pixels;
       i += (long long)gridDim.x * blockDim.x) {
    const T* xi = x + (i / plane) * 3 * plane + i % plane;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      const float y = fminf(fmaxf(in_dtype(as_float(xi[c * plane]) * 0.5f + 0.5f, T()), 0.f), 1.f);
      out[3 * i + c] = (unsigned char)rintf(__fmul_rn(y, 255.f));
    }
  }
}

extern "C" __global__ void rgb_u8_f32(const float* x, unsigned char* out, long long plane,
                                      long long pixels) {
  rgb_u8(x, out, plane, pixels);
}

extern "C" __global__ void rgb_u8_bf16(const bf16* x, unsigned char* out, long long plane,
                                       long long pixels) {
  rgb_u8(x, out, plane, pixels);
}

// A fingerprint of n 16-bit values (their bits): the sum over i of (bits_i + 1) · h(i) mod 2⁶⁴,
// into *out (zeroed by the caller). Order-free, so any grid gives the same value; two outputs
// that differ in a bit differ in it but for a 2⁻⁶⁴ chance. The GEMM tuning compares its
// candidates' outputs with it (kernels/src/linear/cublaslt.rs).
extern "C" __global__ void fingerprint_u16(const uint16_t* __restrict__ x, long long n,
                                           unsigned long long* out) {
  unsigned long long sum = 0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    unsigned long long h = (unsigned long long)i * 0x9E3779B97F4A7C15ull;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 29;
    sum += ((unsigned long long)x[i] + 1) * (h | 1);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
  if (threadIdx.x % 32 == 0) atomicAdd(out, sum);
}
