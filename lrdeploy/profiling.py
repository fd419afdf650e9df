"""Latency where the model will run: locally, or on a device over TVM RPC (direct or tracker).

Each configuration (a model on a runtime at a place) is warmed up, then timed ``runs`` times;
samples are collected one at a time so that a device lost mid-run still leaves the samples
measured before the fault in the result. TVM samples come from ``time_evaluator`` (on the device
itself for RPC); onnxruntime samples are wall time around ``InferenceSession.run`` locally.
Timings taken on an emulated device are labelled as such: they say nothing about a real board.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy import frontend, runtime
from lrdeploy.errors import LrdeployError, warn
from lrdeploy.targets.devices import get_device

RUNTIMES = ("tvm", "ort")
LAYER_KINDS = ("factorized", "dense_site", "other")
LAYER_SAMPLES = 3
Progress = Callable[[str], None]


@dataclass
class Timing:
    """One configuration: which model, on which runtime, where; its samples in ms."""

    model: str
    runtime: str
    where: str
    emulated: bool = False
    samples_ms: list[float] = field(default_factory=list)
    error: str | None = None
    max_relative_error: float | None = None  # outputs vs onnxruntime, when fetched
    device_threads: int | None = None  # as the TVM runtime on the device reports it
    layers: list[dict] = field(default_factory=list)  # --per-layer: see layer_summary
    inputs: dict[str, list[int]] = field(default_factory=dict)  # the shapes it ran at

    def layer_summary(self) -> dict[str, float] | None:
        """Share of the per-layer time spent in factorized sites, dense sites and the rest."""
        total = sum(layer["ms"] for layer in self.layers)
        if not total:
            return None
        share = {kind: sum(x["ms"] for x in self.layers if x["kind"] == kind) / total
                 for kind in LAYER_KINDS}
        return {"total_ms": total, **{f"share_{kind}": v for kind, v in share.items()}}

    def stats(self) -> dict[str, float | None]:
        s = sorted(self.samples_ms)
        if not s:
            return dict.fromkeys(("median_ms", "p90_ms", "min_ms", "max_ms", "stddev_ms"))
        return {
            "median_ms": statistics.median(s),
            "p90_ms": s[min(len(s) - 1, int(np.ceil(0.9 * len(s))) - 1)],
            "min_ms": s[0],
            "max_ms": s[-1],
            "stddev_ms": statistics.pstdev(s),
        }

    def to_dict(self) -> dict:
        return {**asdict(self), **self.stats(), "layer_summary": self.layer_summary()}


@dataclass
class ProfileResult:
    timings: list[Timing]
    device: dict[str, Any]

    @property
    def failed(self) -> list[Timing]:
        return [t for t in self.timings if t.error]

    def to_dict(self) -> dict:
        baseline = next((t.stats()["median_ms"] for t in self.timings if t.samples_ms), None)
        rows = []
        for timing in self.timings:
            row = timing.to_dict()
            median = row["median_ms"]
            row["ratio_to_first"] = median / baseline if median and baseline else None
            rows.append(row)
        return {"device": self.device, "timings": rows}


def _parse_address(text: str, option: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise LrdeployError(f"{option} {text!r}: expected HOST:PORT")
    return host, int(port)


def check_place(rpc: str | None, tracker: str | None, key: str | None) -> None:
    """Refuse a device address that cannot be used, before any work is done."""
    if rpc and tracker:
        raise LrdeployError("give --rpc or --tracker, not both")
    if tracker and not key:
        raise LrdeployError("--tracker needs --key (the device kind to request)")
    if key and not tracker:
        raise LrdeployError(f"--key {key!r} names a device of a tracker: give --tracker "
                            "HOST:PORT too")
    if rpc:
        _parse_address(rpc, "--rpc")
    if tracker:
        _parse_address(tracker, "--tracker")


class _Place:
    """Where TVM artifacts run: this process, an RPC server, or a device from a tracker."""

    def __init__(self, rpc: str | None, tracker: str | None, key: str | None,
                 timeout_s: float) -> None:
        check_place(rpc, tracker, key)
        self.rpc, self.tracker, self.key, self.timeout_s = rpc, tracker, key, timeout_s
        self.label = (f"rpc {rpc}" if rpc else f"tracker {tracker} key {key}" if tracker
                      else "local")

    @property
    def remote(self) -> bool:
        return bool(self.rpc or self.tracker)

    def release(self) -> None:
        """Close the session a finished timing leaves open. A server serves one session at a
        time (a tracker lends its board to one client), and TVM's
        VirtualMachine.get_outputs leaves a reference cycle (its recursive closure holds the
        VM, which holds the session) that only the cyclic garbage collector frees: until it
        ran, the next connection waited for the server to kill the old session at its timeout
        (120 s), as every other chain of a plan timed over RPC did, and the board stayed
        taken while the process went on."""
        if self.remote:
            gc.collect()

    def connect(self) -> Any:
        """An RPC session (remote) or None (local)."""
        from tvm import rpc

        if self.rpc:
            host, port = _parse_address(self.rpc, "--rpc")
            try:
                return rpc.connect(host, port, session_timeout=int(self.timeout_s))
            except Exception as exc:
                raise LrdeployError(f"cannot reach the RPC server at {self.rpc}: "
                                    f"{_reason(exc)}") from None
        if self.tracker:
            return self._request_from_tracker()
        return None

    def _request_from_tracker(self) -> Any:
        from tvm import rpc

        host, port = _parse_address(self.tracker, "--tracker")
        try:
            # TVM's tracker client retries a refused connection for 60 s whatever the
            # timeout: one plain attempt first tells a tracker that is not there at once.
            socket.create_connection((host, port), timeout=self.timeout_s).close()
            tracker = rpc.connect_tracker(host, port)
            summary = tracker.summary()
        except Exception as exc:
            raise LrdeployError(f"cannot reach the RPC tracker at {self.tracker}: "
                                f"{_reason(exc)}") from None
        keys = sorted(summary.get("queue_info", {}))
        if self.key not in keys:
            raise LrdeployError(f"no device with key '{self.key}' is registered at "
                                f"{self.tracker}; registered keys: {', '.join(keys) or 'none'}")
        box: dict[str, Any] = {}

        def request() -> None:
            try:
                box["session"] = tracker.request(self.key, priority=1,
                                                 session_timeout=int(self.timeout_s))
            except Exception as exc:  # reported by the waiting thread
                box["error"] = exc

        worker = threading.Thread(target=request, daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise LrdeployError(f"no free '{self.key}' device at {self.tracker} within "
                                f"{self.timeout_s:g} s (all busy?)")
        if "error" in box:
            raise LrdeployError(f"the tracker at {self.tracker} could not give a '{self.key}' "
                                f"device: {_reason(box['error'])}")
        return box["session"]


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, ConnectionRefusedError) or "Connection refused" in text or \
            ("Connect to" in text and "failed" in text):
        return "connection refused (is the server running and listening there?)"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _load_module(session: Any, path: Path) -> Any:
    """A compiled library loaded here (``session`` None) or uploaded to the RPC device."""
    import tvm

    if session is None:
        return tvm.runtime.load_module(str(path))
    session.upload(str(path))
    return session.load_module(path.name)


def _device_function(session: Any, name: str) -> Any:
    """A global function of the TVM runtime that runs the model, here or on the device."""
    import tvm

    return session.get_function(name) if session else tvm.get_global_func(name)


def _time_tvm(outdir: Path, manifest: dict, feed: runtime.Feeds, place: _Place, runs: int,
              warmup: int, threads: int | None, timing: Timing, progress: Progress,
              per_layer: bool = False, min_repeat_ms: int = 0) -> list:
    """Fill ``timing`` with samples (and layers); returns the outputs of one run (fetched from
    the device)."""
    import tvm
    from tvm import relax

    from lrdeploy.targets.host import flatten_outputs

    session = place.connect()
    try:
        progress(f"loading {manifest['artifact']} ({place.label})")
        library = _load_module(session, outdir / manifest["artifact"])
        # GPU rows run the VM on the board's CPU and the kernels on its OpenCL device.
        kind = "cl" if manifest["device"]["tvm_target"]["kind"] == "opencl" else "cpu"
        device = getattr(session, kind)() if session else getattr(tvm, kind)()
        if threads:
            _device_function(session, "runtime.config_threadpool")(1, threads)
        timing.device_threads = int(_device_function(session, "runtime.NumThreads")())
        vm = relax.VirtualMachine(library, device)
        args = [tvm.runtime.tensor(np.ascontiguousarray(feed[spec["name"]]), device)
                for spec in manifest["inputs"]]
        vm.set_input("main", *args)
        vm.invoke_stateful("main")
        outputs = flatten_outputs(vm.get_outputs("main"))
        for _ in range(max(warmup - 1, 0)):
            vm.invoke_stateful("main")
        evaluator = vm.time_evaluator("main", device, number=1, repeat=1,
                                      min_repeat_ms=min_repeat_ms)
        for index in range(runs):
            progress(f"tvm run {index + 1}/{runs} ({place.label})")
            timing.samples_ms.append(evaluator(*args).results[0] * 1e3)
        if per_layer:
            timing.layers = _tvm_layers(outdir, manifest, session, device, progress)
        return outputs
    except LrdeployError:
        raise
    except Exception as exc:
        hint = ""
        if "opencl" in str(exc) and "not registered" in str(exc):
            hint = (" (the device's TVM runtime has no OpenCL: build it with USE_OPENCL ON, "
                    "README 'Mobile GPUs')")
        raise LrdeployError(f"the run on {place.label} failed after {len(timing.samples_ms)} "
                            f"of {runs} samples: {_reason(exc)}{hint}") from None


def _tvm_layers(outdir: Path, manifest: dict, session: Any, device: Any,
                progress: Progress) -> list[dict]:
    """Each fused kernel timed on its own (TVM 0.27 has no per-operator VM profiler), on random
    arguments of the shapes recorded at compile time; ms per inference = time x calls."""
    import tvm

    if not manifest.get("kernels_library"):
        raise LrdeployError("this artifact has no kernels.so: recompile it for --per-layer")
    kernels = _load_module(session, outdir / manifest["kernels_library"])
    dense_sites = _dense_sites(outdir / manifest["onnx"])
    rng = np.random.default_rng(0)
    layers = []
    for index, kernel in enumerate(manifest["kernels"]):
        progress(f"per-layer: kernel {index + 1}/{len(manifest['kernels'])} {kernel['name']}")
        args = []
        for arg in kernel["args"]:
            dtype = np.dtype(arg["dtype"])
            # zeros are valid indices for gather-like kernels; floats get normal noise
            data = (rng.standard_normal(arg["shape"]).astype(dtype) if dtype.kind == "f"
                    else np.zeros(arg["shape"], dtype))
            args.append(tvm.runtime.tensor(data, device))
        evaluator = kernels.time_evaluator(kernel["name"], device, number=1,
                                           repeat=LAYER_SAMPLES)
        seconds = float(np.median(evaluator(*args).results))
        kind = ("factorized" if kernel["factorized"] else
                "dense_site" if dense_sites & set(kernel["sites"]) else "other")
        layers.append({"layer": kernel["name"], "calls": kernel["calls"],
                       "ms": seconds * kernel["calls"] * 1e3, "sites": kernel["sites"],
                       "kind": kind})
    return layers


def _dense_sites(model_path: Path) -> set[str]:
    """The names of the model's factorizable sites: what both runtimes' per-layer tables call
    a dense site (not every operator with a weight, e.g. a depthwise Conv)."""
    from lrdeploy.sites import find_sites

    return {site.name for site in find_sites(frontend.load_onnx(model_path)).sites}


def _ort_layers(model_path: Path, feed: runtime.Feeds, threads: int | None) -> list[dict]:
    """Per ONNX node time from onnxruntime's own profiler, averaged over a few runs after a
    warm-up.

    The profiling session keeps onnxruntime's graph rewrites at the basic level: its fusions
    and layout passes rename nodes after values ("hardtanh_2_nchwc"), which would hide the
    sites; the per-node sum can therefore exceed the optimized latency."""
    import json

    import onnxruntime as ort

    from lrdeploy.passes.base import site_of_node

    dense_sites = _dense_sites(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.profile_file_prefix = str(Path(tmp) / "ort")
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(model_path), options,
                                       providers=["CPUExecutionProvider"])
        for _ in range(LAYER_SAMPLES + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, dict] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        node = event["name"][: -len("_kernel_time")]
        entry = totals.setdefault(node, {"us": [], "op": event["args"].get("op_name", "")})
        entry["us"].append(event["dur"])
    layers = []
    for node, entry in totals.items():
        site, factorized = site_of_node(node)
        kind = ("factorized" if factorized else "dense_site" if node in dense_sites else "other")
        # The first run is the warm-up (a cold node took 88 us, then 12, 5, 5): left out.
        per_run = max(1, len(entry["us"]) // (LAYER_SAMPLES + 1))
        mean_ms = sum(entry["us"][per_run:]) / LAYER_SAMPLES / 1e3
        layers.append({"layer": node, "calls": 1, "ms": mean_ms,
                       "sites": [site] if kind != "other" else [], "kind": kind,
                       "op": entry["op"]})
    return layers


def _time_ort(model_path: Path, feed: runtime.Feeds, runs: int, warmup: int,
              threads: int | None, timing: Timing, progress: Progress) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        session.run(None, feed)
    for index in range(runs):
        progress(f"onnxruntime run {index + 1}/{runs}")
        start = time.perf_counter()
        session.run(None, feed)
        timing.samples_ms.append((time.perf_counter() - start) * 1e3)


def profile(
    items: Sequence[str | os.PathLike[str]],
    *,
    target: str = "host",
    runtimes: Sequence[str] = ("tvm",),
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    timeout_s: float = 120.0,
    emulated: bool = False,
    per_layer: bool = False,
    min_repeat_ms: int = 0,
    device_file: str | os.PathLike[str] | None = None,
    input_shapes: dict | None = None,
    seed: int = 0,
    dtype: str = "float32",
    sample_schedules: bool = False,
    compared: bool = True,
    progress: Progress = lambda message: None,
) -> ProfileResult:
    """Time each item (an artifact folder from ``compile``, or an ``.onnx``) on each runtime.

    A fault (unreachable server, device lost, timeout) stops the profile: the timings measured
    so far are kept, the failing one carries the error, and the result's ``failed`` is not empty.
    ``emulated`` says the RPC device is an emulator (its timings are labelled so);
    ``per_layer`` adds per-kernel (TVM) and per-node (onnxruntime) times, mapped to sites.
    ``min_repeat_ms`` makes each TVM sample repeat the model until it has run that long and
    report the mean (steadier figures for very fast models). ``dtype`` is the precision an
    ``.onnx`` item is compiled at (``compile --dtype``), and ``sample_schedules`` gives its
    kernels sampled schedules (``compile --sample-schedules``). Items that ran at different
    shapes are warned of, as their ratios compare unlike work, unless not ``compared`` (a
    planner's chains, each timed for itself).
    """
    from lrdeploy.deploy import MANIFEST, compile_model, read_manifest
    from lrdeploy.verify import compare_outputs, reference_outputs

    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown or not runtimes:
        raise LrdeployError(f"--runtime must be one of {', '.join(RUNTIMES)}")
    if runs < 1 or warmup < 0:
        raise LrdeployError("--runs must be >= 1 and --warmup >= 0")
    if threads is not None and threads < 1:
        raise LrdeployError(f"--threads {threads}: must be 1 or more")
    if not timeout_s > 0:
        raise LrdeployError(f"--timeout {timeout_s:g}: must be above 0 seconds")
    place = _Place(rpc, tracker, key, timeout_s)
    if place.remote and "tvm" not in runtimes:
        raise LrdeployError("--rpc / --tracker reach a device for --runtime tvm; onnxruntime "
                            "times this machine: add --runtime tvm, or drop them")
    if emulated and not place.remote:
        raise LrdeployError("--emulated labels the device behind --rpc / --tracker as an "
                            "emulator; give one of those (local timings are this machine's)")
    result = ProfileResult([], {"where": place.label, "target": target,
                                "emulated": emulated and place.remote})
    manifests = {}
    for item in map(Path, items):
        if item.is_dir() or (item / MANIFEST).exists():
            manifests[item] = read_manifest(item)
        elif item.suffix != ".onnx":
            raise LrdeployError(f"{item}: neither an artifact folder nor an .onnx file")
    if input_shapes is not None and len(manifests) == len(items):
        raise LrdeployError("--input-shape sizes .onnx items; an artifact runs at the shapes it "
                            "was compiled for: drop --input-shape")
    if "tvm" in runtimes:  # before anything is timed: these are known now
        for item, manifest in manifests.items():
            _check_timeable(str(item), manifest["device"], place, manifest["linked"])
        if len(manifests) < len(items):  # .onnx items are compiled for the target
            _check_timeable(target, get_device(target, device_file).to_dict(), place)
    # An .onnx beside artifacts runs at their shapes (when they agree), not at the defaults
    # for dynamic axes: "vs first" then compares like with like.
    fixed = {json.dumps(m["inputs"]) for m in manifests.values()}
    beside = ({s["name"]: s["shape"] for s in next(iter(manifests.values()))["inputs"]}
              if len(fixed) == 1 else {})
    with tempfile.TemporaryDirectory() as tmp:
        for item in map(Path, items):
            manifest = manifests.get(item)
            outdir, onnx_path = (item, item / manifest["onnx"]) if manifest else (None, item)
            model = frontend.load_onnx(onnx_path)
            if manifest is not None:
                shapes = {s["name"]: s["shape"] for s in manifest["inputs"]}
            elif input_shapes is not None:
                shapes = input_shapes
            else:
                names = {v.name for v in runtime.graph_inputs(model)}
                shapes = {name: shape for name, shape in beside.items() if name in names}
            specs = runtime.input_specs(model, shapes)
            feed = runtime.random_inputs(model, specs, seed)
            inputs = {name: list(value.shape) for name, value in feed.items()}
            for name in runtimes:
                if name == "ort":
                    timing = Timing(str(item), "onnxruntime", "local", inputs=inputs)
                    result.timings.append(timing)
                    _time_ort(onnx_path, feed, runs, warmup, threads, timing, progress)
                    if per_layer:
                        timing.layers = _ort_layers(onnx_path, feed, threads)
                    continue
                if manifest is None:
                    progress(f"compiling {item.name} for {target}")
                    outdir = Path(tmp) / f"{len(result.timings)}-{item.stem}"
                    manifest = compile_model(item, target, outdir, device_file=device_file,
                                             input_shapes=inputs, dtype=dtype,
                                             sample_schedules=sample_schedules)
                    _check_timeable(target, manifest["device"], place, manifest["linked"])
                device = manifest["device"]
                timing = Timing(str(item), "tvm", f"{device['name']} via {place.label}",
                                emulated and place.remote, inputs=inputs)
                result.timings.append(timing)
                try:
                    outputs = _time_tvm(outdir, manifest, feed, place, runs, warmup, threads,
                                        timing, progress, per_layer, min_repeat_ms)
                except LrdeployError as exc:
                    timing.error = str(exc)
                    return result
                finally:
                    place.release()
                names, reference, unoptimized = reference_outputs(model, [feed])
                fidelity = compare_outputs(names, reference, [outputs], unoptimized)
                timing.max_relative_error = max(f.relative_l2_error for f in fidelity)
    shapes_run = {t.model: t.inputs for t in result.timings}  # an item's runtimes share them
    if compared and len({json.dumps(inputs, sort_keys=True)
                         for inputs in shapes_run.values()}) > 1:
        hint = ("an artifact runs at the shapes it was compiled for, whatever --input-shape "
                "says: compile it at these" if manifests and input_shapes is not None
                else "give --input-shape")
        warn("the items ran at different input shapes, so 'vs first' compares unlike work: "
             + "; ".join(f"{Path(model).name} {_shapes_text(inputs)}"
                         for model, inputs in shapes_run.items()) + f" ({hint})")
    return result


def _check_timeable(item: str, device: dict, place: _Place, linked: bool = True) -> None:
    """Refuse a TVM timing that cannot happen from here, naming the item (an artifact, or the
    target an .onnx is compiled for)."""
    if device["family"] == "mcu":
        raise LrdeployError(f"{item}: {device['name']} C projects are not timed by lrdeploy (no "
                            "TVM runtime on the board to reach over RPC); time lrd_run on the "
                            "board, e.g. with the DWT cycle counter, or profile --runtime ort")
    if not place.remote and device["family"] != "host":
        raise LrdeployError(f"{item}: runs on {device['name']} ({device['triple']}); profile it "
                            "with --rpc or --tracker on that device")
    if not linked:  # the device would have to link it, and a phone has no compiler
        raise LrdeployError(f"{item}: model.tar is not linked into model.so (set "
                            "ANDROID_NDK_HOME and compile again) and cannot be sent to a device")


def _shapes_text(inputs: dict[str, list[int]]) -> str:
    return ", ".join(f"{name}={'x'.join(map(str, shape))}" for name, shape in inputs.items())
