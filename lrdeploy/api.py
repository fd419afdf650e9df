"""The Python API: ``load``, ``analyze`` and ``compress`` (the CLI is a thin layer over these).

Data flow: source -> ``frontend`` (canonical ONNX) -> ``analysis`` (sites, spectra) -> ``plan``
(method and ranks per site) -> passes -> ``verify`` (checker + onnxruntime vs the original)
-> atomic write of the model, the report and the plan.
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from lrdeploy import frontend, runtime
from lrdeploy.analysis import ModelAnalysis, analyze_model
from lrdeploy.calibration import padding_mask_input, site_statistics, split_calibration
from lrdeploy.errors import LrdeployError, warn
from lrdeploy.fileio import check_outputs, write_json
from lrdeploy.latency import check_engine
from lrdeploy.plan import Plan, apply_plan, make_plan
from lrdeploy.planner import PlanOutcome
from lrdeploy.ranks import parse_rank_rule
from lrdeploy.report import build_report, plot_format, plot_frontier
from lrdeploy.sites import initializer_bytes
from lrdeploy.verify import OutputFidelity, check_onnx, compare

# Feeds by default: random ones verifying a result, and the planner's error feeds.
VERIFY_FEEDS = 2
PLANNER_FEEDS = 4
# Above this many initializer bytes, weights go to a side file: protobuf cannot hold 2 GiB.
EXTERNAL_DATA_THRESHOLD = 1 << 30

Progress = Callable[[str], None]
ModelSource = Any  # a path to .onnx, "file.py:factory", a torch.nn.Module, ModelProto or ir.Model


@dataclass
class Loaded:
    """The model as given (the verification reference) and its canonical form."""

    source: str
    original: ir.Model
    canonical: ir.Model
    # The shapes that size an ONNX model's dynamic axes; None for a traced torch model, whose
    # shapes the trace fixed.
    onnx_shapes: Mapping[str, Sequence[int]] | None = None


def load(
    model: ModelSource,
    example_inputs: Sequence[Any] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Loaded:
    """Load any supported source; torch modules are traced with ``example_inputs`` (or random
    tensors of ``input_shapes``, in input order), an ONNX model's dynamic axes are sized by
    ``input_shapes`` (by input name) where it is analysed and run."""
    onnx_shapes = input_shapes
    if isinstance(model, ir.Model):
        source, original = "<onnx_ir.Model>", model
    elif isinstance(model, onnx.ModelProto):
        source, original = "<onnx.ModelProto>", ir.serde.deserialize_model(model)
    elif isinstance(model, str | os.PathLike) and _looks_like_factory(str(model)):
        source = str(model)
        original = _trace(frontend.load_torch_factory(source), example_inputs, input_shapes,
                          source, Path(source.rpartition(":")[0]))
        onnx_shapes = None
    elif isinstance(model, str | os.PathLike):
        source = str(model)
        original = frontend.load_onnx(source)
    elif _is_torch_module(model):
        source = f"<torch {type(model).__name__}>"
        original = _trace(model, example_inputs, input_shapes, source)
        onnx_shapes = None
    else:
        raise LrdeployError(f"cannot load a model from {type(model).__name__}")
    return Loaded(source, original, frontend.canonicalize(original), onnx_shapes)


def source_files(model: ModelSource) -> list[Path]:
    """The files ``model`` is read from (none for a model given as an object): an ONNX file
    with its external data, or a torch factory's ``.py``."""
    if not isinstance(model, str | os.PathLike):
        return []
    text = str(model)
    if _looks_like_factory(text):
        return [Path(text.rpartition(":")[0])]
    return frontend.onnx_files(text) if Path(text).is_file() else [Path(text)]


def _looks_like_factory(text: str) -> bool:
    file_part, sep, name = text.rpartition(":")
    return bool(sep) and file_part.endswith(".py") and name.isidentifier()


def _is_torch_module(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] != "builtins" and hasattr(obj, "state_dict") \
        and hasattr(obj, "forward")


def _trace(module: Any, example_inputs, input_shapes, source: str, path: Path | None = None
           ) -> ir.Model:
    import torch

    if example_inputs is None:
        if not input_shapes:
            raise LrdeployError("a torch model needs example inputs or --input-shape to be traced")
        generator = torch.Generator().manual_seed(0)
        example_inputs = [torch.randn(*shape, generator=generator)
                          for shape in _in_forward_order(module, input_shapes, source)]
    return frontend.export_torch(module, example_inputs, source, path)


def _in_forward_order(module: Any, input_shapes: Mapping[str, Sequence[int]], source: str
                      ) -> list[Sequence[int]]:
    """The shapes in the order ``module.forward`` takes its inputs: by name where they are
    named (``x=1,64``), else in the order given. A name forward() does not take, or names
    that leave an earlier input out, would trace the model on the wrong inputs."""
    names = [k for k in input_shapes if not k.startswith("#")]
    if not names:
        return list(input_shapes.values())
    if len(names) != len(input_shapes):
        raise LrdeployError("--input-shape: give every input's shape by name, or none by name")
    parameters = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(names) - set(parameters))
    if unknown or set(names) != set(parameters[: len(names)]):
        raise LrdeployError(f"--input-shape names {', '.join(unknown or names)}, but "
                            f"{source}'s forward() takes {', '.join(parameters)} (shapes are "
                            "needed for its first inputs)")
    return [input_shapes[name] for name in parameters[: len(names)]]


def analyze(
    model: ModelSource,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    example_inputs: Sequence[Any] | None = None,
) -> ModelAnalysis:
    """Sites, skipped operators and spectra of ``model`` at the given input shapes."""
    loaded = load(model, example_inputs, input_shapes)
    return analyze_model(loaded.canonical, loaded.onnx_shapes)


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
    rank: str | None = None,
    method: str = "auto",
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
    plan: Plan | str | os.PathLike[str] | None = None,
    guard: bool = True,
    tucker_sweeps: int = 0,
    calib: str | os.PathLike[str] | None = None,
    samples: int | None = None,
    min_fidelity: float | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    example_inputs: Sequence[Any] | None = None,
    report: str | os.PathLike[str] | None = None,
    save_plan: str | os.PathLike[str] | None = None,
    seed: int = 0,
    budget: Budget | None = None,
    progress: Progress = lambda message: None,
) -> CompressResult:
    """Factorize ``model``'s dense sites, verify the result and (if ``output``) write it.

    Nothing is written when the result fails the ONNX checker, onnxruntime, or
    ``min_fidelity`` (the smallest cosine similarity over the outputs). Methods and ranks
    come from one of: ``plan``, ``budget`` (the planner), or ``rank`` (default
    ``energy:0.9``) with ``method``, ``only``, ``skip``, ``guard`` and ``tucker_sweeps``; a
    plan or budget given with any of those raises ``LrdeployError``, as they would be
    overruled. ``samples``: the random feeds that verify the result without ``calib``
    (default ``VERIFY_FEEDS``), and the feeds the planner's errors are measured on (default
    ``PLANNER_FEEDS``; with ``calib``, at most the held-out samples), as ``plan_for_budget``.
    """
    _check_one_chooser(plan, budget, rank=rank is not None, method=method != "auto",
                       only=bool(only), skip=bool(skip), guard=not guard,
                       tucker_sweeps=bool(tucker_sweeps))
    rule = parse_rank_rule(rank or "energy:0.9")
    _check_count_and_seed(1 if samples is None else samples, seed)
    if min_fidelity is not None and not -1 <= min_fidelity <= 1:
        raise LrdeployError(f"--min-fidelity {min_fidelity:g}: a cosine similarity is between "
                            "-1 and 1")
    if output is not None and Path(output).suffix != ".onnx":
        raise LrdeployError(f"{output}: the output file name must end in .onnx")
    plan_file = plan if isinstance(plan, str | os.PathLike) else None
    check_outputs(output, report, save_plan,
                  inputs=(*source_files(model), calib, plan_file))
    loaded = load(model, example_inputs, input_shapes)
    analysis, calib_feeds, feed_source = _calibrated_analysis(loaded, calib, seed,
                                                              progress)
    if isinstance(plan, str | os.PathLike):
        plan_source = f"plan {plan}"
        plan = Plan.load(plan)
    elif plan is not None:
        plan_source = "plan given by the caller"
    elif budget is not None:
        outcome = _search(loaded.source, analysis, budget, calib_feeds,
                          samples or PLANNER_FEEDS, seed, progress)
        plan, plan_source = outcome.plan, f"the planner ({budget}): {outcome.budget_line()}"
    else:
        plan_source = f"--rank {rule} --method {method}"
        plan = make_plan(analysis, rule, method, only, skip, guard, tucker_sweeps)
    plan = plan.as_applied(analysis.grams is not None, analysis.means is not None)
    compressed = apply_plan(loaded.canonical, plan, analysis.sites, analysis.grams,
                            analysis.means)
    check_onnx(compressed)
    if calib_feeds is not None:
        feeds = calib_feeds
    else:
        count = samples or VERIFY_FEEDS
        feeds = [runtime.random_inputs(loaded.original, analysis.specs, seed + i)
                 for i in range(count)]
        feed_source = f"{count} random feed(s), seed {seed}"
    padded = sorted({name for feed in feeds
                     if (name := padding_mask_input(feed)) is not None and not feed[name].all()})
    if padded:
        feed_source += f", positions {' / '.join(padded)} marks as padding left out"
    fidelity = compare(loaded.original, compressed, feeds)
    result_report = build_report(
        source=loaded.source, output=output, plan_source=plan_source,
        analysis=analysis, plan=plan, compressed=compressed, fidelity=fidelity,
        feed_source=feed_source, feeds=len(feeds),
    )
    result = CompressResult(compressed, plan, analysis, fidelity, result_report,
                            Path(output) if output is not None else None)
    lost = [f.name for f in fidelity if not math.isfinite(f.relative_l2_error)]
    if lost:
        raise LrdeployError(f"output(s) {', '.join(lost)} of the compressed model hold NaN or "
                            "infinite values where the original's are finite (or other): "
                            "nothing written")
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


# The compress options a plan or a budget overrules, by keyword, with the flag that sets each.
CHOOSING_FLAGS = {"rank": "--rank", "method": "--method", "only": "--only", "skip": "--skip",
                  "guard": "--no-guard", "tucker_sweeps": "--tucker-sweeps"}


def _check_one_chooser(plan: object, budget: Budget | None, **given: bool) -> None:
    """Refuse a plan or budget together with another way of choosing methods and ranks
    (``given``: which of ``CHOOSING_FLAGS`` the caller set): one would silently overrule the
    other."""
    if plan is not None and budget is not None:
        raise LrdeployError("--plan fixes every site's method and ranks and a budget has the "
                            "planner choose them: give one of them")
    overruled = [CHOOSING_FLAGS[k] for k, set_ in given.items() if set_]
    if overruled and (plan is not None or budget is not None):
        what = "--plan fixes" if plan is not None else "--budget-ms / --budget-params choose"
        raise LrdeployError(f"{what} every site's method and ranks: drop "
                            f"{', '.join(overruled)}, which would be overruled")


def _check_count_and_seed(samples: int, seed: int) -> None:
    """The CLI's argparse types check these; the API's callers get the same one-line errors."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise LrdeployError(f"samples {samples!r}: must be a whole number, 1 or more")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise LrdeployError(f"seed {seed!r}: a seed is a whole number from 0 to 2**32 - 1")


def _calibrated_analysis(loaded: Loaded, calib, seed: int, progress: Progress
                         ) -> tuple[ModelAnalysis, list[runtime.Feeds] | None, str]:
    """The analysis (shapes probed on the first calibration feed, if any), the calibration
    feeds that errors are measured on, and a line saying which they are. With calibration data
    the analysis carries each site's input statistics (data-aware SVD and spatial SVD), fitted
    on the other feeds (``split_calibration``)."""
    onnx_shapes = loaded.onnx_shapes
    if calib is None:
        return analyze_model(loaded.canonical, onnx_shapes, seed), None, ""
    specs = runtime.input_specs(loaded.canonical, onnx_shapes)
    calib_feeds = runtime.load_calibration(calib, specs)
    for spec in specs:
        # The analysis is probed on the calibration shapes: a different --input-shape would
        # be ignored, and the FLOPs reported at shapes the user did not ask for.
        sample = list(calib_feeds[0][spec.name].shape)
        if spec.given and sample != list(spec.shape):
            raise LrdeployError(f"{calib}: array '{spec.name}' holds samples of shape {sample}, "
                                f"but --input-shape gives {list(spec.shape)}: give samples of "
                                "that shape, or leave --input-shape out (the calibration data "
                                "then sets it)")
    analysis = analyze_model(loaded.canonical, onnx_shapes, seed, calib_feeds[0])
    split = split_calibration(calib_feeds)
    if not split.disjoint:
        warn(f"{calib}: one calibration sample both fits the statistics and measures the "
             "errors, which then look better than on other data: give several samples")
        source = f"the one feed of {calib} (it also fitted the calibration statistics)"
    else:
        source = (f"the last {len(split.held_out)} feed(s) of {calib}, held out of the "
                  f"calibration statistics (fitted on the other {len(split.fit)})")
    progress("collecting calibration statistics")
    analysis.grams, analysis.means = site_statistics(loaded.canonical, analysis.sites,
                                                     split.fit, progress)
    return analysis, split.held_out, source


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


@dataclass(frozen=True)
class Budget:
    """What the planner must meet: ``ms`` of latency or ``params`` parameters on ``target``.

    ``engine`` measures latency (``lrdeploy.latency``; default TVM over RPC when
    ``rpc``/``tracker`` is given, else onnxruntime on the host and the roofline estimate on
    other targets). ``data_aware`` offers SVD and spatial SVD factors whitened by the
    calibration activations (when there are any) beside the plain ones, and keeps whichever
    errs less on the held-out samples.
    """

    kind: str
    value: float
    relative: bool = False  # value is a fraction of the dense model's cost on the target
    target: str = "host"
    engine: str | None = None
    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None
    device_file: str | None = None
    data_aware: bool = True
    cache: bool = True
    tensor_train: bool = False  # tensor-train layers are candidates too
    threads: int | None = None  # runtime threads for measured latency (None: the runtime's)
    dtype: str = "float32"  # the precision the model will be compiled at (compile --dtype)
    sample_schedules: bool = False  # TVM chains scheduled as compile --sample-schedules does

    def __post_init__(self) -> None:
        if self.kind not in ("ms", "params"):
            raise LrdeployError(f"budget kind must be 'ms' or 'params', not {self.kind!r}")
        if self.threads is not None and self.threads < 1:
            raise LrdeployError(f"--latency-threads must be at least 1 (got {self.threads})")
        check_engine(self.engine, self.rpc, self.tracker, self.key, self.sample_schedules)
        if not 0 < self.value < math.inf or (self.relative and self.value > 1):
            limit = " and at most 100%" if self.relative else ""
            raise LrdeployError(f"the budget must be a positive number{limit} (got {self})")

    def __str__(self) -> str:
        flag = "--budget-ms" if self.kind == "ms" else "--budget-params"
        value = f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"
        dtype = f" --dtype {self.dtype}" if self.dtype != "float32" else ""
        return f"{flag} {value} --target {self.target}{dtype}"


def plan_for_budget(
    model: ModelSource,
    budget: Budget,
    *,
    calib: str | os.PathLike[str] | None = None,
    samples: int = PLANNER_FEEDS,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    example_inputs: Sequence[Any] | None = None,
    output: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: Progress = lambda message: None,
) -> PlanOutcome:
    """Search the plan that meets ``budget`` with the least predicted error, check it on the
    device, and write the plan (re-appliable with ``compress --plan``), report and plot."""
    _check_count_and_seed(samples, seed)
    check_outputs(output, report, plot, inputs=(*source_files(model), calib))
    loaded = load(model, example_inputs, input_shapes)
    if plot is not None:
        plot_format(plot)
    analysis, calib_feeds, _ = _calibrated_analysis(loaded, calib, seed, progress)
    outcome = _search(loaded.source, analysis, budget, calib_feeds, samples, seed, progress)
    if output is not None:
        write_json(output, outcome.plan.to_dict())
    if report is not None:
        write_json(report, {"source": loaded.source, **outcome.to_dict()})
    if plot is not None:
        plot_frontier(outcome, plot)
    return outcome


def _search(source: str, analysis: ModelAnalysis, budget: Budget, calib_feeds, samples: int,
            seed: int, progress: Progress) -> PlanOutcome:
    from lrdeploy.latency import latency_model
    from lrdeploy.planner import Planner
    from lrdeploy.targets.devices import check_dtype, get_device

    if not analysis.sites:
        raise LrdeployError(f"{source}: no factorizable sites (Gemm, MatMul or Conv with a "
                            "constant weight): nothing to plan")
    device = get_device(budget.target, budget.device_file)
    check_dtype(device, budget.dtype)
    if calib_feeds is None:
        warn("no calibration data (--calib): factors are not data-aware and errors are "
             "measured on random inputs")
        feeds = [runtime.random_inputs(analysis.model, analysis.specs, seed + i)
                 for i in range(samples)]
    else:
        feeds = calib_feeds[: max(samples, 1)]
    latency = latency_model(device, budget.engine, budget.rpc, budget.tracker, budget.key,
                            budget.cache, budget.device_file, budget.threads, budget.dtype,
                            budget.sample_schedules)
    methods = ("svd", "tucker2", "spatial", *(("tt",) if budget.tensor_train else ()))
    planner = Planner(analysis, device, latency, feeds, methods=methods,
                      data_aware=budget.data_aware, progress=progress)
    return planner.solve(budget.kind, budget.value, relative=budget.relative)
