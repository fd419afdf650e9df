"""The ``lrdeploy`` command line: ``analyze`` and ``compress`` over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from lrdeploy import __version__, api
from lrdeploy.errors import LrdeployError, LrdeployWarning
from lrdeploy.fileio import check_outputs, write_json
from lrdeploy.latency import ENGINES
from lrdeploy.methods import METHOD_CHOICES
from lrdeploy.ranks import RULE_SYNTAX
from lrdeploy.report import (
    print_analysis,
    print_compression,
    print_devices,
    print_manifest,
    print_plan,
    print_profile,
    print_verification,
)
from lrdeploy.targets.devices import DTYPES

MODEL_HELP = ("an .onnx file (external data must sit in its folder), or FILE.py:FACTORY, a "
              "function returning a torch.nn.Module (traced with --input-shape)")
SHAPE_HELP = ("input shape, e.g. 1,3,224,224 (the only input) or NAME=1,128; repeat for several "
              "inputs. An axis the model names takes the size given for it in any input; "
              "dynamic axes not given default to 1 (axis 0) and 32 (others)")


def parse_input_shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]] | None:
    if not specs:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for position, spec in enumerate(specs):
        name, sep, dims = spec.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise LrdeployError(f"--input-shape {spec!r}: expected dims like 1,3,224,224 "
                                "or NAME=1,128") from None
        if any(d < 1 for d in shape):
            raise LrdeployError(f"--input-shape {spec!r}: dims must be >= 1")
        shapes[name if sep else f"#{position}"] = shape
    return shapes


PROFILE_DESCRIPTION = """\
Time compiled artifacts (and .onnx models on onnxruntime) locally, or on a device that runs a
TVM RPC server: directly (--rpc HOST:PORT) or through a TVM tracker that shares a pool of
devices (--tracker HOST:PORT --key KEY). Reports median, p90, min, max and stddev in ms, and
checks the outputs fetched from the device against onnxruntime.

A TVM RPC server on a Raspberry Pi (64-bit Raspberry Pi OS / Debian, Python 3.11):
    pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy psutil cloudpickle
    TVM_USE_RUNTIME_LIB=1 python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090
    # or register with a tracker (python -m tvm.exec.rpc_tracker --port 9190 on a host):
    ... rpc_server --tracker TRACKER_HOST:9190 --key rpi4
  (the aarch64 wheels are on PyPI; only the runtime is loaded; bind 0.0.0.0 only on a
  network you trust, the server runs whatever it is sent)
On an Android phone: build and install TVM's Android RPC app (apps/android_rpc in the TVM
sources), point it at your tracker with a key, then profile with --tracker HOST:9190 --key KEY.
"""

DEVICE_FILE_HELP = ("TOML or JSON table of extra devices keyed by name, with the fields of the "
                    "built-in rows (lrdeploy targets --json shows them)")


def _add_compression_options(parser: argparse.ArgumentParser, default_rank: str | None) -> None:
    group = parser.add_argument_group("compression")
    default = f" (default {default_rank})" if default_rank else " (compile: compress first)"
    group.add_argument("--rank", metavar="RULE",
                       help=f"rank rule: {RULE_SYNTAX}{default}")
    group.add_argument("--method", default="auto", choices=METHOD_CHOICES,
                       help="what k x k convs get: auto/tucker2 = Tucker-2, spatial = "
                            "kh x 1 + 1 x kw, svd = left dense; matrices and 1x1 convs "
                            "always use SVD (default auto)")
    group.add_argument("--only", action="append", default=[], metavar="PATTERN",
                       help="factorize only sites whose name, or its end after a '/', "
                            "matches (shell pattern, e.g. 'fc*' or '*attention*'; repeat)")
    group.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                       help="leave sites whose name (or its end after a '/') matches "
                            "dense (shell pattern; repeat)")
    group.add_argument("--plan", metavar="FILE",
                       help="apply a saved plan instead of --rank/--method/--only/--skip")
    group.add_argument("--calib", metavar="NPZ",
                       help="calibration inputs keyed by input name (a stack of samples "
                            "along a leading axis is fed one by one): they make SVD and "
                            "spatial SVD data-aware (factors whitened by the activations of "
                            "the first three quarters) and verify the result (on the last "
                            "quarter); positions an attention_mask input marks as padding are "
                            "left out; default: random inputs, plain factors")
    group.add_argument("--samples", type=_count,
                       help="random feeds verifying the result when there is no --calib "
                            "(default 2); with a budget, also the feeds the planner's errors "
                            "are measured on (default 4; with --calib, at most the held-out "
                            "quarter), as for lrdeploy plan")
    group.add_argument("--min-fidelity", type=float, metavar="COSINE",
                       help="fail and write nothing if an output's cosine similarity to the "
                            "original is below this")
    group.add_argument("--no-guard", action="store_true",
                       help="factorize even where ranks do not reduce params and FLOPs "
                            "(e.g. --rank full to check exactness)")
    group.add_argument("--tucker-sweeps", type=_sweeps, default=0, metavar="N",
                       help="HOOI sweeps refining the Tucker-2 HOSVD (default 0)")
    group.add_argument("--seed", type=_seed, default=0, help="seed of the random feeds")


def _seed(text: str) -> int:
    """An argparse type: numpy's generators take seeds from 0 to 2**32 - 1."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{text}: a seed is between 0 and 2**32 - 1")
    return value


def _sweeps(text: str) -> int:
    """An argparse type: a count of zero or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more")
    return value


def _count(text: str) -> int:
    """An argparse type: a count of one or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


def _given_compression_options(args) -> list[str]:
    """The compression options set away from their defaults (--rank, --plan and the budget
    aside): what compile would ignore uncompressed."""
    return [flag for flag, given in (
        ("--method", args.method != "auto"), ("--only", args.only), ("--skip", args.skip),
        ("--calib", args.calib), ("--min-fidelity", args.min_fidelity is not None),
        ("--no-guard", args.no_guard), ("--tucker-sweeps", args.tucker_sweeps),
        ("--samples", args.samples is not None), ("--seed", args.seed != 0)) if given]


# The budget group's options with their defaults: the target ones (compile has its own, which
# it uses uncompressed too), and those only the planner uses.
TARGET_OPTIONS = (("--target", "target", "host"), ("--device-file", "device_file", None),
                  ("--dtype", "dtype", "float32"),
                  ("--sample-schedules", "sample_schedules", False))
PLANNER_OPTIONS = (("--engine", "engine", None), ("--rpc", "rpc", None),
                   ("--tracker", "tracker", None), ("--key", "key", None),
                   ("--plain-svd", "plain_svd", False),
                   ("--no-latency-cache", "no_latency_cache", False),
                   ("--latency-threads", "latency_threads", None), ("--tt", "tt", False))


def _given_planner_options(args) -> list[str]:
    """The options set away from their defaults that only the planner uses, in this command."""
    options = PLANNER_OPTIONS if args.command == "compile" else TARGET_OPTIONS + PLANNER_OPTIONS
    return [flag for flag, name, default in options if getattr(args, name) != default]


def _check_planner_options(args, budget: api.Budget | None) -> None:
    unused = [] if budget else _given_planner_options(args)
    if unused:
        raise LrdeployError(f"{', '.join(unused)}: only the planner uses these, so give "
                            "--budget-ms or --budget-params too (or drop them)")


def _compression_kwargs(args) -> dict:
    budget = _budget(args)
    _check_planner_options(args, budget)
    if args.calib and args.samples is not None and not budget:
        raise LrdeployError("--samples counts random feeds (and, with a budget, the planner's "
                            "error feeds); with --calib the held-out samples verify the "
                            "result: drop one of them")
    return dict(rank=args.rank, method=args.method, only=args.only, skip=args.skip,
                plan=args.plan, guard=not args.no_guard, tucker_sweeps=args.tucker_sweeps,
                calib=args.calib, samples=args.samples, min_fidelity=args.min_fidelity,
                seed=args.seed, budget=budget)


BUDGET_HELP = """\
The planner chooses, per site, dense or a factorization and its ranks so that the model meets
the budget on the target with the least predicted loss of fidelity: every candidate's operator
chain is timed on the device (cached per device and board under $LRDEPLOY_CACHE/latency, so
the next plan for that board re-measures nothing), or estimated from the device's roofline
when no board is reachable, each site's effect on the outputs is measured on the calibration
inputs, a knapsack search picks the plan, and the plan is then measured (or estimated) whole
and the search tightened until it fits (at most 5 attempts)."""


def _add_budget_options(parser: argparse.ArgumentParser, target: bool, required: bool) -> None:
    group = parser.add_argument_group("budget (the planner)")
    if target:
        group.add_argument("--target", default="host",
                           help="device the budget is for (lrdeploy targets); default host")
        group.add_argument("--device-file", metavar="FILE", help=DEVICE_FILE_HELP)
        _add_dtype_option(group, "the precision the model will be compiled at (compile "
                                 "--dtype): float16 plans with GPU latencies at half precision "
                                 "(chains compiled in float16; the roofline takes the device's "
                                 "float16 peak and 2-byte values). Default float32")
        group.add_argument("--sample-schedules", action="store_true",
                           help="with the tvm engine: compile the timed chains with sampled "
                                "schedules, as compile --sample-schedules will compile the "
                                "model (their figures are a table of their own)")
    instead = "" if required else " (instead of --rank)"
    budgets = group.add_mutually_exclusive_group(required=required)
    budgets.add_argument("--budget-ms", metavar="MS|PCT%",
                         help="latency budget on the target in ms, or a share of the dense "
                              f"model's latency there, e.g. 75%%{instead}")
    budgets.add_argument("--budget-params", metavar="P|PCT%",
                         help="parameter budget (weights in the whole model), e.g. for "
                              f"flash-bound devices, or a share of the dense model's{instead}")
    # compile plans a host budget on TVM, the runtime its artifact runs on (deploy.py).
    host_default = "onnxruntime on host" if target else "tvm on host (the artifact's runtime)"
    group.add_argument("--engine", choices=ENGINES,
                       help="how latency is known: onnxruntime (measured here; host only), tvm "
                            "(compiled and timed on the target: in-process for host, else over "
                            "--rpc/--tracker), roofline (estimated from the device table). "
                            f"Default: tvm with --rpc/--tracker, else {host_default} and "
                            "roofline on other targets")
    group.add_argument("--rpc", metavar="HOST:PORT", help="the target's TVM RPC server")
    group.add_argument("--tracker", metavar="HOST:PORT", help="a TVM RPC tracker (with --key)")
    group.add_argument("--key", help="device key registered with the tracker")
    group.add_argument("--plain-svd", action="store_true",
                       help="do not whiten SVD or spatial SVD factors with the --calib "
                            "activations (they still measure the errors and may correct the "
                            "biases)")
    group.add_argument("--no-latency-cache", action="store_true",
                       help="time every chain again and do not save the figures")
    group.add_argument("--latency-threads", type=int, metavar="N",
                       help="runtime threads when timing plans (default: the runtime's, one "
                            "per core); 1 gives much steadier figures on a busy machine")
    group.add_argument("--tt", action="store_true",
                       help="also consider tensor-train layers for matrix sites (their shape "
                            "and contraction order chosen per site; slower to plan)")


def _add_dtype_option(parser, help_text: str) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help=help_text)


def _budget(args) -> api.Budget | None:
    if getattr(args, "budget_ms", None) is None and getattr(args, "budget_params", None) is None:
        return None
    kind, text = ("ms", args.budget_ms) if args.budget_ms is not None else \
        ("params", args.budget_params)
    relative = text.strip().endswith("%")
    try:
        value = float(text.strip().rstrip("%")) / (100 if relative else 1)
    except ValueError:
        raise LrdeployError(f"--budget-{kind} {text!r}: expected a number or a percentage "
                            "such as 75%") from None
    return api.Budget(kind, value, relative, target=args.target, engine=args.engine, rpc=args.rpc,
                      tracker=args.tracker, key=args.key, device_file=args.device_file,
                      data_aware=not args.plain_svd, cache=not args.no_latency_cache,
                      tensor_train=args.tt, threads=args.latency_threads,
                      dtype=args.dtype, sample_schedules=args.sample_schedules)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--input-shape", action="append", metavar="SHAPE", help=SHAPE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrdeploy",
        description="Compress models by low-rank factorization of their dense operators and "
                    "export verified ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"lrdeploy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = commands.add_parser(
        "analyze", help="list factorizable sites with their spectra and break-even ranks",
        description="List every factorizable site (Gemm / MatMul / Conv with a constant weight): "
                    "params, FLOPs at the input shape, effective rank, ranks keeping 90/95/99%% "
                    "of spectral energy, and the break-even rank; and every skipped operator "
                    "with the reason.")
    _add_model_options(analyze)
    analyze.add_argument("--json", metavar="FILE", help="also write the table as JSON")

    compress = commands.add_parser(
        "compress", help="factorize, verify against the original, write ONNX",
        description="Replace dense operators by low-rank chains, check the result with the full "
                    "ONNX checker and onnxruntime against the original, and write it. Nothing "
                    "is written when a check fails.")
    _add_model_options(compress)
    compress.add_argument("-o", "--output", required=True, metavar="OUT.onnx",
                          help="the compressed model (never the input path)")
    compress.add_argument("--report", metavar="FILE", help="write the JSON report")
    compress.add_argument("--save-plan", metavar="FILE", help="write the plan used as JSON")
    _add_compression_options(compress, default_rank="energy:0.9")
    _add_budget_options(compress, target=True, required=False)

    plan = commands.add_parser(
        "plan", help="choose methods and ranks per site to meet a latency or size budget",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=BUDGET_HELP + """

Writes the plan (apply it with compress/compile --plan FILE), and optionally a JSON report
with the Pareto frontier (latency vs predicted error) and a PNG plot of it. A budget that no
plan can meet fails with the least reachable latency.""")
    _add_model_options(plan)
    plan.add_argument("-o", "--output", metavar="PLAN.json",
                      help="where to write the plan (default: MODEL-STEM.plan.json here)")
    plan.add_argument("--report", metavar="FILE", help="write the JSON report (frontier, sites)")
    plan.add_argument("--plot", metavar="FILE.png",
                      help="plot the Pareto frontier (.png, .svg or .pdf, by the suffix)")
    plan.add_argument("--calib", metavar="NPZ",
                      help="calibration inputs (as for compress): data-aware SVD and spatial "
                           "SVD fitted on the first three quarters, errors measured on the last "
                           "quarter; default random inputs and plain factors")
    plan.add_argument("--samples", type=_count, default=api.PLANNER_FEEDS,
                      help="feeds the error model uses (default 4; with --calib, at most "
                           "the held-out last quarter)")
    plan.add_argument("--seed", type=_seed, default=0, help="seed of random feeds")
    _add_budget_options(plan, target=True, required=True)

    targets = commands.add_parser(
        "targets", help="list the devices lrdeploy compiles for",
        description="List the named devices (built in, plus those of --device-file) with their "
                    "TVM target and the figures the latency model uses.")
    targets.add_argument("--device-file", metavar="FILE", help=DEVICE_FILE_HELP)
    targets.add_argument("--prepare", action="append", default=[], metavar="TARGET",
                         help="fetch the device's TVM runtime and build its runner now (repeat)")
    targets.add_argument("--json", action="store_true",
                         help="print the rows as JSON, in the form --device-file reads (a copy "
                              "of a row, renamed and edited, is a new device)")

    compile_ = commands.add_parser(
        "compile", help="compile ONNX (or compress, then compile) with TVM for a device",
        description="Compile a model with TVM Relax (default pipeline, fusion on) for a named "
                    "device into OUTDIR: the artifact (model.so, or model.tar if it cannot be "
                    "linked here), model.onnx and manifest.json. For mobile GPUs (mali-g610, "
                    "adreno-7xx) the build must hold an OpenCL module with every kernel, each "
                    "kernel is compiled by PoCL as a check, and the OpenCL C is written to "
                    "kernels.cl. For microcontrollers "
                    "(cortex-m4, cortex-m7) the artifact is a C project with no TVM runtime: "
                    "model.c / model.h (int lrd_run(const float *in, float *out), weights in "
                    "flash, one static activation arena), kernels.c and a Makefile; a model "
                    "that does not fit the device's flash or RAM is refused with the overshoot "
                    "(--budget-params then finds a low-rank one that fits). With --rank, --plan "
                    "or a budget the model is compressed first.")
    _add_model_options(compile_)
    compile_.add_argument("--target", default="host", help="device name (lrdeploy targets); "
                                                          "default host")
    compile_.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                          help="artifact folder (created; an earlier artifact there is replaced)")
    compile_.add_argument("--tune-trials", type=int, default=0, metavar="N",
                          help="MetaSchedule trials (0 = untuned); the database is kept in "
                               "OUTDIR/tuning and reused by the next compile. host only")
    compile_.add_argument("--sample-schedules", action="store_true",
                          help="CPU targets: give every kernel a schedule drawn from "
                               "MetaSchedule's design space (tiled, parallel, vectorized), "
                               "measuring nothing, so no board is needed. TVM otherwise "
                               "schedules nothing for CPUs: MiniLM-L3 at 1 x 128 ran 97 ms "
                               "sampled against 1008 ms untuned on this x86 host (onnxruntime: "
                               "8.8 ms). Costs about 30 s plus a second a kernel")
    compile_.add_argument("--device-file", metavar="FILE", help=DEVICE_FILE_HELP)
    _add_dtype_option(compile_, "GPU targets: float16 runs weights and activations in half "
                                "precision; the error this costs against float32 onnxruntime "
                                "is measured on a host build and printed; a budget is planned "
                                "at this precision (default float32)")
    _add_compression_options(compile_, default_rank=None)
    _add_budget_options(compile_, target=False, required=False)

    verify = commands.add_parser(
        "verify", help="run a compiled artifact and compare it with onnxruntime",
        description="Run OUTDIR's artifact (in-process for host, under qemu with --emulate for "
                    "ARM targets; a microcontroller's C project is built with the host "
                    "compiler, or with --emulate for the device and run on qemu-system-arm's "
                    "board) and onnxruntime on the ONNX it was built from, on the same "
                    "inputs; fail when the relative L2 error exceeds --tolerance.")
    verify.add_argument("outdir", metavar="OUTDIR")
    verify.add_argument("--emulate", action="store_true",
                        help="run an ARM artifact with the C++ runner under qemu-user, or a "
                             "microcontroller build under qemu-system-arm")
    verify.add_argument("--calib", metavar="NPZ", help="inputs (as for compress); default random")
    verify.add_argument("--samples", type=_count,
                        help="random feeds when there is no --calib (default 2)")
    verify.add_argument("--seed", type=_seed, default=0)
    verify.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative L2 error accepted (default 1e-4); an output "
                             "within onnxruntime's own float32 noise floor also passes")

    bundle = commands.add_parser(
        "bundle", help="lay out runner + TVM runtime + artifact for a device without Python",
        description="Copy the C++ runner, the device's TVM runtime libraries, the artifact, its "
                    "manifest and a README into DEST, ready to copy to the board.")
    bundle.add_argument("outdir", metavar="OUTDIR")
    bundle.add_argument("dest", metavar="DEST", help="new folder to create")
    profile = commands.add_parser(
        "profile", help="measure latency locally or on a device over TVM RPC / a tracker",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=PROFILE_DESCRIPTION)
    profile.add_argument("items", nargs="+", metavar="OUTDIR|MODEL",
                         help="artifact folders (lrdeploy compile) or .onnx files; several are "
                              "timed side by side, ratios against the first")
    profile.add_argument("--runtime", action="append", choices=["tvm", "ort"],
                         help="tvm (the compiled artifact; an .onnx is compiled for --target "
                              "first) and/or ort (onnxruntime, local); repeat for both "
                              "(default tvm)")
    profile.add_argument("--target", default="host", help="device for compiling .onnx items")
    profile.add_argument("--device-file", metavar="FILE", help=DEVICE_FILE_HELP)
    profile.add_argument("--input-shape", action="append", metavar="SHAPE", help=SHAPE_HELP)
    profile.add_argument("--sample-schedules", action="store_true",
                         help="compile .onnx items with sampled schedules (compile "
                              "--sample-schedules)")
    profile.add_argument("--rpc", metavar="HOST:PORT", help="a TVM RPC server on the device")
    profile.add_argument("--tracker", metavar="HOST:PORT",
                         help="a TVM RPC tracker; needs --key")
    profile.add_argument("--key", help="device key registered with the tracker")
    profile.add_argument("--emulated", action="store_true",
                         help="the RPC device is an emulator: its timings are labelled so")
    profile.add_argument("--runs", type=int, default=20, help="timed runs (default 20)")
    profile.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    profile.add_argument("--threads", type=int, help="runtime threads (default: the runtime's)")
    profile.add_argument("--min-repeat-ms", type=int, default=0, metavar="MS",
                         help="each TVM sample repeats the model for at least this long and "
                              "reports the mean per run (default 0: one run per sample)")
    profile.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                         help="RPC session and tracker request timeout (default 120)")
    profile.add_argument("--per-layer", action="store_true",
                         help="also time each fused TVM kernel on its own (on the device) and "
                              "each ONNX node in onnxruntime's profiler, mapped to the sites; "
                              "reports the share of time in factorized vs untouched sites")
    profile.add_argument("--json", metavar="FILE", help="write every raw figure as JSON "
                                                        "(also when a fault stops the run)")
    profile.add_argument("--html", metavar="FILE",
                         help="write an HTML report: the timings, and with --per-layer a "
                              "bar chart of per-layer time")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Piped output (logs, CI) gets wide tables instead of rich's 80-column fallback.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    errors = Console(stderr=True)
    default_showwarning = warnings.showwarning

    def show_warning(message, category, *rest) -> None:
        if issubclass(category, LrdeployWarning):
            errors.print(f"lrdeploy: warning: {message}", markup=False, highlight=False,
                         soft_wrap=True)
        else:
            default_showwarning(message, category, *rest)

    warnings.showwarning = show_warning
    try:
        shapes = parse_input_shapes(getattr(args, "input_shape", None))
        handlers = {"analyze": _analyze, "compress": _compress, "targets": _targets,
                     "compile": _compile, "verify": _verify, "bundle": _bundle,
                     "profile": _profile, "plan": _plan}
        return handlers[args.command](args, shapes, console)
    except LrdeployError as exc:
        errors.print(f"lrdeploy: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        errors.print("lrdeploy: interrupted", markup=False)
        return 130


def _analyze(args, shapes, console: Console) -> int:
    check_outputs(args.json, inputs=api.source_files(args.model))
    with console.status("analysing (tracing, probing shapes, computing spectra)"):
        analysis = api.analyze(args.model, input_shapes=shapes)
        rows = analysis.rows()
    skipped, inputs = analysis.skipped_rows(), analysis.input_rows()
    print_analysis(console, rows, skipped, inputs)
    if args.json:
        write_json(args.json, {"source": args.model, "inputs": inputs, "sites": rows,
                               "skipped": skipped, "model_params": analysis.total_params})
        console.print(f"wrote {args.json}")
    return 0


def _compress(args, shapes, console: Console) -> int:
    with console.status("compressing (tracing, factorizing, verifying)") as status:
        result = api.compress(args.model, args.output, input_shapes=shapes, report=args.report,
                              save_plan=args.save_plan, **_compression_kwargs(args),
                              progress=lambda message: status.update(message))
    print_compression(console, result.report)
    written = [p for p in (args.output, args.report, args.save_plan) if p]
    console.print(f"wrote {', '.join(written)}")
    return 0


def _plan(args, shapes, console: Console) -> int:
    output = args.output or f"{Path(args.model.split(':')[0]).stem}.plan.json"
    with console.status("planning") as status:
        outcome = api.plan_for_budget(
            args.model, _budget(args), calib=args.calib, samples=args.samples,
            input_shapes=shapes, output=output, report=args.report, plot=args.plot,
            seed=args.seed, progress=lambda message: status.update(message))
    print_plan(console, outcome)
    written = [p for p in (output, args.report, args.plot) if p]
    console.print(f"wrote {', '.join(written)}")
    return 0


def _targets(args, shapes, console: Console) -> int:
    from lrdeploy.targets.devices import all_devices
    from lrdeploy.targets.runner import runner_for

    devices = all_devices(args.device_file)
    if args.json:
        rows = {name: {k: v for k, v in device.to_dict().items() if k != "name"}
                for name, device in devices.items()}
        print(json.dumps(rows, indent=2))
    else:
        print_devices(console, list(devices.values()))
    for name in args.prepare:
        if name not in devices:
            raise LrdeployError(f"unknown target '{name}'; known targets: {', '.join(devices)}")
        console.print(f"{name}: runner ready at {runner_for(devices[name])}")
    return 0


def _compile(args, shapes, console: Console) -> int:
    from lrdeploy.deploy import compile_model

    planned = args.budget_ms is not None or args.budget_params is not None
    compress_options = _compression_kwargs(args) if args.rank or args.plan or planned else None
    if compress_options is None:
        _check_planner_options(args, None)
        unused = _given_compression_options(args)
        if unused:
            raise LrdeployError(f"{', '.join(unused)}: compile compresses the model only with "
                                "--rank, --plan or --budget-ms / --budget-params, so give one "
                                "of those too (or drop these options)")
    with console.status("compiling") as status:
        manifest = compile_model(
            args.model, args.target, args.output, device_file=args.device_file,
            input_shapes=shapes, tune_trials=args.tune_trials,
            sample_schedules=args.sample_schedules, compress_options=compress_options,
            dtype=args.dtype, progress=lambda message: status.update(message),
        )
    print_manifest(console, args.output, manifest)
    return 0


def _verify(args, shapes, console: Console) -> int:
    from lrdeploy.deploy import verify_artifact

    if not args.tolerance >= 0:
        raise LrdeployError(f"--tolerance {args.tolerance:g}: a relative error must be >= 0")
    if args.calib and args.samples is not None:
        raise LrdeployError("--samples counts random feeds; with --calib every calibration "
                            "sample is fed: drop one of them")
    with console.status("verifying") as status:
        result = verify_artifact(args.outdir, emulate=args.emulate, calib=args.calib,
                                 samples=args.samples or api.VERIFY_FEEDS, seed=args.seed,
                                 progress=lambda message: status.update(message))
    print_verification(console, result)
    failed = result.failures(args.tolerance)
    if failed:
        worst = max(failed, key=lambda f: f.relative_l2_error)
        raise LrdeployError(f"{args.outdir}: output '{worst.name}' relative error "
                            f"{worst.relative_l2_error:.3e} exceeds --tolerance "
                            f"{args.tolerance:g} and the float32 noise floor "
                            f"{worst.noise_floor:.1e}")
    console.print(f"verified: every output within --tolerance {args.tolerance:g} "
                  "(or within onnxruntime's own float32 noise)")
    return 0


def _bundle(args, shapes, console: Console) -> int:
    from lrdeploy.deploy import bundle_artifact

    with console.status("bundling (fetching the runtime and building the runner once)"):
        dest = bundle_artifact(args.outdir, args.dest)
    console.print(f"wrote {dest}: copy it to the device and run ./lrdeploy_runner "
                  f"(see {dest / 'README.md'})")
    return 0


def _profile(args, shapes, console: Console) -> int:
    from lrdeploy.profiling import profile

    check_outputs(args.json, args.html, inputs=args.items)
    with console.status("profiling") as status:
        result = profile(
            args.items, target=args.target, runtimes=args.runtime or ["tvm"], rpc=args.rpc,
            tracker=args.tracker, key=args.key, runs=args.runs, warmup=args.warmup,
            threads=args.threads, timeout_s=args.timeout, emulated=args.emulated,
            per_layer=args.per_layer, min_repeat_ms=args.min_repeat_ms,
            device_file=args.device_file, input_shapes=shapes,
            sample_schedules=args.sample_schedules, progress=lambda message: status.update(message),
        )
    if any(t.samples_ms for t in result.timings):  # else the error below says it all
        print_profile(console, result.to_dict())
    if args.json:
        write_json(args.json, result.to_dict())
        console.print(f"wrote {args.json}")
    if args.html:
        from lrdeploy.report import write_profile_html

        write_profile_html(args.html, result.to_dict())
        console.print(f"wrote {args.html}")
    if result.failed:
        raise LrdeployError(result.failed[0].error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
