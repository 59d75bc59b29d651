#!/usr/bin/env bash
# Builds the CUDA release binaries on this (GPU-less) machine and packs them, stripped and
# xz-compressed, into tools/gpu/bin/ (git-ignored) for the GPU machine:
#   klein-bench, encoder-svc, denoiser-svc, vae-svc, gateway, klein, gemm-power, gemm-algos, gemm-sm90,
#   gemm-overlap, l2-rate, clusters; and into tools/gpu/bin-tests/tests-<crate>.tar.xz the CUDA
#   test binaries of every suite that runs on KLEIN_TEST_DEVICE (the kernels' GPU parity, the runtime's
#   graphs and uploads, the services' parity / gRPC / run / LoRA / tiling tests, the end-to-end
#   goldens, models, routing and LoRA stack tests).
# Usage: tools/gpu/build.sh            (cuDNN convolutions for the VAE; CUDNN=0 builds without)
# A baseline of another commit (a git worktree) needs a CARGO_TARGET_DIR of its own: cargo hashes
# workspace crates relative to the workspace root, so a worktree build in target/cuda replaces
# this tree's artifacts, and a later build here can take them as fresh (it did once: a
# "new" binary that ran the old attention kernel).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo fetch --locked
# shellcheck source=/dev/null
source tools/gpu/cuda-env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
features=cuda,cudnn
[ "${CUDNN:-1}" = 0 ] && features=cuda
out=tools/gpu/bin
mkdir -p "$out"
cargo build --release --locked --features "$features" -p klein-bench -p encoder-svc -p denoiser-svc -p vae-svc
for bin in klein-bench encoder-svc denoiser-svc vae-svc; do
  strip -o "/tmp/$bin" "$CARGO_TARGET_DIR/release/$bin"
  xz -T2 -6 -c "/tmp/$bin" > "$out/$bin.xz"
done
# The probes (tools/gpu/device.sh <name>), CUDA C++: probe NAME SOURCE [nvcc flags and libraries].
probe() {
  local name=$1 src=$2
  shift 2
  nvcc -std=c++17 -O2 -arch=sm_90a -cudart shared -o "/tmp/$name" "tools/gpu/$src" \
    -L"$CUDA_HOME/lib64" -L"$_klein_cuda_lib" "$@"
  xz -T2 -6 -c "/tmp/$name" > "$out/$name.xz"
}
# The bf16 matmul rate in bursts and sustained.
probe gemm-power gemm_power.cu -lcublasLt
# Which cuBLASLt algorithm runs each of the step's GEMMs fastest at the power cap.
probe gemm-algos gemm_algos.cu -lcublasLt
# Klein's own Hopper GEMM against cuBLASLt at the power cap.
probe gemm-sm90 gemm_sm90.cu --use_fast_math -lcublasLt -lcuda
# The double blocks' text products on a second stream beside the image's.
probe gemm-overlap gemm_overlap.cu -lcublasLt
# The SMs' read rate from L2.
probe l2-rate l2_rate.cu
# How many clusters of persistent blocks stay resident.
probe clusters clusters.cu
# The CUPTI timeline library (tools/gpu/device.sh trace), against the CUPTI headers of the
# nvidia-cuda-cupti wheel; the GPU machine's torch brings the library itself.
cupti=/tmp/cupti13/nvidia/cu13
[ -f "$cupti/include/cupti.h" ] || python3 -m pip install -q --target /tmp/cupti13 --no-deps \
  "nvidia-cuda-cupti==13.0.85"
gcc -shared -fPIC -O2 -I"$cupti/include" -I"$CUDA_HOME/include" tools/gpu/kernel_trace.c \
  -L"$cupti/lib" -l:libcupti.so.13 -o /tmp/libkernel_trace.so
xz -T2 -6 -c /tmp/libkernel_trace.so > "$out/libkernel_trace.so.xz"
# The gateway and the klein client run no model: CPU builds, half the size of CUDA ones.
CARGO_TARGET_DIR=target RUSTFLAGS= cargo build --release --locked -p gateway --bins
for bin in gateway klein; do
  strip -o "/tmp/$bin" "target/release/$bin"
  xz -T2 -6 -c "/tmp/$bin" > "$out/$bin.xz"
done
# Parity suites: every test that runs on KLEIN_TEST_DEVICE, stripped, named test-<crate folder>-<test>
# and packed per crate folder into a solid archive, tools/gpu/bin-tests/tests-<crate folder>.tar.xz:
# a crate's binaries share most of their code, so an archive takes 6–15 MB where one xz file
# each took 6–11 MB a binary (~120 MB for the 15 suites of before, twice the device call's
# 64 MiB carry, which the ~35 MB tree shares). A call carries the archives it needs; device.sh
# unpacks them into /tmp/klein.
tests=tools/gpu/bin-tests
staged=/tmp/klein-tests
rm -rf "$tests" "$staged"
mkdir -p "$tests" "$staged"
cargo test --release --locked --features "$features" -p klein-kernels -p klein-runtime -p encoder-svc -p denoiser-svc -p vae-svc -p klein-tests --no-run \
  --message-format=json 2>/dev/null \
  | python3 -c '
import json, os, sys
keep = {"parity", "gpu_parity", "grpc", "four_bit_t2i", "transformer_forward", "runs", "service", "gguf",
        "bfl_single_file", "tiling", "e2e_goldens", "models", "graphs", "adapters", "lora", "block_memory",
        "loading", "routing", "loras", "graph", "weights_upload"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        if m["target"]["name"] in keep:
            print(os.path.basename(os.path.dirname(m["manifest_path"])), m["target"]["name"], m["executable"])
' | while read -r pkg name exe; do
    strip -o "$staged/test-$pkg-$name" "$exe"
  done
for pkg in $(ls "$staged" | sed -E 's/^test-(.*)-[^-]+$/\1/' | sort -u); do
  (cd "$staged" && tar -cf - test-"$pkg"-*) | xz -T2 -9 --lzma2=preset=9,dict=256MiB -c > "$tests/tests-$pkg.tar.xz"
done
rm -rf "$staged"
ls -la "$out" "$tests"
