"""Does the compressed model still compute what the original did? Checked, not assumed.

Both models run in onnxruntime on the same feeds; per output we report the largest absolute
difference, the relative L2 error ``||a - b|| / ||a||`` and the cosine similarity of the
flattened outputs over all feeds.

Float32 itself is not exact: the original model run with onnxruntime's graph rewrites off
differs from the same model with them on. That relative L2 difference is reported as the noise
floor, so an exact rewrite can be told from a lossy one.

A lossy model is compared only where outputs carry data: per-position outputs (a text model's
token states) at positions its padding mask marks as padding (``calibration.padding_mask``)
are left out, as a user of those outputs leaves them out. A compiled artifact is compared with
onnxruntime everywhere: it should compute the same numbers, padding included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_ir as ir

from lrdeploy import runtime
from lrdeploy.calibration import padding_mask, per_position
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


def reference_outputs(
    model: ir.Model, feeds: Sequence[runtime.Feeds]
) -> tuple[list[str], list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Output names, and per feed the outputs of onnxruntime with and without graph rewrites."""
    optimized = runtime.session(model)
    plain = runtime.session(model, optimize=False)
    names = [o.name for o in optimized.get_outputs()]
    with_rewrites = [list(runtime.run(optimized, feed).values()) for feed in feeds]
    without = [list(runtime.run(plain, feed).values()) for feed in feeds]
    return names, with_rewrites, without


def compare_outputs(
    names: Sequence[str],
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    unoptimized: Sequence[Sequence[np.ndarray]],
    masks: Sequence[np.ndarray | None] | None = None,
) -> list[OutputFidelity]:
    """Fidelity per output over all feeds (each argument: per feed, outputs in ``names`` order);
    with ``masks`` (per feed, its ``padding_mask``), per-position outputs at padded positions
    are left out."""
    masks = masks or [None] * len(reference)
    results = []
    for index, name in enumerate(names):
        ref, cand, plain = [], [], []
        for feed_ref, feed_cand, feed_plain, mask in zip(reference, candidate, unoptimized,
                                                         masks, strict=True):
            if len(feed_cand) != len(names):
                raise LrdeployError(f"expected {len(names)} outputs, got {len(feed_cand)}")
            if feed_ref[index].shape != feed_cand[index].shape:
                raise LrdeployError(f"output '{name}' changed shape: {feed_ref[index].shape} -> "
                                    f"{feed_cand[index].shape}")
            for kept, outputs in ((ref, feed_ref), (cand, feed_cand), (plain, feed_plain)):
                kept.append(_data_positions(np.asarray(outputs[index], np.float64), mask))
        ref_all = np.concatenate(ref)
        measured = _fidelity(name, ref_all, np.concatenate(cand))
        floor = _fidelity(name, ref_all, np.concatenate(plain)).relative_l2_error
        results.append(OutputFidelity(name, measured.max_abs_error, measured.relative_l2_error,
                                      measured.cosine, floor))
    return results


def compare(
    original: ir.Model, candidate: ir.Model, feeds: Sequence[runtime.Feeds]
) -> list[OutputFidelity]:
    """Fidelity of ``candidate`` against ``original``, output by output, over all feeds."""
    names, reference, unoptimized = reference_outputs(original, feeds)
    candidate_session = runtime.session(candidate)
    produced = [list(runtime.run(candidate_session, feed).values()) for feed in feeds]
    return compare_outputs(names, reference, produced, unoptimized,
                           [padding_mask(feed) for feed in feeds])


def _data_positions(output: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The output's values, flattened, less those at padded positions where it has one entry
    per position of ``mask``."""
    if not per_position(output, mask):
        return output.ravel()
    # (batch, sequence, ...) and (batch * sequence, ...) alike: one row per position
    return output.reshape(mask.size, -1)[mask.reshape(-1)].ravel()


def _fidelity(name: str, a: np.ndarray, b: np.ndarray) -> OutputFidelity:
    finite = np.isfinite(a)
    if not finite.all() or not np.isfinite(b).all():
        # Where the original is not finite (a -inf log-probability), the same value counts as
        # agreement and the finite positions are compared. Anything else non-finite in ``b``
        # is an output that lost its values: infinite error (NaN would compare false with
        # every tolerance and pass), undefined cosine.
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        if not (same[~finite].all() and np.isfinite(b[finite]).all()):
            return OutputFidelity(name, math.inf, math.inf, math.nan)
        a, b = a[finite], b[finite]
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
