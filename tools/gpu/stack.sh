#!/usr/bin/env bash
# On the GPU machine, after device.sh unpacked the binaries: writes a random-weight klein-4B
# pipeline (MODEL=klein-9b: klein-9B's), starts encoder-svc, denoiser-svc, vae-svc and the
# gateway as separate processes on GPU 0 (optionally as MPS clients with pinned memory limits =
# their budgets), times 1024² T2I / I2I / inpaint through the gateway with the klein CLI, and
# records each process's peak GPU memory (nvidia-smi, sampled every 100 ms).
# Env: MPS=1 to run under MPS. Budgets default to the 16 GB plan (deploy/components/gpu-16gb:
# encoder q4k 2880 MiB, denoiser bf16 10048 MiB, VAE f32 3328 MiB; runtime overheads measured on
# an H100);
# override with ENC_MIB / DEN_MIB / VAE_MIB and ENC_OVERHEAD / DEN_OVERHEAD / VAE_OVERHEAD, the
# encoder's quantization with ENC_QUANTIZE (default q4k; none), the transformer's with
# DEN_QUANTIZE (default none; q4k for klein-9B on 16 GB); DEN_GGUF=FORMAT first writes the
# transformer as a GGUF file in FORMAT with `klein quantize` (timed) and serves that file; and
# the VAE's cuDNN algorithm with VAE_ALGO (default implicit-precomp-gemm, as vae-svc's) and its
# operation chunk with VAE_OP_CHUNK (default 128MiB, as vae-svc's) and its convolution
# arithmetic with VAE_PRECISION (default split-tf32, as vae-svc's; exact, tf32).
set -uo pipefail
OUT=${1:-/tmp}; B=/tmp/klein; MODEL=${MODEL:-klein-4b}; M=/tmp/${MODEL/-/}
mkdir -p "$OUT"
ENC_MIB=${ENC_MIB:-2880}; DEN_MIB=${DEN_MIB:-10048}; VAE_MIB=${VAE_MIB:-3328}
ENC_OVERHEAD=${ENC_OVERHEAD:-448MiB}; DEN_OVERHEAD=${DEN_OVERHEAD:-704MiB}; VAE_OVERHEAD=${VAE_OVERHEAD:-1280MiB}
[ -f $M/model_index.json ] || { t=$(date +%s); $B/klein-bench --device cuda:0 write-pipeline --model "$MODEL" $M || exit 1; echo "wrote random pipeline in $(( $(date +%s) - t ))s"; }
if [ "${MPS:-0}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d && echo "MPS daemon started"
fi
start() { # name port budget_mib runtime_overhead extra...
  local name=$1 port=$2 mib=$3 overhead=$4; shift 4
  ( [ "${MPS:-0}" = 1 ] && export CUDA_MPS_PINNED_DEVICE_MEM_LIMIT="0=${mib}M"
    export KLEIN_RUNTIME_OVERHEAD=$overhead
    exec $B/$name --model-dir "${DIR:-$M}" --listen 127.0.0.1:$port --device cuda:0 --gpu-memory-budget "${mib}MiB" "$@" ) \
    > "$OUT/$name${MPS:+-mps}.log" 2>&1 &
  echo $! > /tmp/$name.pid
}
start encoder-svc 50052 $ENC_MIB $ENC_OVERHEAD --dtype bf16 --quantize "${ENC_QUANTIZE:-q4k}"
DEN_DIR=$M; DEN_FILE=()
if [ -n "${DEN_GGUF:-}" ]; then
  t=$(date +%s.%N)
  $B/klein quantize --model-dir $M --format "$DEN_GGUF" --out $M.gguf || exit 1
  echo "klein quantize $DEN_GGUF: $(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$t" "$(date +%s.%N)") s"
  DEN_DIR=$M.gguf; DEN_FILE=(--model-id "$(basename $M)" --is-distilled true)
fi
DIR=$DEN_DIR KLEIN_ATTENTION_CHUNK_BYTES=${DEN_CHUNK:-128MiB} start denoiser-svc 50053 $DEN_MIB $DEN_OVERHEAD --dtype bf16 \
  --quantize "${DEN_QUANTIZE:-none}" "${DEN_FILE[@]}"
KLEIN_OP_CHUNK_BYTES=${VAE_OP_CHUNK:-128MiB} start vae-svc 50054 $VAE_MIB $VAE_OVERHEAD --dtype f32 \
  --conv-algorithm "${VAE_ALGO:-implicit-precomp-gemm}" --conv-precision "${VAE_PRECISION:-split-tf32}"
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
: > /tmp/requests.tsv
run() { # label klein-args...
  local label=$1; shift
  echo "--- $label: $*"; local t0 t1 ok=ok
  t0=$(date +%s.%N)
  $B/klein "$@" > /tmp/run.log 2>&1 || ok=FAILED
  t1=$(date +%s.%N)
  grep -E "wrote|warning|klein:" /tmp/run.log
  echo "$ok client wall $(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 3))" "$t0" "$t1") s"
  [ $ok = ok ] && printf '%s\t%s\n' "$label" "$(python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$t0" "$t1")" >> /tmp/requests.tsv
}
run "warm-up (first 1024² request)" generate "a photo of a cat" --width 1024 --height 1024 --seed 1 -o /tmp/warm.png
for i in 1 2 3; do run "T2I 1024² 4 steps, prompt cached" generate "a photo of a cat" --width 1024 --height 1024 --seed $i -o /tmp/t2i.png; done
run "T2I 1024² 4 steps, new prompt" generate "a photo of a dog on a red sofa" --width 1024 --height 1024 --seed 9 -o /tmp/t2i-dog.png
run "I2I 1024², strength 0.75" edit "a photo of a cat" --image /tmp/init.png --strength 0.75 --width 1024 --height 1024 -o /tmp/i2i.png
run "inpaint 1024², mask image" inpaint "a photo of a cat" --image /tmp/init.png --mask /tmp/mask.png -o /tmp/inpaint.png
run "T2I 512² 4 steps" generate "a photo of a cat" --width 512 --height 512 --seed 3 -o /tmp/t2i-512.png
python3 -c "from PIL import Image; [Image.open(f'/tmp/{n}.png').resize((768, 768)).save(f'/tmp/{n}768.png') for n in ('init', 'mask')]"
run "I2I 768², strength 0.75" edit "a photo of a cat" --image /tmp/init768.png --strength 0.75 --width 768 --height 768 -o /tmp/i2i768.png
run "inpaint 768², mask image" inpaint "a photo of a cat" --image /tmp/init768.png --mask /tmp/mask768.png -o /tmp/inpaint768.png
cp /tmp/t2i.png /tmp/i2i.png /tmp/inpaint.png "$OUT/" 2>/dev/null
kill $SMI; sleep 0.2
echo "peak GPU memory per process (MiB):"
: > /tmp/peaks.tsv
for n in encoder-svc denoiser-svc vae-svc; do
  pid=$(cat /tmp/$n.pid)
  peak=$(awk -F', ' -v p=$pid '$1==p {if ($2>m) m=$2} END {print m+0}' /tmp/smi.csv)
  echo "  $n pid $pid peak ${peak} MiB"
  printf '%s\t%s\n' "$n" "$peak" >> /tmp/peaks.tsv
done
python3 - "$OUT/stack${MPS:+-mps}.json" <<'PY'
import json, sys
req = [[l.split("\t")[0], float(l.split("\t")[1])] for l in open("/tmp/requests.tsv") if l.strip()]
peak = {l.split("\t")[0]: int(l.split("\t")[1]) for l in open("/tmp/peaks.tsv") if l.strip()}
json.dump({"requests": req, "peak_mib": peak}, open(sys.argv[1], "w"), indent=1)
PY
kill $GW $(cat /tmp/encoder-svc.pid /tmp/denoiser-svc.pid /tmp/vae-svc.pid) 2>/dev/null; wait 2>/dev/null
[ "${MPS:-0}" = 1 ] && echo quit | nvidia-cuda-mps-control
for f in "$OUT"/*-svc*.log; do echo "== $f"; grep -E "ERROR|WARN|tiled=true|capacity" "$f" | tail -4; done
