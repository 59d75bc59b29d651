#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there): unpacks tools/gpu/bin/*.xz into /tmp/klein, points
# the loader at the CUDA 13 libraries of the machine's Python packages, then runs a step:
#   tools/gpu/device.sh parity        CUDA parity suites of the three services (+ the e2e one)
#   tools/gpu/device.sh components    klein-bench components on cuda:0
#   tools/gpu/device.sh stack OUT     the services as separate processes on one GPU, timing
#                                     1024² T2I through the gateway, per-process peak memory
set -euo pipefail
cd "$(dirname "$0")/../.."
NV=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__file__))" 2>/dev/null || true)
if [ -n "$NV" ]; then
  LD_LIBRARY_PATH=$(ls -d "$NV"/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}
  export LD_LIBRARY_PATH
fi
mkdir -p /tmp/klein
for f in tools/gpu/bin/*.xz; do
  b=/tmp/klein/$(basename "$f" .xz)
  [ -x "$b" ] || { python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$f" "$b"; chmod +x "$b"; }
done
export KLEIN_FIXTURES_DIR=$PWD/tests/fixtures KLEIN_TEST_DEVICE=cuda:0
case "${1:-}" in
  parity)
    rc=0
    for t in /tmp/klein/test-*; do
      echo "== $(basename "$t")"; "$t" --test-threads=1 2>&1 | tail -15 || rc=1
    done
    exit $rc ;;
  components)
    /tmp/klein/klein-bench --device cuda:0 components --json "${2:-/tmp}/components.json" ;;
  stack)
    exec bash tools/gpu/stack.sh "${2:-/tmp}" ;;
  *) echo "usage: $0 parity|components|stack [OUT]" >&2; exit 64 ;;
esac
