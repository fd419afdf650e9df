"""Artifacts for devices: ``compile``, ``verify`` and ``bundle`` (TVM is imported lazily).

An artifact folder (OUTDIR) holds the compiled model (``model.so``, or ``model.tar`` when it
could not be linked here), the ONNX it was built from (``model.onnx``), and ``manifest.json``:
the device row, input names / shapes / dtypes, output names, TVM version, the ONNX's SHA-256,
the bytes of weights embedded in the artifact. The runner and the profiler read the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from lrdeploy import __version__, frontend, runtime
from lrdeploy.api import VERIFY_FEEDS, compress, load
from lrdeploy.errors import LrdeployError
from lrdeploy.fileio import check_outputs, write_json
from lrdeploy.sites import initializer_bytes
from lrdeploy.targets.devices import Device, check_dtype, get_device
from lrdeploy.verify import OutputFidelity, compare_outputs, reference_outputs

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lrdeploy-artifact/1"
MODEL_ONNX = "model.onnx"
TUNING_DIR = "tuning"

Progress = Callable[[str], None]


def _family(device: Device) -> Any:
    return importlib.import_module(f"lrdeploy.targets.{device.family}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(outdir: str | os.PathLike[str]) -> dict:
    outdir = Path(outdir)
    path = outdir / MANIFEST
    if not outdir.is_dir():
        raise LrdeployError(f"{outdir}: no such folder")
    if not path.is_file():
        raise LrdeployError(f"{outdir}: no {MANIFEST} (not an lrdeploy compile output)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise LrdeployError(f"{path}: not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise LrdeployError(f"{path}: not an lrdeploy manifest ({MANIFEST_FORMAT})")
    for key in ("onnx", "artifact", "kernels_library"):
        name = manifest.get(key)
        if name and not (outdir / name).is_file():
            raise LrdeployError(f"{outdir}: {name} is missing (the folder is incomplete: "
                                "compile again)")
    return manifest


def compile_model(
    model: Any,
    target: str,
    outdir: str | os.PathLike[str],
    *,
    device_file: str | os.PathLike[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    tune_trials: int = 0,
    sample_schedules: bool = False,
    compress_options: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    progress: Progress = lambda message: None,
) -> dict:
    """Compile ``model`` for the named device into ``outdir``; returns the manifest.

    ``dtype="float16"`` (GPU targets) runs weights and activations in half precision; the error
    this costs is measured against float32 onnxruntime on a host build of the same graph and
    recorded in the manifest (``half_precision``), and a budget in ``compress_options`` is
    planned at it.

    ``compress_options`` (keyword arguments of ``lrdeploy.compress``) compress the model first;
    without them an ``.onnx`` is compiled as it is (a torch factory is traced). The folder is
    staged beside ``outdir`` and renamed into place when complete; an earlier artifact there is
    replaced (its tuning database kept when tuning again), anything else refused
    (``_check_replaceable``). A budget is planned on TVM's timings when the model is compiled
    for the host (the engine that will run it), unless the budget names its engine.
    """
    device = get_device(target, device_file)
    family = _family(device)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise LrdeployError(f"{outdir}: exists and is a file, not a folder; choose a new or "
                            "empty folder for -o")
    _check_replaceable(outdir, [model if isinstance(model, str | os.PathLike) else None,
                                *((compress_options or {}).get(k) for k in ("calib", "plan"))])
    if not outdir.parent.is_dir():
        raise LrdeployError(f"{outdir}: parent folder {outdir.parent} does not exist")
    if tune_trials < 0:
        raise LrdeployError("--tune-trials must be >= 0")
    check_dtype(device, dtype)
    budget = (compress_options or {}).get("budget")
    if budget is not None:
        # The plan must meet the budget at the precision, with the schedules and on the
        # runtime the model is compiled for: TVM's, also on the host.
        engine = budget.engine or ("tvm" if device.family == "host" else None)
        compress_options = {**compress_options, "budget": dataclasses.replace(
            budget, dtype=dtype, sample_schedules=sample_schedules, engine=engine)}
    if tune_trials and device.family != "host":
        raise LrdeployError(f"tuning for '{device.name}': lrdeploy tunes on this machine only "
                            "(MetaSchedule times its candidates where it runs, and tuning over "
                            "RPC is not supported); compile untuned (--tune-trials 0) or with "
                            "--sample-schedules")
    if sample_schedules and tune_trials:
        raise LrdeployError("give --tune-trials or --sample-schedules, not both (tuning "
                            "measures its own schedules)")
    if sample_schedules and (device.tvm_target["kind"] != "llvm"
                             or hasattr(family, "compile_fused")):
        raise LrdeployError(f"--sample-schedules is for CPU targets run by TVM's VM; "
                            f"'{device.name}' is {device.family}")
    if device.cross_compiler and not device.ndk:
        from lrdeploy.targets.runner import require_tool

        require_tool(device.cross_compiler, device.cross_compiler_package,
                     f"linking for '{device.name}'")

    with tempfile.TemporaryDirectory(prefix=f".{outdir.name}.", dir=outdir.parent) as tmp:
        staged = Path(tmp) / "artifact"
        staged.mkdir()
        progress("loading the model")
        onnx_path = staged / MODEL_ONNX
        compression, plan_notes = None, []
        if compress_options:
            progress("compressing")
            result = compress(model, onnx_path, input_shapes=input_shapes,
                              save_plan=staged / "plan.json", **compress_options)
            compression = {**result.report["totals"],
                           "verification": result.report["verification"]}
            # The report names the model where it will be, not where it was staged.
            write_json(staged / "compression.json",
                       {**result.report, "output": str(outdir / MODEL_ONNX)})
            plan_notes = [f"compressed by {result.report['plan_source']}"]
            onnx_model, specs = result.model, result.analysis.specs
        else:
            loaded = load(model, input_shapes=input_shapes)
            onnx_model = loaded.original
            ir.save(onnx_model, onnx_path)
            specs = runtime.input_specs(onnx_model, loaded.onnx_shapes)
        name = Path(model).name if isinstance(model, str | os.PathLike) else "the model"
        if hasattr(family, "check_io_counts"):  # before TVM's import and build
            family.check_io_counts(len(specs), len(onnx_model.graph.outputs), name)

        import tvm

        from lrdeploy.targets import build

        progress("importing into TVM Relax")
        proto = ir.serde.serialize_model(onnx_model)
        mod = build.import_onnx(proto, {s.name: s.shape for s in specs})
        half_precision = None
        if dtype == "float16":
            mod = build.to_half(mod)
            progress("measuring the float16 error on a host build")
            half_precision = _half_precision_error(mod, onnx_model, specs)
        fused = build.fuse(mod, device)
        database = None
        if tune_trials or sample_schedules:
            from lrdeploy.targets import tuning

            database = staged / TUNING_DIR
            if tune_trials:
                if (outdir / TUNING_DIR).is_dir():
                    shutil.copytree(outdir / TUNING_DIR, database)
                progress(f"tuning with MetaSchedule ({tune_trials} trials)")
                tuning.tune(fused, device, database, tune_trials, progress)
            else:
                sampled = tuning.sample(fused, device, database, progress)
        progress(f"compiling for {device.name}")
        kernels = build.kernel_table(fused, proto)
        details = None
        if hasattr(family, "compile_fused"):  # C projects (microcontrollers): no TVM VM
            artifact, notes, details = family.compile_fused(fused, staged, device, name)
            param_bytes = details["weight_bytes"]
        else:
            lowered = build.lower(fused, device, database)
            param_bytes = build.constant_bytes(lowered)
            executable = build.build(lowered, device)
            build.check_device_code(executable, lowered, device)
            progress("linking")
            artifact, notes = family.export(executable, staged, device)
        manifest = {
            "format": MANIFEST_FORMAT,
            "lrdeploy_version": __version__,
            "tvm_version": tvm.__version__,
            "device": device.to_dict(),
            "artifact": artifact,
            "linked": artifact.endswith(".so"),
            "onnx": MODEL_ONNX,
            "onnx_sha256": _sha256(onnx_path),
            "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype)}
                       for s in specs],
            "outputs": [v.name for v in onnx_model.graph.outputs],
            "param_bytes": param_bytes,
            "onnx_param_bytes": initializer_bytes(onnx_model),
            "tuning": ({"trials": tune_trials, "database": TUNING_DIR} if tune_trials else
                       {"sampled_kernels": sampled, "database": TUNING_DIR} if sample_schedules
                       else None),
            "compression": compression,
            "kernels": kernels,
            "kernels_library": "kernels.so" if (staged / "kernels.so").is_file() else None,
            "notes": plan_notes + notes,
            "mcu": details,
            "dtype": dtype,
            "half_precision": half_precision,
        }
        manifest["files"] = sorted([*(p.name for p in staged.iterdir()), MANIFEST])
        write_json(staged / MANIFEST, manifest)
        _swap_into_place(staged, outdir)
    return manifest


def _half_precision_error(mod: Any, onnx_model: ir.Model, specs: Sequence, samples: int = 2
                          ) -> dict:
    """The half-precision graph built for this machine and run on random feeds, against float32
    onnxruntime: the GPU kernels cannot run here, but their arithmetic is the same."""
    import tvm
    from tvm import relax

    from lrdeploy.targets import build
    from lrdeploy.targets.host import flatten_outputs

    host = get_device("host")
    executable = build.build(build.lower(build.fuse(mod, host), host), host)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    feeds = [runtime.random_inputs(onnx_model, specs, seed) for seed in range(samples)]
    produced = [flatten_outputs(vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(
        feed[spec.name])) for spec in specs])) for feed in feeds]
    names, reference, unoptimized = reference_outputs(onnx_model, feeds)
    fidelity = compare_outputs(names, reference, [[o.astype(np.float32) for o in out]
                                                  for out in produced], unoptimized)
    return {"feeds": f"{samples} random feed(s)", "outputs": [f.to_dict() for f in fidelity],
            "max_relative_error": max(f.relative_l2_error for f in fidelity)}


def _check_replaceable(outdir: Path, inputs: Sequence[Any]) -> None:
    """Refuse an output folder whose replacement would lose something: a folder that is not
    an earlier artifact (one with a manifest.json of its own, say a web app's), an artifact
    holding files compile did not write there, or one holding an input."""
    if not outdir.exists() or not any(outdir.iterdir()):
        return
    try:
        manifest = json.loads((outdir / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise LrdeployError(f"{outdir}: exists and is not an lrdeploy artifact folder; "
                            "choose a new or empty folder")
    for given in inputs:
        if given is not None and outdir.resolve() in Path(given).resolve().parents:
            raise LrdeployError(f"{given}: is inside {outdir}, which compile replaces; "
                                "choose another output folder")
    written = set(manifest.get("files") or ())
    if not written:  # earlier versions did not record them
        return
    if isinstance(manifest.get("device"), dict):
        written |= set(getattr(_family(Device(**manifest["device"])), "BUILD_OUTPUTS", ()))
    others = sorted(p.name for p in outdir.iterdir() if p.name not in written)
    if others:
        raise LrdeployError(f"{outdir}: holds {', '.join(others)}, which compile did not write "
                            "and would delete with the earlier artifact; move them or choose "
                            "another folder")


def _swap_into_place(staged: Path, outdir: Path) -> None:
    if outdir.exists():
        retired = staged.parent / "retired"
        os.replace(outdir, retired)
    os.replace(staged, outdir)


@dataclass
class VerifyResult:
    manifest: dict
    fidelity: list[OutputFidelity]
    feed_source: str
    emulated: bool

    @property
    def max_relative_error(self) -> float:
        return max((f.relative_l2_error for f in self.fidelity), default=0.0)

    def failures(self, tolerance: float) -> list[OutputFidelity]:
        """Outputs off by more than ``tolerance`` and more than onnxruntime's own float32 noise
        (its graph rewrites on vs off): differences within that noise are no evidence of a
        wrong artifact, e.g. on an output that is ~1e-7 everywhere."""
        return [f for f in self.fidelity
                if not f.relative_l2_error <= max(tolerance, f.noise_floor)]


def verify_artifact(
    outdir: str | os.PathLike[str],
    *,
    emulate: bool = False,
    calib: str | os.PathLike[str] | None = None,
    samples: int = VERIFY_FEEDS,
    seed: int = 0,
    progress: Progress = lambda message: None,
) -> VerifyResult:
    """Run the artifact and onnxruntime (on the ONNX it was built from) on the same feeds."""
    outdir = Path(outdir)
    manifest = read_manifest(outdir)
    device = Device(**manifest["device"])
    if emulate and device.family == "host":
        raise LrdeployError(f"{outdir}: --emulate is for a board's artifact; a host artifact "
                            "runs here as it is (drop --emulate)")
    onnx_path = outdir / manifest["onnx"]
    if _sha256(onnx_path) != manifest["onnx_sha256"]:
        raise LrdeployError(f"{onnx_path}: changed since it was compiled (hash mismatch)")
    model = frontend.load_onnx(onnx_path)
    shapes = {spec["name"]: spec["shape"] for spec in manifest["inputs"]}
    specs = runtime.input_specs(model, shapes)
    if calib is not None:
        feeds = runtime.load_calibration(calib, specs)
        for feed in feeds:
            for spec in specs:
                if tuple(feed[spec.name].shape) != spec.shape:
                    raise LrdeployError(f"{calib}: '{spec.name}' has shape "
                                        f"{list(feed[spec.name].shape)}; the artifact was "
                                        f"compiled for {list(spec.shape)}")
        feed_source = f"{len(feeds)} feed(s) from {calib}"
    else:
        feeds = [runtime.random_inputs(model, specs, seed + i) for i in range(samples)]
        feed_source = f"{samples} random feed(s), seed {seed}"
    progress("running onnxruntime")
    names, reference, unoptimized = reference_outputs(model, feeds)
    progress(f"running the artifact{' under ' + str(device.emulator) if emulate else ''}")
    produced = _family(device).run(outdir, manifest, feeds, emulate)
    fidelity = compare_outputs(names, reference, produced, unoptimized)
    return VerifyResult(manifest, fidelity, feed_source, emulate and device.family != "host")


BUNDLE_README = """# {name}: lrdeploy artifact for {device}

Copy this folder to the device and run:

    ./lrdeploy_runner model.so -i input0.npy [-i input1.npy ...] -o outputs --runs 20

Inputs, in this order ({count}): {inputs}
Each is an .npy file, or raw little-endian data given as PATH@DIMS:DTYPE
(e.g. x.bin@1x3x224x224:float32).
Outputs are written as outputs/output_K.npy in the order {outputs}; the last line printed is JSON
with the median / min / max latency in ms over --runs runs after --warmup runs.
The runner needs only lib/ beside it (TVM {tvm} runtime, found through its rpath){libc}.
"""


def glibc_needed(binaries: Sequence[Path]) -> str | None:
    """The newest glibc symbol version the binaries ask for (``2.34``), None for none (an
    Android or static binary). The versions a binary needs are plain strings in its
    ``.gnu.version_r`` section; reading them spares a dependency on an ELF library."""
    versions = {tuple(map(int, m.groups())) for path in binaries
                for m in re.finditer(rb"GLIBC_(\d+)\.(\d+)", path.read_bytes())}
    return ".".join(map(str, max(versions))) if versions else None


def bundle_artifact(outdir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Lay out runner + runtime libraries + artifact + README for a device with no Python."""
    from lrdeploy.targets import runner as deploy_runner

    outdir, dest = Path(outdir), Path(dest)
    manifest = read_manifest(outdir)
    device = Device(**manifest["device"])
    if manifest.get("mcu"):
        raise LrdeployError(f"{outdir}: is already a C project for '{device.name}': copy it, "
                            "build with its Makefile (make lib) and call lrd_run")
    if device.family == "host" or not device.runner_compiler:
        raise LrdeployError(f"target '{device.name}' has no deployable runner (host artifacts "
                            "run in-process: lrdeploy verify)")
    if not manifest["linked"]:
        raise LrdeployError(f"{outdir}: {manifest['artifact']} is not linked; bundle needs "
                            "model.so")
    if dest.exists():
        raise LrdeployError(f"{dest}: already exists; choose a new folder")
    check_outputs(dest, inputs=[outdir])  # its folder exists, and it is not in the artifact
    runner = deploy_runner.runner_for(device)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmp:
        staged = Path(tmp) / "bundle"
        (staged / "lib").mkdir(parents=True)
        shutil.copy2(runner, staged / deploy_runner.RUNNER)
        for lib in deploy_runner.RUNTIME_LIBS:
            shutil.copy2(runner.parent / "lib" / lib, staged / "lib" / lib)
        for name in (manifest["artifact"], MANIFEST, manifest["onnx"]):
            shutil.copy2(outdir / name, staged / name)
        inputs = ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in manifest["inputs"])
        # The runner is linked by this machine's cross toolchain: a device with an older C
        # library (Raspberry Pi OS Bullseye has 2.31) cannot start it.
        libc = glibc_needed([staged / deploy_runner.RUNNER, staged / manifest["artifact"],
                             *(staged / "lib").iterdir()])
        (staged / "README.md").write_text(BUNDLE_README.format(
            name=outdir.name, device=device.description, count=len(manifest["inputs"]),
            inputs=inputs, outputs=", ".join(manifest["outputs"]), tvm=manifest["tvm_version"],
            libc=f", and glibc {libc} or newer on the device (ldd --version shows it)"
            if libc else ""))
        os.replace(staged, dest)
    return dest
