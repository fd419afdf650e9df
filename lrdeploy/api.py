"""The Python API: ``load``, ``analyze`` and ``compress`` (the CLI is a thin layer over these).

Data flow: source -> ``frontend`` (canonical ONNX) -> ``analysis`` (sites, spectra) -> ``plan``
(method and ranks per site) -> passes -> ``verify`` (checker + onnxruntime vs the original)
-> atomic write of the model, the report and the plan.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from lrdeploy import frontend, runtime
from lrdeploy.analysis import ModelAnalysis, analyze_model
from lrdeploy.errors import LrdeployError
from lrdeploy.fileio import same_file, write_json
from lrdeploy.plan import Plan, apply_plan, make_plan
from lrdeploy.ranks import parse_rank_rule
from lrdeploy.report import build_report
from lrdeploy.sites import initializer_bytes
from lrdeploy.verify import OutputFidelity, check_onnx, compare

# Above this many initializer bytes, weights go to a side file: protobuf cannot hold 2 GiB.
EXTERNAL_DATA_THRESHOLD = 1 << 30

ModelSource = Any  # a path to .onnx, "file.py:factory", a torch.nn.Module, ModelProto or ir.Model


@dataclass
class Loaded:
    """The model as given (the verification reference) and its canonical form."""

    source: str
    original: ir.Model
    canonical: ir.Model
    input_path: Path | None


def load(
    model: ModelSource,
    example_inputs: Sequence[Any] | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
) -> Loaded:
    """Load any supported source; torch modules are traced with ``example_inputs`` (or random
    tensors of ``input_shapes``)."""
    input_path = None
    if isinstance(model, ir.Model):
        source, original = "<onnx_ir.Model>", model
    elif isinstance(model, onnx.ModelProto):
        source, original = "<onnx.ModelProto>", ir.serde.deserialize_model(model)
    elif isinstance(model, str | os.PathLike) and _looks_like_factory(str(model)):
        source = str(model)
        original = _trace(frontend.load_torch_factory(source), example_inputs, input_shapes)
    elif isinstance(model, str | os.PathLike):
        source, input_path = str(model), Path(model)
        original = frontend.load_onnx(input_path)
    elif _is_torch_module(model):
        source = f"<torch {type(model).__name__}>"
        original = _trace(model, example_inputs, input_shapes)
    else:
        raise LrdeployError(f"cannot load a model from {type(model).__name__}")
    return Loaded(source, original, frontend.canonicalize(original), input_path)


def _looks_like_factory(text: str) -> bool:
    file_part, sep, name = text.rpartition(":")
    return bool(sep) and file_part.endswith(".py") and name.isidentifier()


def _is_torch_module(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] != "builtins" and hasattr(obj, "state_dict") \
        and hasattr(obj, "forward")


def _trace(module: Any, example_inputs, input_shapes) -> ir.Model:
    import torch

    if example_inputs is None:
        if not input_shapes:
            raise LrdeployError("a torch model needs example inputs or --input-shape to be traced")
        generator = torch.Generator().manual_seed(0)
        example_inputs = [torch.randn(*shape, generator=generator) for shape in input_shapes]
    return frontend.export_torch(module, example_inputs)


def analyze(
    model: ModelSource,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    example_inputs: Sequence[Any] | None = None,
) -> ModelAnalysis:
    """Sites, skipped operators and spectra of ``model`` at the given input shapes."""
    loaded = load(model, example_inputs, _torch_shapes(input_shapes))
    return analyze_model(loaded.canonical, input_shapes if loaded.input_path else None)


def _torch_shapes(input_shapes) -> list[Sequence[int]] | None:
    return list(input_shapes.values()) if input_shapes else None


@dataclass
class CompressResult:
    model: ir.Model
    plan: Plan
    analysis: ModelAnalysis
    fidelity: list[OutputFidelity]
    report: dict
    output: Path | None

    @property
    def min_cosine(self) -> float:
        return min((f.cosine for f in self.fidelity), default=1.0)


def compress(
    model: ModelSource,
    output: str | os.PathLike[str] | None = None,
    *,
    rank: str = "energy:0.9",
    method: str = "auto",
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
    plan: Plan | str | os.PathLike[str] | None = None,
    guard: bool = True,
    tucker_sweeps: int = 0,
    calib: str | os.PathLike[str] | None = None,
    samples: int = 2,
    min_fidelity: float | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    example_inputs: Sequence[Any] | None = None,
    report: str | os.PathLike[str] | None = None,
    save_plan: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> CompressResult:
    """Factorize ``model``'s dense sites, verify the result and (if ``output``) write it.

    Nothing is written when the result fails the ONNX checker, onnxruntime, or
    ``min_fidelity`` (the smallest cosine similarity over the outputs).
    """
    rule = parse_rank_rule(rank)
    loaded = load(model, example_inputs, _torch_shapes(input_shapes))
    if output is not None:
        _check_output_path(Path(output), loaded.input_path, report, save_plan)
    onnx_shapes = input_shapes if loaded.input_path else None
    calib_feeds = None
    if calib is not None:
        specs = runtime.input_specs(loaded.canonical, onnx_shapes)
        calib_feeds = runtime.load_calibration(calib, specs)
    analysis = analyze_model(loaded.canonical, onnx_shapes, seed,
                             calib_feeds[0] if calib_feeds else None)
    if isinstance(plan, str | os.PathLike):
        plan_source = f"plan {plan}"
        plan = Plan.load(plan)
    elif plan is not None:
        plan_source = "plan given by the caller"
    else:
        plan_source = f"--rank {rule} --method {method}"
        plan = make_plan(analysis, rule, method, only, skip, guard, tucker_sweeps)
    compressed = apply_plan(loaded.canonical, plan, analysis.sites)
    check_onnx(compressed)
    if calib_feeds is not None:
        feeds = calib_feeds
        feed_source = f"{len(feeds)} feed(s) from {calib}"
    else:
        feeds = [runtime.random_inputs(loaded.original, analysis.specs, seed + i)
                 for i in range(samples)]
        feed_source = f"{samples} random feed(s), seed {seed}"
    fidelity = compare(loaded.original, compressed, feeds)
    result_report = build_report(
        source=loaded.source, output=output, plan_source=plan_source,
        analysis=analysis, plan=plan, compressed=compressed, fidelity=fidelity,
        feed_source=feed_source, feeds=len(feeds),
    )
    result = CompressResult(compressed, plan, analysis, fidelity, result_report,
                            Path(output) if output is not None else None)
    if min_fidelity is not None and result.min_cosine < min_fidelity:
        raise LrdeployError(
            f"fidelity {result.min_cosine:.6f} (cosine) is below --min-fidelity {min_fidelity}: "
            "nothing written"
        )
    if output is not None:
        save_model(compressed, Path(output))
    if report is not None:
        write_json(report, result_report)
    if save_plan is not None:
        write_json(save_plan, plan.to_dict())
    return result


def _check_output_path(output: Path, input_path: Path | None, *others) -> None:
    if output.suffix != ".onnx":
        raise LrdeployError(f"{output}: the output file name must end in .onnx")
    if input_path is not None and same_file(output, input_path):
        raise LrdeployError(f"{output}: is the input model; choose another output path")
    for other in others:
        if other is not None and same_file(other, output):
            raise LrdeployError(f"{other}: is also the output model path")
    if not output.parent.is_dir():
        raise LrdeployError(f"{output}: output folder {output.parent} does not exist")


def save_model(model: ir.Model, output: Path) -> None:
    """Write atomically: into a temporary folder beside ``output``, then rename into place."""
    large = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = f"{output.name}.data" if large else None
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        staged = Path(tmp) / output.name
        if data_name:
            ir.save(model, staged, external_data=data_name)
            os.replace(Path(tmp) / data_name, output.parent / data_name)
        else:
            ir.save(model, staged)
        os.replace(staged, output)
