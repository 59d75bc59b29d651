# Source (bash) before a CUDA build on a machine without a GPU:
#     source tools/gpu/cuda-env.sh && cargo build --release --features cuda -p <crate>
# Installs the CUDA 13.0 compiler and libraries from PyPI into /tmp/cuda13 (once), assembles a
# CUDA_HOME for cudarc and candle-kernels in /tmp/cudahome with link-only stubs of libcuda and
# libcudnn (the real libraries come from the GPU machine at run time), and exports the build
# variables. CUDA 13.0 matches the GPU machines' driver; CUDA_COMPUTE_CAP=90 targets Hopper.
_klein_cuda_lib=/tmp/cuda13/nvidia/cu13/lib
if [ ! -x /tmp/cuda13/nvidia/cu13/bin/nvcc ]; then
  python3 -m pip install -q --target /tmp/cuda13 --no-deps \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    nvidia-curand "nvidia-cublas==13.0.*" || { echo "cuda-env: pip install failed" >&2; return 1; }
fi
mkdir -p /tmp/cudahome/lib64
ln -sfn /tmp/cuda13/nvidia/cu13/bin /tmp/cudahome/bin
ln -sfn /tmp/cuda13/nvidia/cu13/include /tmp/cudahome/include
ln -sfn /tmp/cuda13/nvidia/cu13/nvvm /tmp/cudahome/nvvm
for _p in cublas:libcublas.so.13 cublasLt:libcublasLt.so.13 curand:libcurand.so.10 \
          nvrtc:libnvrtc.so.13 cudart:libcudart.so.13; do
  ln -sf "$_klein_cuda_lib/${_p#*:}" "/tmp/cudahome/lib64/lib${_p%%:*}.so"
done
_klein_cudarc=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.* 2>/dev/null | sort | tail -1)
if [ -z "$_klein_cudarc" ]; then
  echo "cuda-env: run 'cargo fetch' first (the cudarc sources list the symbols to stub)" >&2
  return 1
fi
if [ ! -f /tmp/cudahome/lib64/libcuda.so ]; then
  grep -oh "pub unsafe fn cu[A-Za-z0-9_]*" "$_klein_cudarc/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u \
    | awk '{print "int "$1"(void){return 999;}"}' > /tmp/klein-cudastub.c
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o /tmp/cudahome/lib64/libcuda.so /tmp/klein-cudastub.c
  grep -oh "pub unsafe fn cudnn[A-Za-z0-9_]*" "$_klein_cudarc/src/cudnn/sys/mod.rs" | awk '{print $4}' | sort -u \
    | awk '{print "int "$1"(void){return 999;}"}' > /tmp/klein-cudnnstub.c
  gcc -shared -fPIC -Wl,-soname,libcudnn.so.9 -o /tmp/cudahome/lib64/libcudnn.so /tmp/klein-cudnnstub.c
fi
export CUDA_HOME=/tmp/cudahome CUDA_ROOT=/tmp/cudahome CUDA_PATH=/tmp/cudahome
export NVCC=/tmp/cudahome/bin/nvcc PATH=/tmp/cudahome/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath-link,$_klein_cuda_lib"
echo "cuda-env: $(nvcc --version | tail -1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
