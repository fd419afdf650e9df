"""Latency models: what a site's operator chain, or a whole model, costs on a device.

Three engines, one interface (``chain_ms`` for many small models, ``model_ms`` for one):

    onnxruntime   measured here with onnxruntime (the host runs the ONNX model itself)
    tvm           compiled by TVM for the device and timed through the profile machinery:
                  in-process for ``host``, over RPC (direct or tracker) for a board
    roofline      estimated from the device table, per node:
                  ``t = max(FLOPs / peak, bytes moved / bandwidth) + launch``; labelled an
                  estimate, for devices that cannot be reached

A GPU model compiled in half precision (``compile --dtype float16``) is planned at it: the tvm
engine compiles each chain in float16, the roofline takes the device's half-precision peak and
2-byte values.

Measured figures are cached on disk per device, engine and board (``$LRDEPLOY_CACHE/latency/``),
keyed by the chain's structure (operators, attributes, shapes; not weight values), so a second
plan for the same device re-measures nothing; a table is stamped with what else its figures
depend on (engine version, device row, the host's CPU) and measured again when that changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from lrdeploy import runtime
from lrdeploy.errors import LrdeployError, warn
from lrdeploy.fileio import write_json
from lrdeploy.profiling import check_place
from lrdeploy.targets.devices import Device, host_cpu_model

ENGINES = ("onnxruntime", "tvm", "roofline")
# Per-node dispatch cost the roofline adds: small kernels are bound by it, not by FLOPs.
ROOFLINE_LAUNCH_US = 5.0
# pair_ms: single-threaded sessions take turns of one run, at least MIN_RUN_PAIRS pairs;
# multi-threaded ones turns of TURN_S of runs back to back (after 3 warm-up runs), at least
# MIN_TURN_PAIRS pairs.
MIN_RUN_PAIRS = 20
TURN_S = 0.2
MIN_TURN_PAIRS = 6
Progress = Callable[[str], None]


def structure_key(model: ir.Model) -> str:
    """A digest of what decides a model's latency: operators, attributes and shapes."""
    parts = [repr([(v.name, str(v.shape), str(v.type)) for v in model.graph.inputs])]
    for node in model.graph:
        attributes = sorted((a.name, repr(a.value)) for a in node.attributes.values())
        shapes = [None if v is None else str(v.shape) for v in node.inputs]
        parts.append(f"{node.domain}:{node.op_type}{attributes}{shapes}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


class LatencyTable:
    """Measured milliseconds by structure key, persisted as JSON (one file per device/engine/board),
    stamped with what the figures were measured with (``LatencyModel.stamp``): a table measured
    with another engine version, another device row or on another CPU is re-measured, not
    trusted, and ``discarded`` says how many figures it held."""

    def __init__(self, path: Path | None, stamp: str = "") -> None:
        self.path = path
        self.stamp = stamp
        self.entries: dict[str, float] = {}
        self.discarded = 0
        if path is None or not path.is_file():
            return
        try:
            saved = json.loads(path.read_text())
            entries = {k: float(v) for k, v in saved["entries"].items()}
        except (ValueError, AttributeError, KeyError, TypeError):
            return  # a damaged cache, or one from before stamps, is re-measured
        if saved.get("stamp") == stamp:
            self.entries = entries
        else:
            self.discarded = len(entries)

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {"stamp": self.stamp, "entries": self.entries})


def cache_path(device: Device, engine: str) -> Path:
    from lrdeploy.targets.runner import cache_root

    return cache_root() / "latency" / f"{device.name}-{engine}.json"


class LatencyModel:
    """Base: subclasses time (or estimate) a list of models; this class caches the figures."""

    engine = ""
    package = ""  # the distribution whose version the figures depend on
    estimate = False

    threads: int | None = None  # runtime threads the figures were timed with (None: default)
    dtype = "float32"  # the precision the device runs the model at
    board = ""  # which board of the device's kind timed them: a tracker key or an RPC address
    schedules = ""  # how TVM scheduled the chains: "" (none, untuned) or "sampled"

    def __init__(self, device: Device, cache: bool = True) -> None:
        self.device = device
        # Figures timed with a set thread count, at half precision or on another board (an
        # emulator registered under its own key, say) are their own table: none may stand in
        # for a real board's figures.
        name = self.engine + (f"-{self.threads}t" if self.threads else "") + (
            f"-{self.dtype}" if self.dtype != "float32" else "") + (
            f"-{self.schedules}" if self.schedules else "") + (
            "@" + re.sub(r"[^A-Za-z0-9._-]", "_", self.board) if self.board else "")
        self.table = (LatencyTable(cache_path(device, name), self.stamp()) if cache
                      else LatencyTable(None))
        if self.table.discarded:
            warn(f"{self.table.path}: its {self.table.discarded} chain timings were measured "
                 f"with another engine version, device row or CPU; re-measuring them")
        self.measured = 0  # chains timed by this instance (not found in the cache)
        self.reused = 0

    def stamp(self) -> str:
        """What the figures depend on besides a chain's structure: the engine's version, the
        device's row, and for the host this machine's CPU."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            engine = f"{self.package} {version(self.package)}"
        except PackageNotFoundError:
            engine = f"{self.package} (version unknown)"
        row = {k: v for k, v in self.device.to_dict().items() if k != "description"}
        digest = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode())
        cpu = f"; cpu {host_cpu_model()}" if self.device.family == "host" else ""
        return f"{engine}; device {self.device.name} {digest.hexdigest()[:12]}{cpu}"

    @property
    def label(self) -> str:
        threads = f", {self.threads} thread{'s' * (self.threads > 1)}" if self.threads else ""
        dtype = f", {self.dtype}" if self.dtype != "float32" else ""
        schedules = f", {self.schedules} schedules" if self.schedules else ""
        # No parentheses: the label is itself set in parentheses (budget line, table header).
        board = f", {self.board}" if self.board else ""
        return f"{self.engine} on {self.device.name}{board}{threads}{dtype}{schedules}" + (
            ", an estimate" if self.estimate else "")

    def chain_ms(self, models: Sequence[ir.Model], progress: Progress = lambda m: None
                 ) -> list[float]:
        """Latency of each model, from the cache where it holds the model's structure."""
        keys = [structure_key(m) for m in models]
        todo = {k: m for k, m in zip(keys, models, strict=True) if k not in self.table.entries}
        self.reused += len(models) - len(todo)
        if todo:
            figures = self._time(list(todo.values()), progress)
            self.table.entries.update(zip(todo, figures, strict=True))
            self.measured += len(todo)
            self.table.save()
        return [self.table.entries[k] for k in keys]

    def model_ms(self, model: ir.Model, feed: runtime.Feeds) -> float:
        """Latency of a whole model (never cached: it is what the plan is checked against)."""
        return self._time([model], lambda m: None, feed)[0]

    def side_by_side_ms(self, models: Sequence[ir.Model], feed: runtime.Feeds, rounds: int = 3
                        ) -> list[float]:
        """Whole models timed in interleaved rounds (each round times each model once), the
        least per model: load that comes and goes hits all of them alike, and the round it
        disturbed least is the model's own cost."""
        samples = [[] for _ in models]
        for _ in range(rounds):
            for index, model in enumerate(models):
                samples[index].append(self.model_ms(model, feed))
        return [min(s) for s in samples]

    def pair_ms(self, model: ir.Model, reference: ir.Model, feed: runtime.Feeds
                ) -> tuple[float, float]:
        """``model`` timed beside ``reference``: (model ms, reference ms). What a budget check
        relies on is their ratio, which load that hits both alike does not move."""
        model_ms, reference_ms = self.side_by_side_ms([model, reference], feed)
        return model_ms, reference_ms

    def _time(self, models: list[ir.Model], progress: Progress,
              feed: runtime.Feeds | None = None) -> list[float]:
        raise NotImplementedError


def _random_feed(model: ir.Model) -> runtime.Feeds:
    return runtime.random_inputs(model, runtime.input_specs(model))


class OnnxruntimeLatency(LatencyModel):
    """Wall time of ``InferenceSession.run`` here; only the host can be measured this way."""

    engine = "onnxruntime"
    package = "onnxruntime"

    def __init__(self, device: Device, cache: bool = True, min_time_s: float = 0.3,
                 min_runs: int = 10, threads: int | None = None) -> None:
        self.threads = threads
        if device.family != "host":
            raise LrdeployError(f"the onnxruntime engine measures this machine only; for "
                                f"'{device.name}' use --engine tvm (with --rpc/--tracker) or "
                                "--engine roofline")
        super().__init__(device, cache)
        self.min_time_s = min_time_s
        self.min_runs = min_runs

    def side_by_side_ms(self, models, feed, rounds=3):
        sessions = [self._session(model) for model in models]
        samples = [[time_session(session, feed, self.min_time_s, self.min_runs)
                    for session in sessions] for _ in range(rounds)]
        return [min(column) for column in zip(*samples, strict=True)]

    def pair_ms(self, model, reference, feed, min_time_s: float = 3.0):
        """The two sessions take turns (ABBA, so neither always goes first), and the model's
        time is the median ratio within a pair of turns times the reference's time from runs
        back to back, as ``side_by_side_ms`` and a deployed model run it: load on a shared
        machine comes and goes and hits both turns of a pair alike. Measured on this 2-core VM,
        two fresh sessions of MobileNetV2 compared in single-run turns differ by about 1%;
        compared as two medians timed one after the other, by 5% and at times more.

        A turn is a single run only for single-threaded sessions (``threads=1``). A run that
        follows another session's is slower, and with a pool of threads unevenly so: with two
        threads, paraphrase-MiniLM-L3's single alternating runs read 1.30 times its runs back
        to back (median of 8; 1.03 with one thread), and a plan of it read a median 0.660 of
        the dense model in single-run turns where runs back to back read 0.765 (seven timings
        of each, interleaved): plans measured within a budget ran over it when deployed. So a
        multi-threaded turn is ``TURN_S`` of runs back to back after 3 warm-up runs, and at
        least ``MIN_TURN_PAIRS`` pairs are timed: the same plan then read 0.794 (0.750 to
        0.832). Shorter turns did not do: 8 runs with the first 2 dropped read 0.59 to 0.87."""
        sessions = (self._session(model), self._session(reference))
        for session in sessions:
            _warm_up(session, feed)
        single_runs = self.threads == 1
        min_pairs = MIN_RUN_PAIRS if single_runs else MIN_TURN_PAIRS

        def turn(session) -> float:
            if single_runs:
                return _run_ms(session, feed)
            return time_session(session, feed, TURN_S, 3)

        ratios = []
        started = time.perf_counter()
        while len(ratios) < min_pairs or (time.perf_counter() - started < min_time_s
                                          and len(ratios) < 2000):
            order = (0, 1) if len(ratios) % 2 == 0 else (1, 0)
            runs = [0.0, 0.0]
            for index in order:
                runs[index] = turn(sessions[index])
            ratios.append(runs[0] / runs[1])
        reference_ms = time_session(sessions[1], feed, self.min_time_s, self.min_runs)
        return statistics.median(ratios) * reference_ms, reference_ms

    def _time(self, models, progress, feed=None):
        if feed is not None:
            return [time_session(self._session(models[0]), feed, 1.0, self.min_runs)]
        figures = []
        for index, model in enumerate(models):
            progress(f"timing chain {index + 1}/{len(models)} with onnxruntime")
            data = _random_feed(model)
            # A chain timed on its own also pays session.run's fixed cost and the input copy,
            # which it does not pay inside the model: time them (an Identity on the same
            # inputs) and keep the difference.
            chain = time_session(self._session(model), data, self.min_time_s, self.min_runs)
            call = time_session(self._session(_identity_of(model)), data, self.min_time_s,
                                self.min_runs)
            figures.append(max(chain - call, 0.0))
        return figures


    def _session(self, model: ir.Model):
        return runtime.session(model, threads=self.threads)


def _identity_of(model: ir.Model) -> ir.Model:
    """A model with ``model``'s inputs that only passes them through."""
    inputs = [ir.Value(name=v.name, shape=v.shape, type=v.type) for v in model.graph.inputs]
    nodes = [ir.node("Identity", [v]) for v in inputs]
    graph = ir.Graph(inputs, [n.outputs[0] for n in nodes], nodes=nodes,
                     opset_imports=dict(model.opset_imports), name="identity")
    for index, node in enumerate(nodes):
        node.outputs[0].name, node.outputs[0].type = f"out{index}", inputs[index].type
    return ir.Model(graph, ir_version=model.ir_version)


def time_session(session, feed: runtime.Feeds, min_time_s: float, min_runs: int) -> float:
    """Median ms of ``session.run`` over at least ``min_runs`` runs and ``min_time_s``."""
    _warm_up(session, feed)
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < min_runs or (time.perf_counter() - started < min_time_s
                                      and len(samples) < 1000):
        samples.append(_run_ms(session, feed))
    return statistics.median(samples)


def _warm_up(session, feed: runtime.Feeds) -> None:
    for _ in range(3):  # the first runs allocate and pack weights
        session.run(None, feed)


def _run_ms(session, feed: runtime.Feeds) -> float:
    begin = time.perf_counter()
    session.run(None, feed)
    return (time.perf_counter() - begin) * 1e3


class TvmLatency(LatencyModel):
    """Each model compiled for the device and timed by ``lrdeploy.profiling`` (local or RPC)."""

    engine = "tvm"
    package = "apache-tvm"

    def __init__(self, device: Device, cache: bool = True, rpc: str | None = None,
                 tracker: str | None = None, key: str | None = None, runs: int = 10,
                 device_file: str | os.PathLike[str] | None = None,
                 threads: int | None = None, dtype: str = "float32",
                 sample_schedules: bool = False) -> None:
        self.threads = threads
        self.dtype = dtype
        # Chains compiled as compile --sample-schedules will compile the model.
        self.schedules = "sampled" if sample_schedules else ""
        self.board = f"rpc {rpc}" if rpc else f"key {key}" if tracker else ""
        if device.family != "host" and not (rpc or tracker):
            raise LrdeployError(f"measuring on '{device.name}' needs its RPC server (--rpc "
                                "HOST:PORT or --tracker HOST:PORT --key KEY); without one use "
                                "--engine roofline")
        super().__init__(device, cache)
        self.place = {"rpc": rpc, "tracker": tracker, "key": key}
        self.runs = runs
        self.device_file = device_file

    def _time(self, models, progress, feed=None):
        from lrdeploy.profiling import profile

        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for index, model in enumerate(models):
                path = Path(tmp) / f"chain{index}.onnx"
                ir.save(model, path)
                paths.append(path)
            result = profile(paths, target=self.device.name, runtimes=("tvm",), runs=self.runs,
                             device_file=self.device_file, min_repeat_ms=20, progress=progress,
                             threads=self.threads, dtype=self.dtype,
                             sample_schedules=bool(self.schedules), compared=False,
                             **self.place)
        if result.failed:
            raise LrdeployError(f"timing on {self.device.name} failed: {result.failed[0].error}")
        return [t.stats()["median_ms"] for t in result.timings]


class RooflineLatency(LatencyModel):
    """An estimate from the device's peak FLOP/s and memory bandwidth; nothing is measured."""

    engine = "roofline"
    estimate = True

    def __init__(self, device: Device, cache: bool = False, dtype: str = "float32") -> None:
        self.dtype = dtype
        super().__init__(device, cache=False)

    def _time(self, models, progress, feed=None):
        shapes = None if feed is None else {k: v.shape for k, v in feed.items()}
        value_bytes = 2 if self.dtype == "float16" else 4
        return [sum(self.node_ms(*cost) for cost in node_costs(m, shapes, value_bytes))
                for m in models]

    def node_ms(self, flops: float, nbytes: float) -> float:
        compute = flops / (self.device.peak_gflops_at(self.dtype) * 1e6)
        memory = nbytes / (self.device.bandwidth_gbs * 1e6)
        return max(compute, memory) + ROOFLINE_LAUNCH_US / 1e3


# Operators that read only the part of their first input they return (rows of an embedding
# table, a window): they move the output's bytes from it, not the whole input's.
PARTIAL_READS = ("Gather", "GatherElements", "GatherND", "Slice")


def node_costs(model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None,
               value_bytes: int = 4) -> list[tuple[float, float]]:
    """(FLOPs, bytes read and written) of every node at the given input shapes (defaults as
    ``runtime.input_specs``), ``value_bytes`` a value. Shapes come from ONNX shape inference,
    and where it leaves some unknown (a transformer's batch axis lost through a Slice of a
    buffer, after which no MatMul has a shape), from one onnxruntime run on random inputs."""
    specs = runtime.input_specs(model, input_shapes)
    proto = ir.serde.serialize_model(model)
    for value in proto.graph.input:
        spec = next((s for s in specs if s.name == value.name), None)
        if spec is not None:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, spec.shape, strict=False):
                dim.ClearField("dim_param")
                dim.dim_value = size
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    sizes: dict[str, tuple[int, ...]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            sizes[value.name] = tuple(d.dim_value for d in dims)
    for init in inferred.graph.initializer:
        sizes[init.name] = tuple(init.dims)
    unknown = {name for node in inferred.graph.node for name in [*node.input, *node.output]
               if name and name not in sizes}
    if unknown:
        feed = runtime.random_inputs(model, specs)
        sizes.update(runtime.probe_shapes(model, feed, sorted(unknown)))
    costs = []
    for node in inferred.graph.node:
        ins = [sizes.get(name) for name in node.input if name]
        outs = [sizes.get(name) for name in node.output if name]
        read = ([outs[0], *ins[1:]] if node.op_type in PARTIAL_READS and outs else ins)
        nbytes = float(value_bytes) * sum(math.prod(s) for s in [*read, *outs] if s is not None)
        costs.append((_node_flops(node, ins, outs), nbytes))
    return costs


def _node_flops(node: onnx.NodeProto, ins: list, outs: list) -> float:
    if not outs or outs[0] is None:
        return 0.0
    out = math.prod(outs[0])
    if node.op_type in ("MatMul", "Gemm") and len(ins) > 1 and ins[0] is not None:
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        inner = ins[0][-2] if trans_a else ins[0][-1]
        return 2.0 * out * inner
    if node.op_type == "Conv" and len(ins) > 1 and ins[1] is not None:
        return 2.0 * out * float(np.prod(ins[1][1:]))
    return float(out)


def check_engine(engine: str | None, rpc: str | None, tracker: str | None, key: str | None,
                 sample_schedules: bool = False) -> None:
    """Refuse a device address that cannot be used, or one (or sampled schedules) the engine
    would ignore."""
    check_place(rpc, tracker, key)
    if engine not in (None, "tvm") and (rpc or tracker):
        raise LrdeployError(f"--engine {engine} does not use a device server; --rpc and "
                            "--tracker are for --engine tvm")
    if engine not in (None, "tvm") and sample_schedules:
        raise LrdeployError(f"--sample-schedules is how TVM compiles the timed chains: it "
                            f"needs --engine tvm, not {engine}")


def latency_model(
    device: Device,
    engine: str | None = None,
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    cache: bool = True,
    device_file: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    dtype: str = "float32",
    sample_schedules: bool = False,
) -> LatencyModel:
    """The engine asked for, or the default: TVM over RPC when a device server is given,
    else onnxruntime on the host and the roofline estimate on other devices; ``dtype`` is the
    precision the model will be compiled at (float16 only for GPU targets, never run by
    onnxruntime here)."""
    check_engine(engine, rpc, tracker, key, sample_schedules)
    if engine is None:
        engine = ("tvm" if rpc or tracker or (sample_schedules and device.family == "host") else
                  "onnxruntime" if device.family == "host" else "roofline")
    if engine == "onnxruntime":
        return OnnxruntimeLatency(device, cache, threads=threads)
    if engine == "tvm":
        return TvmLatency(device, cache, rpc, tracker, key, device_file=device_file,
                          threads=threads, dtype=dtype, sample_schedules=sample_schedules)
    if engine == "roofline":
        return RooflineLatency(device, dtype=dtype)
    raise LrdeployError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
