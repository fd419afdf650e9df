"""Mobile GPUs (Mali, Adreno) through OpenCL: kernels checked by a real OpenCL compiler here,
host code cross-linked for aarch64, run and timed on the device over RPC.

TVM's wheels have no OpenCL runtime, so nothing here can launch the kernels. What can be checked
here is checked when the artifact is written:

- the build holds an OpenCL module and every kernel of the model is in it
  (``build.device_kernels``: a pipeline without GPU schedules "succeeds" with every kernel
  compiled for the host CPU instead);
- every kernel compiles as OpenCL C: with PoCL (Debian ``pocl-opencl-icd``, through
  ``pyopencl``), the way the device's driver builds it, one program per kernel as TVM's OpenCL
  runtime does. PoCL's CPU device has no ``cl_khr_fp16`` (PoCL 3.1), so half-precision kernels
  are compiled by the Clang OpenCL front end that PoCL itself uses (``clang-15``, installed
  with it), for a SPIR target with ``cl_khr_fp16`` on;
- the OpenCL C is written beside the artifact (``kernels.cl``) for inspection.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy.errors import LrdeployError
from lrdeploy.runtime import Feeds
from lrdeploy.targets import arm_cpu
from lrdeploy.targets.devices import Device

KERNELS_SOURCE = "kernels.cl"
CLANG_CANDIDATES = ("clang-15", "clang")
SECTION = re.compile(r"(?m)^// Function: (\S+)\n")


def kernel_sections(source: str) -> dict[str, str]:
    """TVM's OpenCL source split into its per-kernel programs, keyed by kernel name."""
    pieces = SECTION.split(source)
    return {pieces[i]: pieces[i + 1] for i in range(1, len(pieces) - 1, 2)}


def _pocl_context() -> Any:
    try:
        import pyopencl as cl
    except ImportError:
        raise LrdeployError("pyopencl is not installed: pip install pyopencl (and Debian's "
                            "pocl-opencl-icd) to check the OpenCL kernels") from None
    for platform in _platforms(cl):
        if "portable computing language" in platform.name.lower():
            return cl.Context(platform.get_devices()[:1])
    raise LrdeployError("no PoCL OpenCL platform: apt-get install pocl-opencl-icd to check the "
                        "OpenCL kernels")


def _platforms(cl: Any) -> list:
    try:
        return cl.get_platforms()
    except cl.LogicError:  # no ICD registered at all
        return []


def _first_error(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if "error" in line.lower()]
    return lines[0] if lines else (log.strip().splitlines() or ["unknown error"])[0]


def check_kernels(source: str) -> tuple[int, str]:
    """Compile every kernel of ``source``; returns (count, compiler) or raises naming the
    first kernel that does not compile."""
    sections = kernel_sections(source)
    if not sections:
        raise LrdeployError("the OpenCL source holds no kernel")
    if any("cl_khr_fp16" in text for text in sections.values()):
        clang = next((c for c in CLANG_CANDIDATES if shutil.which(c)), None)
        if clang is None:
            raise LrdeployError("no clang to check the half-precision OpenCL kernels: "
                                "apt-get install pocl-opencl-icd (it brings clang-15)")
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in sections.items():
                path = Path(tmp) / f"{name}.cl"
                path.write_text(text)
                proc = subprocess.run(
                    [clang, "-x", "cl", "-cl-std=CL1.2", "-target", "spir64", "-fsyntax-only",
                     "-Xclang", "-finclude-default-header", "-Xclang",
                     "-cl-ext=+cl_khr_fp16", str(path)],
                    capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    raise LrdeployError(f"OpenCL kernel {name} does not compile ({clang}): "
                                        f"{_first_error(proc.stderr)}")
        return len(sections), f"{clang} (OpenCL C 1.2, cl_khr_fp16)"
    context = _pocl_context()
    import pyopencl as cl

    for name, text in sections.items():
        try:
            cl.Program(context, text).build()
        except cl.Error as exc:
            raise LrdeployError(f"OpenCL kernel {name} does not compile (PoCL): "
                                f"{_first_error(str(exc))}") from None
    return len(sections), "PoCL"


def export(executable: Any, outdir: Path, device: Device) -> tuple[str, list[str]]:
    """The host code linked as for the device's CPU, ``kernels.cl`` beside it, the kernels
    compiled by an OpenCL compiler (a kernel that does not compile fails the build)."""
    from lrdeploy.targets.build import device_kernels

    source = device_kernels(executable, device)
    count, compiler = check_kernels(source)
    (outdir / KERNELS_SOURCE).write_text(source)
    artifact, notes = arm_cpu.export(executable, outdir, device)
    notes.append(f"{count} OpenCL kernels compiled by {compiler}; source in {KERNELS_SOURCE}")
    return artifact, notes


def run(outdir: Path, manifest: dict, feeds: list[Feeds], emulate: bool) -> list[list[np.ndarray]]:
    device = manifest["device"]["name"]
    raise LrdeployError(f"{outdir}: OpenCL kernels run only on the device (TVM's wheels have no "
                        f"OpenCL runtime): lrdeploy profile {outdir} --target {device} --rpc "
                        "HOST:PORT runs it there and compares its outputs with onnxruntime")
