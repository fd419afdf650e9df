"""Does the compressed model still compute what the original did? Checked, not assumed.

Both models run in onnxruntime on the same feeds; per output we report the largest absolute
difference, the relative L2 error ``||a - b|| / ||a||`` and the cosine similarity of the
flattened outputs over all feeds.

Float32 itself is not exact: the original model run with onnxruntime's graph rewrites off
differs from the same model with them on. That relative L2 difference is reported as the noise
floor, so an exact rewrite can be told from a lossy one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_ir as ir

from lrdeploy import runtime
from lrdeploy.errors import LrdeployError


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    max_abs_error: float
    relative_l2_error: float
    cosine: float
    noise_floor: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_onnx(model: ir.Model) -> None:
    """The full ONNX checker (with strict shape inference); raises ``LrdeployError``."""
    try:
        onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LrdeployError(f"the compressed model fails the ONNX checker: {first}") from None


def compare(
    original: ir.Model, candidate: ir.Model, feeds: Sequence[runtime.Feeds]
) -> list[OutputFidelity]:
    """Fidelity of ``candidate`` against ``original``, output by output, over all feeds."""
    reference_session = runtime.session(original)
    unoptimized_session = runtime.session(original, optimize=False)
    candidate_session = runtime.session(candidate)
    names = [o.name for o in reference_session.get_outputs()]
    reference = {name: [] for name in names}
    unoptimized = {name: [] for name in names}
    produced = {name: [] for name in names}
    for feed in feeds:
        ref_out = runtime.run(reference_session, feed)
        plain_out = runtime.run(unoptimized_session, feed)
        cand_out = runtime.run(candidate_session, feed)
        for name in names:
            if ref_out[name].shape != cand_out[name].shape:
                raise LrdeployError(
                    f"output '{name}' changed shape: {ref_out[name].shape} -> "
                    f"{cand_out[name].shape}"
                )
            reference[name].append(ref_out[name].astype(np.float64).ravel())
            unoptimized[name].append(plain_out[name].astype(np.float64).ravel())
            produced[name].append(cand_out[name].astype(np.float64).ravel())
    results = []
    for name in names:
        ref = np.concatenate(reference[name])
        floor = _fidelity(name, ref, np.concatenate(unoptimized[name])).relative_l2_error
        measured = _fidelity(name, ref, np.concatenate(produced[name]))
        results.append(OutputFidelity(measured.name, measured.max_abs_error,
                                      measured.relative_l2_error, measured.cosine, floor))
    return results


def _fidelity(name: str, a: np.ndarray, b: np.ndarray) -> OutputFidelity:
    if a.size == 0:
        return OutputFidelity(name, 0.0, 0.0, 1.0)
    diff = a - b
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    rel = float(np.linalg.norm(diff) / norm_a) if norm_a > 0 else float(np.linalg.norm(diff) > 0)
    if norm_a > 0 and norm_b > 0:
        cosine = float(np.dot(a, b) / (norm_a * norm_b))
    else:
        cosine = 1.0 if norm_a == norm_b else 0.0
    return OutputFidelity(name, float(np.max(np.abs(diff))), rel, cosine)
