#!/usr/bin/env bash
# Installs what tvmedge needs on a fresh Debian machine: the system packages (cross
# compilers, qemu-user for emulated devices, PoCL for OpenCL on the CPU) and a virtual
# environment at .venv with the pinned Python packages. Safe to run again: it only
# installs what is missing. TVMEDGE_SETUP_RISCV=1 also cross-builds the riscv64 TVM
# runtime the emulated RISC-V boards run (else it is built on first use; ~5-15 min).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="g++ debian-archive-keyring g++-aarch64-linux-gnu qemu-user-static pocl-opencl-icd ocl-icd-libopencl1 binutils-aarch64-linux-gnu g++-riscv64-linux-gnu binutils-riscv64-linux-gnu"
# chromium: headless, the browser tests/test_report.py renders tvmedge report's page in
APT_PACKAGES="$APT_PACKAGES chromium"
missing=""
for pkg in $APT_PACKAGES; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "[setup] installing Debian packages:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.tvmedge-installed
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[setup] installing Python packages into .venv (pinned in pyproject.toml)"
    .venv/bin/python -m pip install -q --upgrade pip
    if ! .venv/bin/python -m pip install -e '.[test,bench]' > .venv/pip-install.log 2>&1; then
        tail -30 .venv/pip-install.log; echo "[setup] pip install failed (full log: .venv/pip-install.log)"; exit 1
    fi
    touch "$stamp"
fi

if [ "${TVMEDGE_SETUP_RISCV:-0}" = "1" ]; then
    echo "[setup] cross-building the riscv64 TVM runtime for the emulated RISC-V boards (cached)"
    .venv/bin/python -m tvmedge.deploy.crossrt riscv64
fi
