#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there): unpacks tools/gpu/bin/*.xz and the test archives
# tools/gpu/bin-tests/tests-*.tar.xz (whichever the call carried) into /tmp/klein, points
# the loader at the CUDA 13 libraries of the machine's Python packages, then runs a step:
#   tools/gpu/device.sh parity OUT    the CUDA suites of the test archives carried
#                                     (full output → OUT/parity.log)
#   tools/gpu/device.sh kernels OUT    klein-bench kernels: each fused kernel vs its composition
#                                     → OUT/kernels.json
#   tools/gpu/device.sh components OUT klein-bench components on cuda:0 → OUT/components.json
#   tools/gpu/device.sh diffusers OUT  the same cases with diffusers 0.42.1 (wheels carried in
#                                     .whl/) → OUT/diffusers.json, then the comparison table
#                                     (DIFFUSERS_ARGS="--only text_encoder" for a subset,
#                                     "--compile" adds the transformer through torch.compile)
#   tools/gpu/device.sh stack OUT     the services as separate processes on one GPU, timing
#                                     1024² T2I through the gateway, per-process peak memory
#   tools/gpu/device.sh serve OUT     the one-process stack (`klein serve --device cuda`, the
#                                     klein-cuda binary) on a random klein-4B: 1024² T2I and I2I
#   tools/gpu/device.sh gemm-power OUT the bf16 matmul rate in short bursts and sustained for ~3 s,
#                                     with the SM clock, power and throttle reasons sampled
#                                     every 250 ms → OUT/gemm-power-smi.csv
#   tools/gpu/device.sh gemm-algos OUT cuBLASLt's candidate algorithms for each of the step's
#                                     GEMM shapes, timed round-robin at the power cap, with
#                                     the clock and power sampled → OUT/gemm-algos-smi.csv
#   tools/gpu/device.sh gemm-search OUT every configuration cuBLASLt accepts for the large shapes
#                                     (no split-K), screened, the fastest timed as above
#                                     → OUT/gemm-search-smi.csv
#   tools/gpu/device.sh gemm-sm90 OUT  klein's own Hopper GEMM (tools/gpu/gemm_sm90.cuh) against
#                                     cuBLASLt on the step's shapes at the power cap, outputs
#                                     checked → OUT/gemm-sm90-smi.csv
#   tools/gpu/device.sh gemm-overlap OUT five double blocks' products with the text stream's on
#                                     one stream or on a second one beside the image's
#                                     → OUT/gemm-overlap-smi.csv
#   tools/gpu/device.sh l2-rate OUT   the SMs' read rate from L2-resident buffers
#                                     → OUT/l2-rate-smi.csv
#   tools/gpu/device.sh clusters OUT  how many clusters of 1, 2, 4 persistent blocks (the
#                                     attention's and the GEMM probe's shapes) stay resident
#   tools/gpu/device.sh trace OUT     the 1024² step's timeline (tools/gpu/kernel_trace.c, CUPTI):
#                                     idle time between kernels, per step and its head
#                                     → OUT/trace.csv (KLEIN_TRACE_API=1 adds the driver calls)
#   tools/gpu/device.sh vae-algos OUT  VAE f32 encode / decode at 512², 768², 1024² under each
#                                     cuDNN algorithm setting (exact f32) → OUT/vae-<algo>.json
set -euo pipefail
cd "$(dirname "$0")/../.."
NV=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__file__))" 2>/dev/null || true)
if [ -n "$NV" ]; then
  LD_LIBRARY_PATH=$(ls -d "$NV"/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}
  export LD_LIBRARY_PATH
fi
mkdir -p /tmp/klein
# UNPACK=0 keeps /tmp/klein as it is: an A/B script that copies one of two builds into place
# between steps must set it, or every step would unpack the tree's .xz files (which a warm
# machine keeps from earlier calls) over its choice.
# unxz SRC DST: the machine has Python but not always xz.
unxz() { python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$1" "$2"; }
for f in tools/gpu/bin/*.xz tools/gpu/bin-tests/*.xz; do
  [ -f "$f" ] && [ "${UNPACK:-1}" != 0 ] || continue
  # Always from what this call carried: a warm machine may hold an older build.
  case "$f" in
    *.tar.xz) unxz "$f" /tmp/klein.tar && tar xf /tmp/klein.tar -C /tmp/klein && rm /tmp/klein.tar ;;
    *) b=/tmp/klein/$(basename "$f" .xz); unxz "$f" "$b.new" && chmod +x "$b.new" && mv -f "$b.new" "$b" ;;
  esac
done
export KLEIN_FIXTURES_DIR=$PWD/tests/fixtures KLEIN_TEST_DEVICE=cuda:0
# Runs the command "${@:2}" while nvidia-smi samples the SM clock, power and throttle reasons
# into $1 every 250 ms, then counts the samples.
sampled() {
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,power.limit,clocks_throttle_reasons.active \
    --format=csv -lms 250 > "$1" &
  local smi=$!
  "${@:2}"
  kill $smi
  echo "SM clock, power (W), throttle reasons while it ran:"
  tail -n +2 "$1" | cut -d, -f2,3,5 | sort | uniq -c | sort -rn | head -12
}
case "${1:-}" in
  parity)
    # No NVIDIA_TF32_OVERRIDE: the VAE's convolutions set their math type per call (split TF32
    # by default, which needs the tensor cores; exact FMA), cuBLAS f32 stays exact.
    rc=0; log=${2:-/tmp}/parity.log; : > "$log"
    # PARITY_TESTS: space-separated names (test-<crate>-<test>) to run instead of all unpacked.
    tests=/tmp/klein/test-*
    [ -n "${PARITY_TESTS:-}" ] && tests=$(for n in $PARITY_TESTS; do echo "/tmp/klein/$n"; done)
    for t in $tests; do
      echo "== $(basename "$t")" | tee -a "$log"
      "$t" --test-threads=1 --nocapture >> "$log" 2>&1 || { rc=1; echo "FAILED: $(basename "$t")"; }
      grep -E "^test result" "$log" | tail -1
    done
    exit $rc ;;
  kernels)
    /tmp/klein/klein-bench --device cuda:0 kernels --json "${2:-/tmp}/kernels.json" ;;
  components)
    /tmp/klein/klein-bench --device cuda:0 components --json "${2:-/tmp}/components.json"
    echo "VAE f32 at each convolution precision (split-tf32 is vae-svc's default):"
    /tmp/klein/klein-bench --device cuda:0 components --only vae --vae-dtypes f32 \
      --vae-conv-precision exact,tf32,split-tf32 --json "${2:-/tmp}/components-vae-precision.json" ;;
  diffusers)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 tools/reference/bench_diffusers.py "${2:-/tmp}/diffusers.json" ${DIFFUSERS_ARGS:-}
    [ -f "${2:-/tmp}/components.json" ] && python3 tools/gpu/compare.py "${2:-/tmp}/components.json" "${2:-/tmp}/diffusers.json" ;;
  stack)
    exec bash tools/gpu/stack.sh "${2:-/tmp}" ;;
  serve)
    M=/tmp/klein4b B=/tmp/klein
    [ -f $M/model_index.json ] || $B/klein-bench --device cuda:0 write-pipeline $M
    $B/klein-cuda serve --device cuda --model-dir $M > "${2:-/tmp}/serve.log" 2>&1 &
    pid=$!
    for i in $(seq 1 300); do $B/klein-cuda generate ready --width 64 --height 64 -o /tmp/r.png >/dev/null 2>&1 && break; sleep 1; done
    echo "klein serve up after ${i}s"
    python3 -c "from PIL import Image; Image.new('RGB', (1024, 1024), (90, 140, 200)).save('/tmp/init.png')"
    for args in "generate a-cat --width 1024 --height 1024 --seed 1" "generate a-cat --width 1024 --height 1024 --seed 2" \
                "edit a-cat --image /tmp/init.png --strength 0.75 --width 1024 --height 1024"; do
      t0=$(date +%s.%N); $B/klein-cuda $args -o /tmp/out.png > /tmp/run.log 2>&1 && r=ok || r=FAILED
      echo "$r $args: $(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$t0" "$(date +%s.%N)") s"
    done
    echo "process peak (nvidia-smi now): $(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)"
    kill $pid; wait 2>/dev/null; grep -E "ERROR|WARN" "${2:-/tmp}/serve.log" | tail -5 ;;
  trace)
    CUDA_INJECTION64_PATH=/tmp/klein/libkernel_trace.so KLEIN_TRACE_OUT="${2:-/tmp}/trace.csv" \
      /tmp/klein/klein-bench --device cuda:0 components --only transformer --sizes 1024 \
      --batches 1 --iters 10
    python3 tools/gpu/trace_gaps.py "${2:-/tmp}/trace.csv" ;;
  gemm-power | gemm-algos | gemm-overlap | l2-rate)
    sampled "${2:-/tmp}/$1-smi.csv" "/tmp/klein/$1" ;;
  gemm-search)
    sampled "${2:-/tmp}/$1-smi.csv" /tmp/klein/gemm-algos search ;;
  clusters)
    /tmp/klein/clusters ;;
  gemm-sm90)
    sampled "${2:-/tmp}/$1-smi.csv" timeout 300 /tmp/klein/gemm-sm90 ;;
  vae-algos)
    for algo in implicit-precomp-gemm auto implicit-gemm; do
      /tmp/klein/klein-bench --device cuda:0 components --only vae \
        --sizes 512,768,1024 --vae-dtypes f32 --iters 3 --vae-conv-algorithm "$algo" \
        --json "${2:-/tmp}/vae-$algo.json"
    done ;;
  *) echo "usage: $0 parity|kernels|components|diffusers|stack|serve|gemm-power|gemm-algos|gemm-search|gemm-sm90|gemm-overlap|l2-rate|clusters|vae-algos [OUT]" >&2; exit 64 ;;
esac
