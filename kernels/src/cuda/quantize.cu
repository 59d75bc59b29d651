// Load-time quantization of a weight into ggml blocks on the GPU (klein_kernels::quant::
// quantize_rows on a CUDA device): Q8_0, Q4_0, Q4_1, Q4_K and Q6_K, from f32, bf16 or f16.
//
// Every kernel is a line-by-line port of the host quantizer the services otherwise run (candle
// 0.11.1's `from_float` of each block type, the scalar code an x86 host executes), so the GPU
// writes the host's bytes. Each input converts to f32 exactly. Every float operation is the
// host's, in the host's order, rounded once: written as PTX without .ftz (the helpers below), so
// neither --use_fast_math's flush-to-zero nor fma contraction can change a value, and a
// subnormal weight quantizes as the host quantizes it. Rust's `round` (half away from zero),
// its saturating float-to-integer casts (NaN to 0), `f32::max` / `f32::min` (a NaN operand
// ignored) and `total_cmp` are reproduced exactly. Where the host's own result is unspecified
// (the sign of a zero that `f32::max` returns, which differs between a debug and a release build
// of the host), a zero scale or min may carry the other sign: its weights dequantize to the same
// values.
//
// Launch: one thread per ggml block (32 weights, or a 256-weight super-block for the k-quants),
// in 1-D launch blocks of any size; a thread reads its block's weights from global memory
// (L1-cached) and writes its block's bytes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "ggml_blocks.cuh"

namespace {

// ---- IEEE single precision as the host computes it (PTX without .ftz) ----

// add, sub, mul, div (each rounded to nearest once); max and min are Rust's f32::max / f32::min
// (a NaN operand gives the other).
#define KLEIN_QUANTIZE_BINARY(name, op)                    \
  __device__ __forceinline__ float name(float a, float b) { \
    float r;                                               \
    asm(op " %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));     \
    return r;                                              \
  }
KLEIN_QUANTIZE_BINARY(add, "add.rn.f32")
KLEIN_QUANTIZE_BINARY(sub, "sub.rn.f32")
KLEIN_QUANTIZE_BINARY(mul, "mul.rn.f32")
KLEIN_QUANTIZE_BINARY(div, "div.rn.f32")
KLEIN_QUANTIZE_BINARY(fmax_, "max.f32")
KLEIN_QUANTIZE_BINARY(fmin_, "min.f32")
#undef KLEIN_QUANTIZE_BINARY

#define KLEIN_QUANTIZE_COMPARE(name, op)                                                      \
  __device__ __forceinline__ bool name(float a, float b) {                                    \
    uint32_t r;                                                                               \
    asm("{\n\t.reg .pred p;\n\tsetp." op ".f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"      \
        : "=r"(r)                                                                             \
        : "f"(a), "f"(b));                                                                    \
    return r != 0;                                                                            \
  }
KLEIN_QUANTIZE_COMPARE(lt, "lt")
KLEIN_QUANTIZE_COMPARE(le, "le")
KLEIN_QUANTIZE_COMPARE(eq, "eq")
#undef KLEIN_QUANTIZE_COMPARE

__device__ __forceinline__ bool gt(float a, float b) { return lt(b, a); }

__device__ __forceinline__ float abs_(float x) {
  return __int_as_float(__float_as_int(x) & 0x7fffffff);
}

__device__ __forceinline__ float neg(float x) {
  return __int_as_float(__float_as_int(x) ^ 0x80000000);
}

// Rust's f32::round: half away from zero. x − trunc(x) is exact.
__device__ __forceinline__ float round_(float x) {
  float t;
  asm("cvt.rzi.f32.f32 %0, %1;" : "=f"(t) : "f"(x));
  if (!lt(abs_(sub(x, t)), 0.5f)) {
    t = add(t, __int_as_float((__float_as_int(x) & 0x80000000) | 0x3f800000));
  }
  return t;
}

// Rust's `x as i32`: toward zero, saturating, NaN to 0 (PTX's conversion does exactly this).
__device__ __forceinline__ int to_i32(float x) {
  int r;
  asm("cvt.rzi.s32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// The block-32 quantizers' `if d != 0 { 1 / d } else { 0 }`.
__device__ __forceinline__ float inverse_or_zero(float d) {
  return !eq(d, 0.0f) ? div(1.0f, d) : 0.0f;
}

// candle's nearest_int: `x.round() as i32`.
__device__ __forceinline__ int nearest_int(float x) { return to_i32(round_(x)); }

__device__ __forceinline__ int clamp(int v, int lo, int hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Rust's `x as u8` / `x as i8`: toward zero, saturating to the type, NaN to 0.
__device__ __forceinline__ uint8_t to_u8(float x) { return (uint8_t)clamp(to_i32(x), 0, 255); }
__device__ __forceinline__ int8_t to_i8(float x) { return (int8_t)clamp(to_i32(x), -128, 127); }

// f32 to f16, nearest even (the half crate's `f16::from_f32`); back with half_bits (exact).
__device__ __forceinline__ __half_raw to_f16(float x) { return __half_raw(__float2half_rn(x)); }

__device__ __forceinline__ float load(const float* x, long long i) { return x[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* x, long long i) {
  return __uint_as_float((uint32_t)__bfloat16_as_ushort(x[i]) << 16);
}
__device__ __forceinline__ float load(const __half* x, long long i) { return __half2float(x[i]); }

// f32's total order (Rust's `total_cmp`) as a signed integer key.
__device__ __forceinline__ int total_key(float x) {
  int b = __float_as_int(x);
  return b ^ (int)((uint32_t)(b >> 31) >> 1);
}

// ---- Q8_0 (the block layouts are in ggml_blocks.cuh) ----

template <typename T>
__device__ void quantize_q8_0(const T* x, BlockQ8_0* y) {
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) amax = fmax_(amax, abs_(load(x, i)));
  const float d = div(amax, 127.0f);
  const float id = inverse_or_zero(d);
  BlockQ8_0 b;
  b.d = to_f16(d);
  for (int i = 0; i < 32; ++i) b.qs[i] = to_i8(round_(mul(load(x, i), id)));
  *y = b;
}

// ---- Q4_0 ----

template <typename T>
__device__ void quantize_q4_0(const T* x, BlockQ4_0* y) {
  float amax = 0.0f, max = 0.0f;
  for (int i = 0; i < 32; ++i) {
    const float v = load(x, i);
    if (lt(amax, abs_(v))) {
      amax = abs_(v);
      max = v;
    }
  }
  const float d = div(max, -8.0f);
  const float id = inverse_or_zero(d);
  BlockQ4_0 b;
  b.d = to_f16(d);
  for (int j = 0; j < 16; ++j) {
    const uint8_t q0 = min(15, (int)to_u8(add(mul(load(x, j), id), 8.5f)));
    const uint8_t q1 = min(15, (int)to_u8(add(mul(load(x, 16 + j), id), 8.5f)));
    b.qs[j] = q0 | (q1 << 4);
  }
  *y = b;
}

// ---- Q4_1 ----

template <typename T>
__device__ void quantize_q4_1(const T* x, BlockQ4_1* y) {
  float lo = __int_as_float(0x7f800000), hi = __int_as_float(0xff800000);
  for (int i = 0; i < 32; ++i) {
    lo = fmin_(load(x, i), lo);
    hi = fmax_(load(x, i), hi);
  }
  const float d = div(sub(hi, lo), 15.0f);
  const float id = inverse_or_zero(d);
  BlockQ4_1 b;
  b.d = to_f16(d);
  b.m = to_f16(lo);
  for (int j = 0; j < 16; ++j) {
    const uint8_t q0 = min(15, (int)to_u8(add(mul(sub(load(x, j), lo), id), 0.5f)));
    const uint8_t q1 = min(15, (int)to_u8(add(mul(sub(load(x, 16 + j), lo), id), 0.5f)));
    b.qs[j] = q0 | (q1 << 4);
  }
  *y = b;
}

// ---- Q4_K ----

// candle's make_qkx1_quants(15, 5, x) over one sub-block of 32: (scale, −min).
template <typename T>
__device__ void make_qkx1_quants(const T* x, float* scale_out, float* min_out) {
  float v[32];
  for (int i = 0; i < 32; ++i) v[i] = load(x, i);
  // min_by / max_by over total_cmp: equal keys are equal bits, so which one is taken is moot.
  float lo = v[0], hi = v[0];
  for (int i = 1; i < 32; ++i) {
    if (total_key(v[i]) < total_key(lo)) lo = v[i];
    if (total_key(v[i]) >= total_key(hi)) hi = v[i];
  }
  if (eq(hi, lo)) {
    *scale_out = 0.0f;
    *min_out = 0.0f;
    return;
  }
  float min = fmin_(lo, 0.0f);
  float iscale = div(15.0f, sub(hi, min));
  float scale = div(1.0f, iscale);
  uint8_t l[32];
  for (int i = 0; i < 32; ++i) l[i] = 0;
  for (int iter = 0; iter < 5; ++iter) {
    float sumlx = 0.0f;
    int suml2 = 0;
    bool changed = false;
    for (int i = 0; i < 32; ++i) {
      const int li = clamp(nearest_int(mul(iscale, sub(v[i], min))), 0, 15);
      if ((uint8_t)li != l[i]) {
        l[i] = (uint8_t)li;
        changed = true;
      }
      sumlx = add(sumlx, mul(sub(v[i], min), (float)li));
      suml2 += li * li;
    }
    scale = div(sumlx, (float)suml2);
    float sum = -0.0f;  // Rust's f32 `sum` starts from −0
    for (int i = 0; i < 32; ++i) sum = add(sum, sub(v[i], mul(scale, (float)l[i])));
    min = div(sum, 32.0f);
    if (gt(min, 0.0f)) min = 0.0f;
    iscale = div(1.0f, scale);
    if (!changed) break;
  }
  *scale_out = scale;
  *min_out = neg(min);
}

template <typename T>
__device__ void quantize_q4k(const T* x, BlockQ4K* y) {
  float scales[8], mins[8];
  for (int j = 0; j < 8; ++j) make_qkx1_quants(x + 32 * j, &scales[j], &mins[j]);
  float max_scale = 0.0f, max_min = 0.0f;
  for (int j = 0; j < 8; ++j) {
    max_scale = fmax_(scales[j], max_scale);
    max_min = fmax_(mins[j], max_min);
  }
  const float inv_scale = gt(max_scale, 0.0f) ? div(63.0f, max_scale) : 0.0f;
  const float inv_min = gt(max_min, 0.0f) ? div(63.0f, max_min) : 0.0f;
  BlockQ4K b;
  for (int j = 0; j < 12; ++j) b.scales[j] = 0;
  for (int j = 0; j < 8; ++j) {
    // `nearest_int(..).min(63) as u8`: the cast keeps the low byte.
    const uint8_t ls = (uint8_t)min(nearest_int(mul(inv_scale, scales[j])), 63);
    const uint8_t lm = (uint8_t)min(nearest_int(mul(inv_min, mins[j])), 63);
    if (j < 4) {
      b.scales[j] = ls;
      b.scales[j + 4] = lm;
    } else {
      b.scales[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
      b.scales[j - 4] |= (ls >> 4) << 6;
      b.scales[j] |= (lm >> 4) << 6;
    }
  }
  b.d = to_f16(div(max_scale, 63.0f));
  b.dmin = to_f16(div(max_min, 63.0f));
  const float d_all = half_bits(b.d), dmin_all = half_bits(b.dmin);
  // Sub-blocks 2p and 2p + 1 share bytes 32p..32p+31: low and high nibbles.
  for (int p = 0; p < 4; ++p) {
    uint8_t q[2][32];
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * p + h;
      uint8_t sc, m;
      if (j < 4) {
        sc = b.scales[j] & 63;
        m = b.scales[j + 4] & 63;
      } else {
        sc = (b.scales[j + 4] & 0xF) | ((b.scales[j - 4] >> 6) << 4);
        m = (b.scales[j + 4] >> 4) | ((b.scales[j] >> 6) << 4);
      }
      const float d = mul(d_all, (float)sc);
      const float dm = mul(dmin_all, (float)m);
      for (int i = 0; i < 32; ++i) {
        q[h][i] = !eq(d, 0.0f)
                      ? (uint8_t)clamp(nearest_int(div(add(load(x, 32 * j + i), dm), d)), 0, 15)
                      : 0;
      }
    }
    for (int i = 0; i < 32; ++i) b.qs[32 * p + i] = q[0][i] | (q[1][i] << 4);
  }
  *y = b;
}

// ---- Q6_K ----

// candle's make_qx_quants(16, 32, x, ls, rmse_type 1, no weights): the group's scale, its
// levels (0..63) in ls.
template <typename T>
__device__ float make_qx_quants(const T* xp, int8_t* ls) {
  constexpr int nmax = 32;
  float x[16];
  for (int i = 0; i < 16; ++i) x[i] = load(xp, i);
  float max = 0.0f, amax = 0.0f;
  for (int i = 0; i < 16; ++i) {
    const float ax = abs_(x[i]);
    if (gt(ax, amax)) {
      amax = ax;
      max = x[i];
    }
  }
  if (eq(amax, 0.0f)) {
    for (int i = 0; i < 16; ++i) ls[i] = 0;
    return 0.0f;
  }
  float iscale = div(-(float)nmax, max);
  float sumlx = 0.0f, suml2 = 0.0f;
  for (int i = 0; i < 16; ++i) {
    const int l = clamp(nearest_int(mul(iscale, x[i])), -nmax, nmax - 1);
    ls[i] = (int8_t)(l + nmax);
    const float w = mul(x[i], x[i]);
    const float lf = (float)l;
    sumlx = add(sumlx, mul(mul(w, x[i]), lf));
    suml2 = add(suml2, mul(mul(w, lf), lf));
  }
  float scale = div(sumlx, suml2);
  float best = mul(scale, sumlx);
  for (int itry = 0; itry < 3; ++itry) {
    iscale = div(1.0f, scale);
    float slx = 0.0f, sl2 = 0.0f;
    bool changed = false;
    for (int i = 0; i < 16; ++i) {
      const int l = clamp(nearest_int(mul(iscale, x[i])), -nmax, nmax - 1);
      if (l + nmax != ls[i]) changed = true;
      const float w = mul(x[i], x[i]);
      const float lf = (float)l;
      slx = add(slx, mul(mul(w, x[i]), lf));
      sl2 = add(sl2, mul(mul(w, lf), lf));
    }
    if (!changed || eq(sl2, 0.0f) || le(mul(slx, slx), mul(best, sl2))) break;
    for (int i = 0; i < 16; ++i) {
      ls[i] = (int8_t)(nmax + clamp(nearest_int(mul(iscale, x[i])), -nmax, nmax - 1));
    }
    sumlx = slx;
    suml2 = sl2;
    scale = div(sumlx, suml2);
    best = mul(scale, sumlx);
  }
  for (int itry = 0; itry < 5; ++itry) {
    int n_changed = 0;
    for (int i = 0; i < 16; ++i) {
      const float w = mul(x[i], x[i]);
      const int l = ls[i] - nmax;
      float slx = sub(sumlx, mul(mul(w, x[i]), (float)l));
      if (gt(slx, 0.0f)) {
        float sl2 = sub(suml2, mul(mul(w, (float)l), (float)l));
        const int new_l = clamp(nearest_int(div(mul(x[i], sl2), slx)), -nmax, nmax - 1);
        if (new_l != l) {
          slx = add(slx, mul(mul(w, x[i]), (float)new_l));
          sl2 = add(sl2, mul(mul(w, (float)new_l), (float)new_l));
          if (gt(sl2, 0.0f) && gt(mul(mul(slx, slx), suml2), mul(mul(sumlx, sumlx), sl2))) {
            ls[i] = (int8_t)(nmax + new_l);
            sumlx = slx;
            suml2 = sl2;
            scale = div(sumlx, suml2);
            best = mul(scale, sumlx);
            ++n_changed;
          }
        }
      }
    }
    if (n_changed == 0) break;
  }
  return scale;
}

template <typename T>
__device__ void quantize_q6k(const T* x, BlockQ6K* y) {
  int8_t l[256];
  float scales[16];
  float max_scale = 0.0f, max_abs_scale = 0.0f;
  for (int ib = 0; ib < 16; ++ib) {
    const float scale = make_qx_quants(x + 16 * ib, l + 16 * ib);
    scales[ib] = scale;
    if (gt(abs_(scale), max_abs_scale)) {
      max_abs_scale = abs_(scale);
      max_scale = scale;
    }
  }
  const float iscale = div(-128.0f, max_scale);
  BlockQ6K b;
  b.d = to_f16(div(1.0f, iscale));
  // `nearest_int(..).min(127) as i8`: the cast keeps the low byte.
  for (int j = 0; j < 16; ++j) b.scales[j] = (int8_t)min(nearest_int(mul(iscale, scales[j])), 127);
  const float d_all = half_bits(b.d);
  for (int j = 0; j < 16; ++j) {
    const float d = mul(d_all, (float)b.scales[j]);
    if (eq(d, 0.0f)) continue;
    for (int i = 0; i < 16; ++i) {
      l[16 * j + i] = (int8_t)(clamp(nearest_int(div(load(x, 16 * j + i), d)), -32, 31) + 32);
    }
  }
  for (int h = 0; h < 2; ++h) {
    const int8_t* lh = l + 128 * h;
    for (int i = 0; i < 32; ++i) {
      b.ql[64 * h + i] = (uint8_t)((lh[i] & 0xF) | ((lh[i + 64] & 0xF) << 4));
      b.ql[64 * h + i + 32] = (uint8_t)((lh[i + 32] & 0xF) | ((lh[i + 96] & 0xF) << 4));
      b.qh[32 * h + i] = (uint8_t)((lh[i] >> 4) | ((lh[i + 32] >> 4) << 2) |
                                   ((lh[i + 64] >> 4) << 4) | ((lh[i + 96] >> 4) << 6));
    }
  }
  *y = b;
}

}  // namespace

// x: n_blocks · block-size weights of a contiguous (rows, width) tensor whose rows are whole
// blocks; out: its n_blocks ggml blocks in order.
#define KLEIN_QUANTIZE(format, block, weights, type, suffix)                                    \
  extern "C" __global__ void quantize_##format##_##suffix(const type* __restrict__ x,            \
                                                          block* __restrict__ out,               \
                                                          long long n_blocks) {                  \
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;                       \
    if (i < n_blocks) quantize_##format(x + i * weights, out + i);                              \
  }
#define KLEIN_QUANTIZE_TYPES(format, block, weights)             \
  KLEIN_QUANTIZE(format, block, weights, float, f32)             \
  KLEIN_QUANTIZE(format, block, weights, __nv_bfloat16, bf16)    \
  KLEIN_QUANTIZE(format, block, weights, __half, f16)

KLEIN_QUANTIZE_TYPES(q8_0, BlockQ8_0, 32)
KLEIN_QUANTIZE_TYPES(q4_0, BlockQ4_0, 32)
KLEIN_QUANTIZE_TYPES(q4_1, BlockQ4_1, 32)
KLEIN_QUANTIZE_TYPES(q4k, BlockQ4K, 256)
KLEIN_QUANTIZE_TYPES(q6k, BlockQ6K, 256)
