"""The devices lrdeploy compiles for: a table of rows, one per named device.

Adding a device means adding a row here or in a user's ``--device-file`` (TOML or JSON with the
same fields), never a code path. ``family`` names the module in ``lrdeploy.targets`` that knows how
to link and run artifacts for that kind of device; everything else is data.

Figures are nominal (vendor clocks x SIMD width, memory interface peak): the analytic latency
model uses them when a device cannot be measured, and reports its results as estimates.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from lrdeploy.errors import LrdeployError

_AARCH64_LINUX = {
    "family": "arm_cpu",
    "triple": "aarch64-linux-gnu",
    "cross_compiler": "aarch64-linux-gnu-gcc",
    "cross_compiler_package": "gcc-aarch64-linux-gnu",
    "runner_compiler": "aarch64-linux-gnu-g++",
    "runner_compiler_package": "g++-aarch64-linux-gnu",
    "runtime_platform": "manylinux_2_28_aarch64",
    "emulator": "qemu-aarch64-static",
    "emulator_package": "qemu-user-static",
    "sysroot": "/usr/aarch64-linux-gnu",
}

# Peak figures of the MCU rows: one single-precision FMA per cycle at most (FPv4 / FPv5), and the
# flash interface's 32 bits per cycle at the core clock (the weights stream from flash).
_CORTEX_M = {
    "family": "mcu",
    "triple": "thumbv7em-none-eabihf",
    "cross_compiler": "arm-none-eabi-gcc",
    "cross_compiler_package": "gcc-arm-none-eabi libnewlib-arm-none-eabi",
    "emulator": "qemu-system-arm",
    "emulator_package": "qemu-system-arm",
}


@dataclass(frozen=True)
class Device:
    """One named device. ``tvm_target`` is TVM's dict form (the string form is refused)."""

    name: str
    description: str
    family: str
    tvm_target: dict[str, Any]
    triple: str
    cores: int
    peak_gflops: float
    bandwidth_gbs: float
    l2_kib: int
    simd_lanes: int = 4  # fp32 lanes of the widest vector unit: the planner's rank step
    cross_compiler: str | None = None
    cross_compiler_package: str | None = None
    ndk: bool = False
    runner_compiler: str | None = None
    runner_compiler_package: str | None = None
    runtime_platform: str | None = None
    emulator: str | None = None
    emulator_package: str | None = None
    sysroot: str | None = None
    rpc_key: str | None = None
    # Microcontrollers: what fits (flash holds code + const weights, RAM the arena), the C flags
    # of the core, and the qemu-system-arm board that emulates it.
    flash_kib: int | None = None
    ram_kib: int | None = None
    cflags: list[str] = field(default_factory=list)
    emulator_machine: str | None = None
    # GPUs: the half-precision peak (--dtype float16), twice fp32 on Mali Valhall and Adreno.
    peak_gflops_fp16: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def peak_gflops_at(self, dtype: str) -> float:
        """Peak GFLOP/s at ``dtype``: the half-precision peak where the row gives one."""
        if dtype == "float16" and self.peak_gflops_fp16:
            return self.peak_gflops_fp16
        return self.peak_gflops


# Precisions a model can be compiled at (compile --dtype); float16 is for GPU targets.
DTYPES = ("float32", "float16")


def check_dtype(device: Device, dtype: str) -> None:
    """Refuse a precision the device is not compiled at."""
    if dtype not in DTYPES:
        raise LrdeployError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if dtype == "float16" and device.family != "mobile_gpu":
        raise LrdeployError(f"--dtype float16 is for GPU targets; '{device.name}' is "
                            f"{device.family}")


def _cpuinfo_value(keys: tuple[str, ...], cpuinfo: Path) -> str | None:
    """The first value Linux's ``cpuinfo`` lists under one of ``keys``; None where it cannot be
    read or lists none (py-cpuinfo would read the same file at a second's cost per import)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def host_simd_lanes(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """fp32 lanes of this machine's widest vector unit: 16 with AVX-512, 8 with AVX / AVX2, 4
    otherwise (SSE, NEON), from the CPU flags; 4 where they cannot be read."""
    flags = set((_cpuinfo_value(("flags", "Features"), cpuinfo) or "").split())
    if "avx512f" in flags:
        return 16
    return 8 if "avx" in flags else 4


def host_cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """This machine's CPU model name (x86's ``model name``, or the ``CPU part`` of an Arm
    core), else its architecture."""
    return (_cpuinfo_value(("model name", "CPU part"), cpuinfo) or platform.machine()
            or "unknown")


def _row(name: str, description: str, **values: Any) -> Device:
    return Device(name=name, description=description, **values)


BUILTIN_DEVICES: dict[str, Device] = {
    d.name: d
    for d in [
        _row("host", "this machine (x86-64 or aarch64 Linux), artifacts run in-process",
             family="host", triple="native",
             tvm_target={"kind": "llvm", "mcpu": "native", "num-cores": os.cpu_count() or 1},
             cores=os.cpu_count() or 1, peak_gflops=100.0, bandwidth_gbs=20.0, l2_kib=512,
             simd_lanes=host_simd_lanes()),
        _row("rpi4", "Raspberry Pi 4: 4x Cortex-A72 @ 1.5 GHz, NEON, LPDDR4",
             tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                         "mattr": ["+neon"], "num-cores": 4},
             cores=4, peak_gflops=48.0, bandwidth_gbs=4.0, l2_kib=1024, rpc_key="rpi4",
             **_AARCH64_LINUX),
        _row("rpi5", "Raspberry Pi 5: 4x Cortex-A76 @ 2.4 GHz, NEON + dotprod, LPDDR4X",
             tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                         "mattr": ["+neon", "+v8.2a", "+dotprod", "+fullfp16"], "num-cores": 4},
             cores=4, peak_gflops=153.6, bandwidth_gbs=17.0, l2_kib=512, rpc_key="rpi5",
             **_AARCH64_LINUX),
        _row("android-arm64", "Android phone big core (armv8.2-a, Pixel class): 4 cores",
             family="arm_cpu",
             tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-android", "mcpu": "cortex-a76",
                         "mattr": ["+neon", "+v8.2a", "+dotprod", "+fullfp16"], "num-cores": 4},
             triple="aarch64-linux-android", ndk=True, cores=4, peak_gflops=180.0,
             bandwidth_gbs=25.0, l2_kib=512, rpc_key="android"),
        _row("jetson-orin-cpu", "NVIDIA Jetson AGX Orin CPU: 12x Cortex-A78AE @ 2.2 GHz",
             tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae",
                         "mattr": ["+neon", "+v8.2a", "+dotprod", "+fullfp16"], "num-cores": 12},
             cores=12, peak_gflops=422.4, bandwidth_gbs=204.8, l2_kib=256,
             rpc_key="jetson-orin", **_AARCH64_LINUX),
        _row("mali-g610", "Arm Mali-G610 MP4 @ 1 GHz (RK3588 boards: Orange Pi 5, Rock 5B), "
             "OpenCL, aarch64 Linux host",
             family="mobile_gpu",
             tvm_target={"kind": "opencl", "device": "mali",
                         "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                  "mcpu": "cortex-a76", "mattr": ["+neon"]}},
             triple="aarch64-linux-gnu", cores=4, peak_gflops=512.0, peak_gflops_fp16=1024.0,
             bandwidth_gbs=34.0, l2_kib=512, simd_lanes=16, rpc_key="rk3588-mali",
             cross_compiler="aarch64-linux-gnu-gcc",
             cross_compiler_package="gcc-aarch64-linux-gnu"),
        # TVM's tag qcom/adreno-opencl, with an Android host for the VM code.
        _row("adreno-7xx", "Qualcomm Adreno 740 (Snapdragon 8 Gen 2 phones), OpenCL, "
             "Android arm64 host",
             family="mobile_gpu",
             tvm_target={"kind": "opencl", "device": "adreno",
                         "keys": ["adreno", "opencl", "gpu"],
                         "host": {"kind": "llvm", "mtriple": "aarch64-linux-android",
                                  "mattr": ["+neon"]}},
             triple="aarch64-linux-android", ndk=True, cores=6, peak_gflops=2000.0,
             peak_gflops_fp16=4000.0, bandwidth_gbs=67.0, l2_kib=1024, simd_lanes=16,
             rpc_key="android-adreno"),
        _row("cortex-m4", "STM32F4-class microcontroller: Cortex-M4F @ 168 MHz, 192 KiB RAM, "
             "1 MiB flash (C project, emulated on an MPS2-AN386 board)",
             tvm_target={"kind": "c", "mcpu": "cortex-m4"}, cores=1, peak_gflops=0.168,
             bandwidth_gbs=0.67, l2_kib=0, simd_lanes=1, flash_kib=1024, ram_kib=192,
             cflags=["-mcpu=cortex-m4", "-mthumb", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard"],
             emulator_machine="mps2-an386", **_CORTEX_M),
        _row("cortex-m7", "STM32H7-class microcontroller: Cortex-M7 @ 480 MHz, 1 MiB RAM, "
             "2 MiB flash (C project, emulated on an MPS2-AN500 board)",
             tvm_target={"kind": "c", "mcpu": "cortex-m7"}, cores=1, peak_gflops=0.96,
             bandwidth_gbs=1.9, l2_kib=0, simd_lanes=1, flash_kib=2048, ram_kib=1024,
             cflags=["-mcpu=cortex-m7", "-mthumb", "-mfpu=fpv5-d16", "-mfloat-abi=hard"],
             emulator_machine="mps2-an500", **_CORTEX_M),
    ]
}

REQUIRED_FIELDS = [f.name for f in fields(Device)
                   if f.default is MISSING and f.default_factory is MISSING]
FAMILIES = ("host", "arm_cpu", "mobile_gpu", "mcu")


def load_device_file(path: str | os.PathLike[str]) -> dict[str, Device]:
    """Devices from a TOML or JSON file: a table (object) of rows keyed by device name."""
    path = Path(path)
    if not path.is_file():
        raise LrdeployError(f"{path}: no such file")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LrdeployError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'JSON'} "
                            f"({exc})") from None
    if not isinstance(data, dict) or not data:
        raise LrdeployError(f"{path}: expected a table of devices keyed by name")
    known = {f.name for f in fields(Device)}
    devices = {}
    for name, row in data.items():
        if not isinstance(row, dict):
            raise LrdeployError(f"{path}: device '{name}' is not a table")
        values = {"name": name, **row}
        missing = [f for f in REQUIRED_FIELDS if f not in values]
        if missing:
            raise LrdeployError(f"{path}: device '{name}' lacks field(s) {', '.join(missing)}")
        unknown = sorted(set(values) - known)
        if unknown:
            raise LrdeployError(f"{path}: device '{name}' has unknown field(s) "
                                f"{', '.join(unknown)}")
        if not isinstance(values["tvm_target"], dict) or "kind" not in values["tvm_target"]:
            raise LrdeployError(f"{path}: device '{name}': tvm_target must be a table with 'kind'")
        if values["family"] not in FAMILIES:
            raise LrdeployError(f"{path}: device '{name}': family must be one of "
                                f"{', '.join(FAMILIES)}")
        wrong = [f"{f}={values[f]!r}: {problem}" for f in values
                 if (problem := _field_problem(f, values[f])) is not None]
        if wrong:
            raise LrdeployError(f"{path}: device '{name}': {'; '.join(wrong)}")
        devices[name] = Device(**values)
    return devices


# The roofline divides by these, and the planner steps ranks by simd_lanes.
POSITIVE_FIELDS = ("cores", "peak_gflops", "bandwidth_gbs", "simd_lanes", "peak_gflops_fp16",
                   "flash_kib", "ram_kib")
# What each field of a row holds, by the annotation of ``Device`` (a file's row is checked
# against it: JSON and TOML give 8.0 for a lane count, or text for a number, just as readily).
_FIELD_TYPES = {f.name: f.type for f in fields(Device)}


def _field_problem(name: str, value: Any) -> str | None:
    """Why a device file's ``value`` cannot be field ``name`` of a row, or None."""
    kind = _FIELD_TYPES[name]
    if value is None:
        return None if "None" in kind else "must be given"
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be a whole number"
    elif kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            return "must be a finite number"
    elif kind.startswith("str") and not isinstance(value, str):
        return "must be text"
    elif kind == "bool" and not isinstance(value, bool):
        return "must be true or false"
    elif kind.startswith("list") and (not isinstance(value, list)
                                      or not all(isinstance(v, str) for v in value)):
        return "must be a list of text"
    elif kind.startswith("dict") and not isinstance(value, dict):
        return "must be a table"
    if name in POSITIVE_FIELDS and not value > 0:
        return "must be above 0"
    if name == "l2_kib" and value < 0:
        return "must be 0 or more"
    return None


def all_devices(device_file: str | os.PathLike[str] | None = None) -> dict[str, Device]:
    devices = dict(BUILTIN_DEVICES)
    if device_file is not None:
        devices.update(load_device_file(device_file))
    return devices


def get_device(name: str, device_file: str | os.PathLike[str] | None = None) -> Device:
    devices = all_devices(device_file)
    if name not in devices:
        raise LrdeployError(f"unknown target '{name}'; known targets: {', '.join(devices)}")
    return devices[name]
