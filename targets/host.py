"""The machine lrdeploy runs on: link with the host compiler, run in-process on TVM's VM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy.runtime import Feeds
from lrdeploy.targets.devices import Device

ARTIFACT = "model.so"
KERNELS = "kernels.so"


def export(executable: Any, outdir: Path, device: Device) -> tuple[str, list[str]]:
    """Write the shared library, and the kernels alone as ``kernels.so`` (timed one by one by
    ``profile --per-layer``); returns the artifact's file name and notes for the user."""
    executable.export_library(str(outdir / ARTIFACT))
    executable.mod.imports[0].export_library(str(outdir / KERNELS))
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


def time_artifact(
    outdir: Path, manifest: dict, feed: Feeds, number: int, repeat: int
) -> list[float]:
    """Seconds per call of the artifact's ``main``, ``repeat`` samples of ``number`` calls each
    (TVM's ``time_evaluator``, after one warm-up call)."""
    import tvm
    from tvm import relax

    device = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(outdir / manifest["artifact"])), device)
    args = [tvm.runtime.tensor(np.ascontiguousarray(feed[spec["name"]]), device)
            for spec in manifest["inputs"]]
    evaluator = vm.time_evaluator("main", device, number=number, repeat=repeat)
    return list(evaluator(*args).results)
