"""The ``lrdeploy`` command line: ``analyze`` and ``compress`` over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from lrdeploy import __version__, api
from lrdeploy.errors import LrdeployError
from lrdeploy.fileio import write_json
from lrdeploy.methods import METHOD_CHOICES
from lrdeploy.ranks import RULE_SYNTAX
from lrdeploy.report import print_analysis, print_compression

MODEL_HELP = ("an .onnx file (external data must sit in its folder), or FILE.py:FACTORY, a "
              "function returning a torch.nn.Module (traced with --input-shape)")
SHAPE_HELP = ("input shape, e.g. 1,3,224,224 (the only input) or NAME=1,128; repeat for several "
              "inputs. Dynamic axes not given default to 1 (axis 0) and 32 (others)")


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
    compress.add_argument("--rank", default="energy:0.9", metavar="RULE",
                          help=f"rank rule: {RULE_SYNTAX} (default energy:0.9)")
    compress.add_argument("--method", default="auto", choices=METHOD_CHOICES,
                          help="what k x k convs get: auto/tucker2 = Tucker-2, spatial = "
                               "kh x 1 + 1 x kw, svd = left dense; matrices and 1x1 convs "
                               "always use SVD (default auto)")
    compress.add_argument("--only", action="append", default=[], metavar="PATTERN",
                          help="factorize only sites whose name matches (shell pattern; repeat)")
    compress.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                          help="leave sites whose name matches dense (shell pattern; repeat)")
    compress.add_argument("--plan", metavar="FILE",
                          help="apply a saved plan instead of --rank/--method/--only/--skip")
    compress.add_argument("--save-plan", metavar="FILE", help="write the plan used as JSON")
    compress.add_argument("--calib", metavar="NPZ",
                          help="verification inputs keyed by input name (a stack of samples "
                               "along a leading axis is fed one by one); default: random")
    compress.add_argument("--samples", type=int, default=2,
                          help="random feeds when there is no --calib (default 2)")
    compress.add_argument("--min-fidelity", type=float, metavar="COSINE",
                          help="fail and write nothing if an output's cosine similarity to the "
                               "original is below this")
    compress.add_argument("--report", metavar="FILE", help="write the JSON report")
    compress.add_argument("--no-guard", action="store_true",
                          help="factorize even where ranks do not reduce params and FLOPs "
                               "(e.g. --rank full to check exactness)")
    compress.add_argument("--tucker-sweeps", type=int, default=0, metavar="N",
                          help="HOOI sweeps refining the Tucker-2 HOSVD (default 0)")
    compress.add_argument("--seed", type=int, default=0, help="seed of the random feeds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Piped output (logs, CI) gets wide tables instead of rich's 80-column fallback.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    errors = Console(stderr=True)
    try:
        shapes = parse_input_shapes(args.input_shape)
        if args.command == "analyze":
            return _analyze(args, shapes, console)
        return _compress(args, shapes, console)
    except LrdeployError as exc:
        errors.print(f"lrdeploy: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        errors.print("lrdeploy: interrupted", markup=False)
        return 130


def _analyze(args, shapes, console: Console) -> int:
    with console.status("analysing (tracing, probing shapes, computing spectra)"):
        analysis = api.analyze(args.model, input_shapes=shapes)
        rows = analysis.rows()
    skipped = [{"site": s.name, "op": s.op, "reason": s.reason} for s in analysis.skipped]
    inputs = [{"name": s.name, "shape": list(s.shape), "assumed_axes": list(s.assumed)}
              for s in analysis.specs]
    print_analysis(console, rows, skipped, inputs)
    if args.json:
        write_json(args.json, {"source": args.model, "inputs": inputs, "sites": rows,
                               "skipped": skipped, "model_params": analysis.total_params})
        console.print(f"wrote {args.json}")
    return 0


def _compress(args, shapes, console: Console) -> int:
    if args.samples < 1:
        raise LrdeployError("--samples must be >= 1")
    with console.status("compressing (tracing, factorizing, verifying)"):
        result = api.compress(
            args.model, args.output, rank=args.rank, method=args.method, only=args.only,
            skip=args.skip, plan=args.plan, guard=not args.no_guard,
            tucker_sweeps=args.tucker_sweeps, calib=args.calib, samples=args.samples,
            min_fidelity=args.min_fidelity, input_shapes=shapes, report=args.report,
            save_plan=args.save_plan, seed=args.seed,
        )
    print_compression(console, result.report)
    written = [p for p in (args.output, args.report, args.save_plan) if p]
    console.print(f"wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
