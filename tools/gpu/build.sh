#!/usr/bin/env bash
# Builds the CUDA release binaries on this (GPU-less) machine and packs them, stripped and
# xz-compressed, into tools/gpu/bin/ (git-ignored) for the GPU machine:
#   klein-bench, encoder-svc, denoiser-svc, vae-svc, gateway, klein, and the CUDA parity test
#   binaries of the three services.
# Usage: tools/gpu/build.sh            (CUDNN=1 adds candle's cudnn feature)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo fetch --locked
# shellcheck source=/dev/null
source tools/gpu/cuda-env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
features=cuda
[ "${CUDNN:-0}" = 1 ] && features="cuda,cudnn"
out=tools/gpu/bin
mkdir -p "$out"
cargo build --release --locked --features "$features" -p klein-bench -p encoder-svc -p denoiser-svc -p vae-svc -p gateway
for bin in klein-bench encoder-svc denoiser-svc vae-svc gateway klein; do
  strip -o "/tmp/$bin" "$CARGO_TARGET_DIR/release/$bin"
  xz -T2 -6 -c "/tmp/$bin" > "$out/$bin.xz"
done
# Parity suites: test executables of the three services, named <crate>-<test>.
cargo test --release --locked --features "$features" -p encoder-svc -p denoiser-svc -p vae-svc --no-run \
  --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["package_id"].split("#")[-1].split("@")[0].split("/")[-1], m["target"]["name"], m["executable"])
' | while read -r pkg name exe; do
    strip -o "/tmp/t-$pkg-$name" "$exe"
    xz -T2 -6 -c "/tmp/t-$pkg-$name" > "$out/test-$pkg-$name.xz"
  done
ls -la "$out"
