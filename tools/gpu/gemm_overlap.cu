// Would the double blocks' text stream gain from a second CUDA stream? The text rows' products
// (512 rows) fill their last wave of tiles poorly; between two joint attentions they depend on
// nothing of the image stream's. This probe runs five double blocks' products (heuristic's first
// algorithm, bf16, f32 accumulation), each block behind an attention-sized stand-in product:
//   serial      everything on one stream, in the model's order;
//   overlapped  the text products on a second stream, forked after the stand-in and joined
//               before the next one, so they run beside the image products.
// Both run round-robin in ~50 ms turns after ~2 s of heat; prints the median ms per five blocks.
// It measured 0.38–0.51 ms less overlapped (H100, twenty-second session), but its short run held
// the card below its power cap much of the time; in the whole step at the cap the side stream
// gained ~0.1 ms, within the rounds' spread (docs/performance.md), and was not kept.
// Built by tools/gpu/build.sh; run by tools/gpu/device.sh gemm-overlap.
#include <algorithm>
#include <cstdio>
#include <vector>

#include "lt_gemm.cuh"

const size_t kWorkspace = 32u << 20;

// A product with its own random W and the heuristic's first choice.
struct Gemm {
  LtGemm lt;
  __nv_bfloat16* w;
};

int make(cublasLtHandle_t lt, int tokens, int in, int out, unsigned seed, Gemm* g) {
  const size_t n = (size_t)in * out;
  CHECK(cudaMalloc(&g->w, n * 2));
  fill_normal<<<(n + 255) / 256, 256>>>(g->w, n, seed, 0.02f);
  return lt_plan(lt, kWorkspace, tokens, in, out, &g->lt);
}

struct Lane {
  cudaStream_t stream;
  void* ws;
  __nv_bfloat16 *x, *y;
};

void run(cublasLtHandle_t lt, const Gemm& g, const Lane& l) {
  lt_run(lt, g.lt, g.w, l.x, l.y, l.ws, kWorkspace, l.stream);
}

int main() {
  const int img = 4096, txt = 512, s = img + txt, d = 3072, f = 9216;
  cublasLtHandle_t lt;
  CHECK(cublasLtCreate(&lt));
  // Per stream: the image (or text) to_qkv, to_out, ff linear_in, ff linear_out.
  Gemm gi[4], gt[4], attention;
  const int shapes[4][2] = {{d, 3 * d}, {d, d}, {d, 2 * f}, {f, d}};
  for (int k = 0; k < 4; k++) {
    CHECK(make(lt, img, shapes[k][0], shapes[k][1], 10 + k, &gi[k]));
    CHECK(make(lt, txt, shapes[k][0], shapes[k][1], 20 + k, &gt[k]));
  }
  // The joint attention's stand-in: ~0.5 ms of products over all S rows.
  CHECK(make(lt, s, d, 4 * d, 30, &attention));
  Lane main_lane, side_lane;
  for (Lane* l : {&main_lane, &side_lane}) {
    CHECK(cudaStreamCreateWithFlags(&l->stream, cudaStreamNonBlocking));
    CHECK(cudaMalloc(&l->ws, kWorkspace));
    const size_t nx = (size_t)s * f, ny = (size_t)s * 2 * f;
    CHECK(cudaMalloc(&l->x, nx * 2));
    CHECK(cudaMalloc(&l->y, ny * 2));
    fill_normal<<<(nx + 255) / 256, 256>>>(l->x, nx, 40, 1.f);
  }
  CHECK(cudaDeviceSynchronize());
  cudaEvent_t forked[5], joined[5], start, stop;
  for (int i = 0; i < 5; i++) {
    cudaEventCreateWithFlags(&forked[i], cudaEventDisableTiming);
    cudaEventCreateWithFlags(&joined[i], cudaEventDisableTiming);
  }
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  // Model order after each attention: to_out (img, txt), ff (img), ff (txt), next to_qkv (txt,
  // img). Overlapped: the text's four on the side stream.
  auto blocks = [&](bool overlapped) {
    for (int i = 0; i < 5; i++) {
      run(lt, attention, main_lane);
      if (!overlapped) {
        for (int k : {1, 2, 3}) run(lt, gi[k], main_lane);
        for (int k : {1, 2, 3, 0}) run(lt, gt[k], main_lane);
        run(lt, gi[0], main_lane);
        continue;
      }
      cudaEventRecord(forked[i], main_lane.stream);
      cudaStreamWaitEvent(side_lane.stream, forked[i]);
      for (int k : {1, 2, 3, 0}) run(lt, gt[k], side_lane);
      cudaEventRecord(joined[i], side_lane.stream);
      for (int k : {1, 2, 3, 0}) run(lt, gi[k], main_lane);
      cudaStreamWaitEvent(main_lane.stream, joined[i]);
    }
  };
  auto turn = [&](bool overlapped, int reps) {
    cudaEventRecord(start, main_lane.stream);
    for (int r = 0; r < reps; r++) blocks(overlapped);
    cudaEventRecord(stop, main_lane.stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    return ms / reps;
  };
  // Heat: ~2 s at the power cap; then seven rounds of ~50 ms turns each.
  const float once = turn(false, 4);
  turn(false, std::max(1, (int)(2000.f / once)));
  const int reps = std::max(4, (int)(50.f / once));
  std::vector<float> serial, overlapped;
  for (int r = 0; r < 7; r++) {
    serial.push_back(turn(false, reps));
    overlapped.push_back(turn(true, reps));
  }
  CHECK(cudaDeviceSynchronize());
  std::sort(serial.begin(), serial.end());
  std::sort(overlapped.begin(), overlapped.end());
  std::printf("five double blocks' products + stand-ins, %d turns of %d:\n", 7, reps);
  std::printf("  serial     median %.4f ms (min %.4f max %.4f)\n", serial[3], serial[0], serial[6]);
  std::printf("  overlapped median %.4f ms (min %.4f max %.4f)\n", overlapped[3], overlapped[0],
              overlapped[6]);
  std::printf("  difference %.4f ms a step\n", serial[3] - overlapped[3]);
  // One block's text products alone on one stream, back to back, for their share.
  cudaEventRecord(start, main_lane.stream);
  for (int r = 0; r < 200; r++)
    for (int k = 0; k < 4; k++) run(lt, gt[k], main_lane);
  cudaEventRecord(stop, main_lane.stream);
  CHECK(cudaEventSynchronize(stop));
  float alone = 0;
  cudaEventElapsedTime(&alone, start, stop);
  std::printf("  one block's text products alone (back to back): %.4f ms\n", alone / 200);
  return 0;
}
