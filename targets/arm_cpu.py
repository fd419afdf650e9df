"""ARM CPUs (Raspberry Pi, Jetson, Android phones): cross-link, run under qemu for checks.

aarch64 Linux rows link with their cross gcc. Android rows link with the NDK's clang when
``ANDROID_NDK_HOME`` is set (TVM's ``tvm.support.ndk``); without an NDK the artifact is written as
``model.tar`` (the object files), which a user links on their side with the NDK.
Emulated runs exist to check outputs; their timings say nothing about a real board.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy.errors import LrdeployError
from lrdeploy.runtime import Feeds
from lrdeploy.targets import runner as deploy_runner
from lrdeploy.targets.devices import Device
from lrdeploy.targets.host import KERNELS

NDK_NOTE = ("ANDROID_NDK_HOME is not set: wrote model.tar (object files) instead of model.so; "
            "link it on your side with the NDK: set ANDROID_NDK_HOME and run lrdeploy compile "
            "again, or call tvm.support.ndk.create_shared on the objects")


def export(executable: Any, outdir: Path, device: Device) -> tuple[str, list[str]]:
    """Write the artifact; returns its file name and notes for the user."""
    if device.ndk:
        if not os.environ.get("ANDROID_NDK_HOME"):
            executable.export_library(str(outdir / "model.tar"))
            return "model.tar", [NDK_NOTE]
        from tvm.support import ndk

        executable.export_library(str(outdir / "model.so"), fcompile=ndk.create_shared)
        executable.mod.imports[0].export_library(str(outdir / KERNELS),
                                                 fcompile=ndk.create_shared)
        return "model.so", []
    compiler = deploy_runner.require_tool(device.cross_compiler, device.cross_compiler_package,
                                          f"linking for '{device.name}'")
    executable.export_library(str(outdir / "model.so"), cc=compiler)
    # The kernels alone, for profile --per-layer to time one by one on the device.
    executable.mod.imports[0].export_library(str(outdir / KERNELS), cc=compiler)
    return "model.so", []


def run(outdir: Path, manifest: dict, feeds: list[Feeds], emulate: bool) -> list[list[np.ndarray]]:
    """Outputs for each feed from the runner under qemu (``emulate`` must be set)."""
    device = Device(**manifest["device"])
    if manifest["artifact"] != "model.so":
        raise LrdeployError(f"{outdir}: {manifest['artifact']} is not linked; nothing to run")
    if not emulate:
        raise LrdeployError(f"{outdir}: the artifact is for {device.triple}; run it with --emulate "
                            "(qemu) or on the device")
    if not device.emulator:
        raise LrdeployError(f"{outdir}: target '{device.name}' cannot be emulated here (no "
                            "emulator in its device row)")
    runner = deploy_runner.runner_for(device)
    names = [spec["name"] for spec in manifest["inputs"]]
    results = []
    for feed in feeds:
        with tempfile.TemporaryDirectory() as tmp:
            args = [str((outdir / "model.so").resolve())]
            for index, name in enumerate(names):
                path = Path(tmp) / f"input_{index}.npy"
                np.save(path, np.ascontiguousarray(feed[name]))
                args += ["-i", str(path)]
            args += ["-o", tmp, "--runs", "1", "--warmup", "0"]
            proc = subprocess.run(deploy_runner.emulated_command(device, runner, args),
                                  capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
                raise LrdeployError(f"the runner failed under {device.emulator}: "
                                    f"{message[-1] if message else proc.returncode}")
            count = len(list(Path(tmp).glob("output_*.npy")))
            results.append([np.load(Path(tmp) / f"output_{k}.npy") for k in range(count)])
    return results
