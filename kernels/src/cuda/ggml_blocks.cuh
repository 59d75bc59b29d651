// ggml's block formats as candle and llama.cpp lay them out (block_q4_0 ... block_q6_K): what
// dequantize.cu reads and quantize.cu writes.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

// Q4_0 (block_q4_0): 32 weights; low nibbles are weights 0..15, high nibbles 16..31.
// Weight = d · (q − 8).
struct BlockQ4_0 {
  __half_raw d;
  uint8_t qs[16];
};
static_assert(sizeof(BlockQ4_0) == 18, "block_q4_0 is 18 bytes");

// Q4_1 (block_q4_1): as Q4_0 with a min. Weight = d · q + m.
struct BlockQ4_1 {
  __half_raw d;
  __half_raw m;
  uint8_t qs[16];
};
static_assert(sizeof(BlockQ4_1) == 20, "block_q4_1 is 20 bytes");

// Q5_0 (block_q5_0): as Q4_0 with a fifth bit per weight, bit j of qh for weight j.
// Weight = d · (q − 16).
struct BlockQ5_0 {
  __half_raw d;
  uint8_t qh[4];
  uint8_t qs[16];
};
static_assert(sizeof(BlockQ5_0) == 22, "block_q5_0 is 22 bytes");

// Q5_1 (block_q5_1): as Q5_0 with a min. Weight = d · q + m.
struct BlockQ5_1 {
  __half_raw d;
  __half_raw m;
  uint8_t qh[4];
  uint8_t qs[16];
};
static_assert(sizeof(BlockQ5_1) == 24, "block_q5_1 is 24 bytes");

// Q8_0 (block_q8_0): 32 signed bytes. Weight = d · q.
struct BlockQ8_0 {
  __half_raw d;
  int8_t qs[32];
};
static_assert(sizeof(BlockQ8_0) == 34, "block_q8_0 is 34 bytes");

// Q4_K super-block (block_q4_K): 256 weights as 8 sub-blocks of 32 with 6-bit scales and mins;
// byte l of qs[32g..] holds weight 64g + l (low nibble) and 64g + 32 + l (high nibble).
// Weight = d · scale · q − dmin · min.
struct BlockQ4K {
  __half_raw d;
  __half_raw dmin;
  uint8_t scales[12];
  uint8_t qs[128];
};
static_assert(sizeof(BlockQ4K) == 144, "block_q4_K is 144 bytes");

// Q5_K super-block (block_q5_K): Q4_K's layout with a fifth bit per weight: bit 2g of qh[l] for
// weight 64g + l, bit 2g + 1 for weight 64g + 32 + l.
struct BlockQ5K {
  __half_raw d;
  __half_raw dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
static_assert(sizeof(BlockQ5K) == 176, "block_q5_K is 176 bytes");

// Q6_K super-block (block_q6_K): 256 weights as two halves of 128, 16 sub-blocks of 16 with
// signed 8-bit scales. In half h, for l in 0..32: ql[64h + l] holds weights 128h + l (low
// nibble) and 128h + 64 + l (high nibble), ql[64h + 32 + l] weights 128h + 32 + l and
// 128h + 96 + l; bits 0-1, 2-3, 4-5, 6-7 of qh[32h + l] are the top two bits of weights
// 128h + l, + 32, + 64, + 96. Weight = d · scale · (q − 32).
struct BlockQ6K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  __half_raw d;
};
static_assert(sizeof(BlockQ6K) == 210, "block_q6_K is 210 bytes");

__device__ __forceinline__ float half_bits(__half_raw h) { return __half2float(__half(h)); }

}  // namespace
