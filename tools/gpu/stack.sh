#!/usr/bin/env bash
# On the GPU machine, after device.sh unpacked the binaries: writes a random-weight klein-4B
# pipeline, starts encoder-svc, denoiser-svc, vae-svc and the gateway as separate processes on
# GPU 0 (optionally as MPS clients with pinned memory limits = their budgets), times 1024²
# T2I / I2I / inpaint through the gateway with the klein CLI, and records each process's peak
# GPU memory (nvidia-smi, sampled every 100 ms).
# Env: MPS=1 to run under MPS; ENC_MIB / DEN_MIB / VAE_MIB budgets (default 3072/9216/2048).
set -uo pipefail
OUT=${1:-/tmp}; B=/tmp/klein; M=/tmp/klein4b
ENC_MIB=${ENC_MIB:-3072}; DEN_MIB=${DEN_MIB:-9216}; VAE_MIB=${VAE_MIB:-2048}
[ -f $M/model_index.json ] || { t=$(date +%s); $B/klein-bench --device cuda:0 write-pipeline $M || exit 1; echo "wrote random pipeline in $(( $(date +%s) - t ))s"; }
if [ "${MPS:-0}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d && echo "MPS daemon started"
fi
start() { # name port budget_mib extra...
  local name=$1 port=$2 mib=$3; shift 3
  ( [ "${MPS:-0}" = 1 ] && export CUDA_MPS_PINNED_DEVICE_MEM_LIMIT="0=${mib}M"
    exec $B/$name --model-dir $M --listen 127.0.0.1:$port --device cuda:0 --gpu-memory-budget "${mib}MiB" "$@" ) \
    > "$OUT/$name${MPS:+-mps}.log" 2>&1 &
  echo $! > /tmp/$name.pid
}
start encoder-svc 50052 $ENC_MIB --dtype bf16 --quantize q4k
start denoiser-svc 50053 $DEN_MIB --dtype bf16
start vae-svc 50054 $VAE_MIB --dtype f32
$B/gateway --listen 127.0.0.1:50050 --encoder-addrs http://127.0.0.1:50052 --denoiser-addrs http://127.0.0.1:50053 \
  --vae-addrs http://127.0.0.1:50054 > "$OUT/gateway${MPS:+-mps}.log" 2>&1 &
GW=$!
( while sleep 0.1; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null; done ) > /tmp/smi.csv &
SMI=$!
for i in $(seq 1 600); do
  $B/klein generate ready --width 64 --height 64 -o /tmp/ready.png > /dev/null 2>&1 && break; sleep 1
done
echo "stack up after ${i}s"
python3 - <<'PY'
from PIL import Image
import numpy as np
x = np.linspace(0, 255, 1024, dtype=np.uint8)
img = np.stack([np.tile(x, (1024, 1)), np.tile(x[:, None], (1, 1024)), np.full((1024, 1024), 128, np.uint8)], -1)
Image.fromarray(img).save("/tmp/init.png")
m = np.zeros((1024, 1024), np.uint8); m[256:768, 256:768] = 255
Image.fromarray(m).save("/tmp/mask.png")
PY
run() {
  echo "--- $*"; local t0; t0=$(date +%s.%N)
  $B/klein "$@" 2>&1 | grep -E "wrote|warning|klein:"
  echo "client wall $(python3 -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 3))" "$t0") s"
}
run generate "a photo of a cat" --width 1024 --height 1024 --seed 1 -o /tmp/warm.png
for i in 1 2 3; do run generate "a photo of a cat" --width 1024 --height 1024 --seed $i -o /tmp/t2i.png; done
run generate "a photo of a cat, prompt cache hit" --width 1024 --height 1024 --seed 9 -o /tmp/t2i.png
run edit "a photo of a cat" --image /tmp/init.png --strength 0.75 --width 1024 --height 1024 -o /tmp/i2i.png
run inpaint "a photo of a cat" --image /tmp/init.png --mask /tmp/mask.png -o /tmp/inpaint.png
kill $SMI; sleep 0.2
echo "peak GPU memory per process (MiB):"
for n in encoder-svc denoiser-svc vae-svc; do
  pid=$(cat /tmp/$n.pid)
  peak=$(awk -F', ' -v p=$pid '$1==p {if ($2>m) m=$2} END {print m+0}' /tmp/smi.csv)
  echo "  $n pid $pid peak ${peak} MiB"
done
kill $GW $(cat /tmp/encoder-svc.pid /tmp/denoiser-svc.pid /tmp/vae-svc.pid) 2>/dev/null; wait 2>/dev/null
[ "${MPS:-0}" = 1 ] && echo quit | nvidia-cuda-mps-control
tail -3 "$OUT"/*-svc*.log
