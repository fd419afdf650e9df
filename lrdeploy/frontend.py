"""Models in: ONNX files (with safe external data) and torch modules, canonicalised for the passes.

Canonical form, which the site finder and the passes rely on:
- every node has a unique name (site names in plans and reports are node names);
- weights given as ``Constant`` nodes are initializers;
- BatchNormalization that follows a Conv or Gemm is folded into it (see ``passes.fold_batchnorm``);
- value shapes and types are inferred where ONNX can infer them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    NameFixPass,
    ShapeInferencePass,
)

from lrdeploy.errors import LrdeployError
from lrdeploy.passes import fold_batchnorm


def load_onnx(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX file, refusing external-data locations outside the model's folder."""
    path = Path(path)
    if not path.exists():
        raise LrdeployError(f"{path}: no such file")
    if not path.is_file():
        raise LrdeployError(f"{path}: not a file")
    if path.suffix == ".py":
        raise LrdeployError(f"{path}: a torch model is given as {path}:FACTORY, FACTORY being "
                            "the function in it that returns the nn.Module")
    with open(path, "rb") as head:
        if head.read(4) == b"PK\x03\x04":  # torch.save writes a zip archive
            raise LrdeployError(f"{path}: a zip archive (a PyTorch checkpoint?), not an ONNX "
                                "model: give the model as FILE.py:FACTORY, or export it to "
                                "ONNX first")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types for bad bytes
        raise LrdeployError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not proto.graph.node or not proto.opset_import:
        raise LrdeployError(f"{path}: not an ONNX model (no graph nodes or no opset)")
    base_dir = path.resolve().parent
    for tensor in _all_tensors(proto.graph):
        if onnx.external_data_helper.uses_external_data(tensor):
            _check_external_location(path, base_dir, tensor)
    try:
        onnx.load_external_data_for_model(proto, str(base_dir))
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise LrdeployError(f"{path}: invalid ONNX model ({_first_line(exc)})") from None
    return ir.serde.deserialize_model(proto)


def onnx_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files an ONNX model is read from: the model and the external-data files it names
    in its folder (outputs must replace none of them). Only the model's own bytes are parsed;
    a file that is not a readable model is left to ``load_onnx`` to refuse."""
    path = Path(path)
    files = [path]
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf raises several unrelated types for bad bytes
        return files
    base_dir = path.resolve().parent
    for tensor in _all_tensors(proto.graph):
        if onnx.external_data_helper.uses_external_data(tensor):
            location = _external_location(tensor)
            target = base_dir / location
            if location and target not in files:
                files.append(target)
    return files


def _external_location(tensor: onnx.TensorProto) -> str:
    return {entry.key: entry.value for entry in tensor.external_data}.get("location", "")


def _check_external_location(path: Path, base_dir: Path, tensor: onnx.TensorProto) -> None:
    location = _external_location(tensor)
    target = (base_dir / location).resolve()
    if os.path.isabs(location) or not target.is_relative_to(base_dir):
        raise LrdeployError(
            f"{path}: external data of tensor '{tensor.name}' points outside the model folder "
            f"({location!r})"
        )
    if not target.is_file():
        raise LrdeployError(
            f"{path}: external data file {location!r} of tensor '{tensor.name}' is missing"
        )


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    # onnx.external_data_helper only offers this walk as a private function.
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    text = ANSI_ESCAPE.sub("", str(exc)).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _raised_by_user_code(where: str, exc: BaseException, path: Path | None) -> LrdeployError:
    """One line for an exception from the user's own code (their module, factory or forward):
    its type and message, and the line of their file it was raised from when it was."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if path is not None and Path(frame.filename).resolve() == path.resolve()]
    line = f" at {path.name} line {frames[-1].lineno}" if frames else ""
    return LrdeployError(f"{where}: {type(exc).__name__}{line}: {_first_line(exc)}")


def load_torch_factory(spec: str) -> Any:
    """Import ``file.py:factory`` and call the factory; it must return a ``torch.nn.Module``."""
    import torch

    file_part, _, factory_name = spec.rpartition(":")
    path = Path(file_part)
    if not file_part or not factory_name:
        raise LrdeployError(f"{spec}: expected FILE.py:FACTORY")
    if not path.is_file():
        raise LrdeployError(f"{path}: no such file")
    module_name = f"_lrdeploy_user_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise LrdeployError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise _raised_by_user_code(f"{path}: importing it raised", exc, path) from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise LrdeployError(f"{path}: has no callable '{factory_name}'")
    try:
        net = factory()
    except Exception as exc:
        raise _raised_by_user_code(f"{spec}: the factory raised", exc, path) from None
    if not isinstance(net, torch.nn.Module):
        raise LrdeployError(f"{spec}: returned {type(net).__name__}, not a torch.nn.Module")
    return net


def export_torch(module: Any, example_inputs: Sequence[Any], source: str = "the model",
                 path: Path | None = None) -> ir.Model:
    """Trace a torch module to ONNX with torch's exporter (dynamo), in eval mode. ``source``
    names the model in errors, ``path`` is the user's file that defines it, if any."""
    import torch

    module = module.eval()
    # Run once eagerly first: a model that fails on the inputs (a wrong --input-shape, most
    # often) says so in one line, where torch.export logs the meta kernels' tracebacks and
    # raises a generic "failed to export".
    shapes = " ".join(str(list(t.shape)) for t in example_inputs if hasattr(t, "shape"))
    try:
        with torch.no_grad():
            module(*example_inputs)
    except Exception as exc:
        raise _raised_by_user_code(f"{source} fails on inputs of shape {shapes}", exc,
                                   path) from None
    # The exporter logs a line per optional torchvision op it cannot register, warns about its
    # own internals, and when it fails, logs the tracebacks of its fallbacks and prints the
    # graphs it traced: noise for a user who only traces a model; the reason is in the error.
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.CRITICAL)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(
                io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, tuple(example_inputs), dynamo=True,
                                        verbose=False)
    except Exception as exc:
        cause = exc
        while cause.__cause__ is not None:  # the exporter wraps the reason in its own message
            cause = cause.__cause__
        raise LrdeployError(f"{source}: torch.onnx.export failed: {type(cause).__name__}: "
                            f"{_first_line(cause)}") from None
    finally:
        torch_logger.setLevel(level)
    if program is None:
        raise LrdeployError(f"{source}: torch.onnx.export returned no program")
    return program.model


def canonicalize(model: ir.Model) -> ir.Model:
    """Return the canonical form of ``model`` (see the module docstring); the input is unchanged."""
    model = ir.from_proto(ir.to_proto(model))
    # size_limit=0: a weight given as a Constant node is a weight whatever its size.
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    model = fold_batchnorm.fold_batchnorm(model)
    NameFixPass()(model)
    ShapeInferencePass(strict_mode=False)(model)
    return model
