"""The machine lrdeploy runs on: link with the host compiler, run in-process on TVM's VM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lrdeploy.targets.devices import Device

from lrdeploy.runtime import Feeds

ARTIFACT = "model.so"


def export(executable: Any, outdir: Path, device: Device) -> tuple[str, list[str]]:
    """Write the shared library; returns its file name and notes for the user."""
    executable.export_library(str(outdir / ARTIFACT))
    return ARTIFACT, []


def run(outdir: Path, manifest: dict, feeds: list[Feeds], emulate: bool) -> list[list[np.ndarray]]:
    """Outputs for each feed, in the manifest's output order (``emulate`` has no meaning here)."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(outdir / manifest["artifact"])),
                              tvm.cpu())
    names = [spec["name"] for spec in manifest["inputs"]]
    results = []
    for feed in feeds:
        out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(feed[n])) for n in names])
        results.append(flatten_outputs(out))
    return results


def flatten_outputs(out: Any) -> list[np.ndarray]:
    """A VM result (one tensor or nested tuples of them) as a flat list of arrays."""
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [array for item in out for array in flatten_outputs(item)]
