"""Calibration statistics: the Gram matrix ``X^T X`` of the activations entering each site.

Activations are captured with onnxruntime (the site inputs are exposed as extra outputs) one
feed at a time and accumulated in float64, so memory stays at one feed's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from lrdeploy import runtime
from lrdeploy.sites import Site


def site_input_name(model: ir.Model, site: Site) -> str:
    """Name of the activation a site multiplies (the non-constant operand)."""
    node = next(node for node in model.graph if node.name == site.name)
    return node.inputs[1 if site.side == "left" else 0].name


def feature_rows(site: Site, activation: np.ndarray) -> np.ndarray:
    """The activation as a (samples x input features) matrix X, so that ``y = X W`` is the
    site's product: the last axis for ``x @ W``, the second-to-last for ``W @ x``, channels
    at the pixels a 1x1 conv reads for convolutions (its stride skips the others)."""
    if site.side == "right":
        return activation.reshape(-1, activation.shape[-1])
    if site.side == "left":
        return np.swapaxes(activation, -1, -2).reshape(-1, activation.shape[-2])
    strided = activation[:, :, :: site.strides[0], :: site.strides[1]]
    return strided.transpose(0, 2, 3, 1).reshape(-1, activation.shape[1])


def site_grams(
    model: ir.Model,
    sites: Sequence[Site],
    feeds: Sequence[runtime.Feeds],
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, np.ndarray]:
    """``X^T X`` at the input of each matrix / 1x1-conv site, summed over ``feeds``.

    k x k convolutions are left out: their data-aware analogue works on unfolded patches,
    which the passes do not use yet.
    """
    wanted = [s for s in sites if not s.is_conv or s.kernel == (1, 1)]
    names = {s.name: site_input_name(model, s) for s in wanted}
    session = runtime.session(model, sorted(set(names.values())))
    grams: dict[str, np.ndarray] = {}
    for index, feed in enumerate(feeds):
        progress(f"calibration activations {index + 1}/{len(feeds)}")
        outputs = runtime.run(session, feed)
        for site in wanted:
            name = names[site.name]
            activation = outputs[name] if name in outputs else feed[name]
            rows = feature_rows(site, activation).astype(np.float64)
            gram = rows.T @ rows
            grams[site.name] = grams[site.name] + gram if site.name in grams else gram
    return grams
