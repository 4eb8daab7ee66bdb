#!/usr/bin/env bash
# Build lorafleet-worker and lorafleet with the `cuda` feature (candle's CUDA backend) on a machine
# without a GPU or a system CUDA toolkit: NVIDIA's toolkit wheels from PyPI stand in for
# the toolkit, and a stub stands in for the driver library at link time (the real
# libcuda.so.1 is loaded at run time on the GPU machine). Recipe and caveats:
# ../shared/notes/cuda-build.md. The default build and CI need none of this.
#
#   ./scripts/build-cuda.sh            # -> target/cuda/release/lorafleet-worker and lorafleet
#   CUDA_COMPUTE_CAP=80 ./scripts/build-cuda.sh   # another GPU generation (default 90: H100/H200)
#
# Run time on the GPU machine: libcudart.so.13, libcublas.so.13, libcurand.so.10,
# libnvrtc.so.13 and libnccl.so.2 must be on LD_LIBRARY_PATH (a PyTorch environment's NVIDIA wheels have
# them), and the driver must accept PTX from CUDA 13.0 (driver >= 580).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source scripts/ensure-rust.sh

VENV="$ROOT/.venv-cuda"
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
# Pinned to the CUDA 13.0 series, nvcc's own dependencies (nvvm, crt) included: candle
# embeds PTX, newer front ends emit a PTX version that 13.0's ptxas and a CUDA 13.0
# driver refuse ("Unsupported .version 9.5").
"$VENV/bin/pip" install -q \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 \
    nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-nccl-cu13==2.28.9

CU="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
[[ -x "$CU/bin/nvcc" ]] || { echo "error: nvcc not found under $CU/bin" >&2; exit 1; }

NCCL="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "nccl"))')"

# Unversioned names for the linker, and a link-time stub of the driver library.
LINK="$ROOT/target/cuda/link"
mkdir -p "$LINK"
for lib in cublas cublasLt cudart curand nvrtc; do
    real="$(ls "$CU"/lib/lib$lib.so.* 2>/dev/null | head -1)"
    [[ -n "$real" ]] || { echo "error: lib$lib.so.* not found under $CU/lib" >&2; exit 1; }
    ln -sf "$real" "$LINK/lib$lib.so"
done
# NCCL (gangs on GPUs: engine/src/collective.rs, the `nccl` module).
real="$(ls "$NCCL"/lib/libnccl.so.* 2>/dev/null | head -1)"
[[ -n "$real" ]] || { echo "error: libnccl.so.* not found under $NCCL/lib" >&2; exit 1; }
ln -sf "$real" "$LINK/libnccl.so"
if [[ ! -f "$LINK/libcuda.so" ]]; then
    gcc -E -I"$CU/include" "$CU/include/cuda.h" 2>/dev/null \
        | grep -oE '\bcu[A-Za-z0-9_]+[[:space:]]*\(' | sed -E 's/[[:space:]]*\($//' | sort -u \
        | awk '{ print "int " $1 "(void) { return 0; }" }' > "$LINK/cuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda_stub.c"
fi

export CUDARC_CUDA_VERSION=13000
export CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_HOME="$CU"
export PATH="$CU/bin:$PATH"
export CPATH="$CU/include:$NCCL/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$LINK:$CU/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
cargo build --locked --release -p lorafleet-worker -p lorafleet-cli --features lorafleet-worker/cuda,lorafleet-cli/cuda --target-dir "$ROOT/target/cuda"
echo "built $ROOT/target/cuda/release/lorafleet-worker and lorafleet (CUDA, compute capability $CUDA_COMPUTE_CAP)"
