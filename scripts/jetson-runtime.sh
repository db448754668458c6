#!/usr/bin/env bash
# Run ON a Jetson board: installs a TVM runtime that can run tvmedge's CUDA artifacts there and
# serve them to `tvmedge tune` / `tvmedge run` over RPC.
#
#   scripts/jetson-runtime.sh            # checks, installs, builds; then prints the serve command
#   PYTHON=python3.11 TVM_TAG=v0.27.0 scripts/jetson-runtime.sh
#
# What it does, and why:
# 1. The apache-tvm aarch64 wheel brings the Python package, the CPU runtime and the RPC server,
#    but its CUDA runtime library (tvm/lib/libtvm_runtime_cuda.so) is linked against CUDA 13's
#    libcudart.so.13, which no Jetson before Orin/Thor can have.
# 2. The wheel does not carry the CUDA runtime's sources (src/runtime/ has no cuda/), so the
#    script builds that library from apache/tvm at the tag of the installed wheel, with
#    USE_CUDA=ON, against the board's CUDA, and puts it in place of the wheel's.
# 3. TVM 0.27's CUDA runtime calls cuLaunchKernelEx (CUDA 11.8+) and cuTensorMapEncodeTiled
#    (CUDA 12.0+): it needs CUDA 12 on the board. Jetson Xavier: JetPack 5.x plus NVIDIA's
#    upgradable CUDA 12 packages (cuda-toolkit-12-x with cuda-compat). Jetson Nano: JetPack 4.6
#    ends at CUDA 10.2, so this build fails there (see the README: Jetson status).
# 4. tvmedge embeds PTX ISA 8.8 (NVRTC 12.9): the driver must be CUDA 12.9 or newer (with the
#    compat package) to JIT it; TVMEDGE_CUDA_CODE=cubin on the build host embeds sm_72 machine
#    code instead.
# Not verified on a board here (no Jetson in this project's machines); it stops at the first
# check that fails, with the reason.
set -euo pipefail

PY=${PYTHON:-python3}
TVM_WHEEL=${TVM_WHEEL:-apache-tvm==0.27.0.post1}
TVM_FFI_WHEEL=${TVM_FFI_WHEEL:-apache-tvm-ffi==0.1.14.post0}
TVM_TAG=${TVM_TAG:-v0.27.0}
WORK=${WORK:-$HOME/.cache/tvmedge-jetson}
JOBS=${JOBS:-$(nproc)}

die() { echo "jetson-runtime: $*" >&2; exit 1; }

[ "$(uname -m)" = aarch64 ] || die "run this on the Jetson (aarch64), not on $(uname -m)"
command -v "$PY" >/dev/null || die "no $PY: TVM 0.27 needs Python >= 3.10 (JetPack 5 ships 3.8: install a newer one, PYTHON=...)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$PY is $("$PY" --version 2>&1): TVM 0.27 needs >= 3.10"
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[ -x "$NVCC" ] || die "no nvcc (install the CUDA toolkit of your JetPack / NVIDIA's CUDA 12 for Jetson; NVCC=...)"
CUDA_VER=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1.\2/p')
[ "${CUDA_VER%%.*}" -ge 12 ] || die "CUDA $CUDA_VER: TVM 0.27's CUDA runtime needs CUDA 12 (cuTensorMapEncodeTiled); Jetson Nano stops at 10.2"
command -v cmake >/dev/null || die "no cmake (apt-get install cmake; TVM needs >= 3.18)"
command -v git >/dev/null || die "no git"

echo "[jetson-runtime] CUDA $CUDA_VER, $("$PY" --version 2>&1); installing $TVM_WHEEL"
"$PY" -m pip install --user -q "$TVM_WHEEL" "$TVM_FFI_WHEEL" numpy psutil cloudpickle tornado
TVM_LIB=$("$PY" -c 'import os, tvm; print(os.path.join(os.path.dirname(tvm.__file__), "lib"))')

mkdir -p "$WORK"
if [ ! -d "$WORK/tvm" ]; then
    echo "[jetson-runtime] fetching apache/tvm $TVM_TAG (sources of the CUDA runtime)"
    git clone -q --depth 1 --branch "$TVM_TAG" --recursive https://github.com/apache/tvm "$WORK/tvm"
fi
# Which Tegra: tegra210 = Nano/TX1 (sm_53), tegra194 = Xavier (sm_72); CUDA_ARCH=NN overrides.
compat=$(tr '\0' ' ' < /proc/device-tree/compatible 2>/dev/null || true)
case "$compat" in
    *tegra194*) ARCH=${CUDA_ARCH:-72} ;;
    *tegra210*) ARCH=${CUDA_ARCH:-53} ;;
    *) [ -n "${CUDA_ARCH:-}" ] || die "unknown board ($compat): give CUDA_ARCH=72 or 53"; ARCH=$CUDA_ARCH ;;
esac
echo "[jetson-runtime] building TVM's CUDA runtime for sm_$ARCH with $JOBS jobs (about an hour on a Xavier)"
cmake -S "$WORK/tvm" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DUSE_CUDA=ON -DUSE_LLVM=OFF \
      -DUSE_RPC=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DCUDAToolkit_ROOT="$(dirname "$(dirname "$NVCC")")" >/dev/null
targets=$(cmake --build "$WORK/build" --target help | sed -n 's/^\.\.\. \(tvm_runtime_cuda\)$/\1/p')
[ -n "$targets" ] || die "apache/tvm $TVM_TAG has no tvm_runtime_cuda target: build the whole runtime (--target runtime) by hand"
cmake --build "$WORK/build" --target tvm_runtime_cuda -j "$JOBS"
built=$(find "$WORK/build" -name 'libtvm_runtime_cuda.so' | head -1)
[ -n "$built" ] || die "the build produced no libtvm_runtime_cuda.so"
[ -f "$TVM_LIB/libtvm_runtime_cuda.so" ] && mv -n "$TVM_LIB/libtvm_runtime_cuda.so" "$TVM_LIB/libtvm_runtime_cuda.so.wheel-cuda13"
cp "$built" "$TVM_LIB/libtvm_runtime_cuda.so"

"$PY" - <<'EOF'
import tvm
dev = tvm.cuda(0)
if not dev.exist:
    raise SystemExit("jetson-runtime: TVM loads but sees no CUDA device (driver? user in the 'video' group?)")
print(f"[jetson-runtime] TVM {tvm.__version__} sees the GPU: sm_{dev.compute_version.replace('.', '')}, "
      f"{dev.multi_processor_count} SMs")
EOF
cat <<EOF

Serve the board to a tracker (on the build host: tvmedge device tracker --host 0.0.0.0):
    $PY -m tvm.exec.rpc_server --tracker HOST:9190 --key jetson-nano   # or --key jetson-xavier
or, with tvmedge installed on the board (restarts the server when it dies or drops off):
    tvmedge device serve --tracker HOST:9190 --key jetson-xavier
EOF
