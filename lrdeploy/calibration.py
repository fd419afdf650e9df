"""Calibration statistics: the Gram matrix ``X^T X`` and the mean row of the activations X
entering each site.

Activations are captured with onnxruntime (the site inputs are exposed as extra outputs) one
feed at a time and accumulated in float64, so memory stays at one feed's activations.

Padding is not data: where a feed carries a padding mask (an ``attention_mask`` input, as
Hugging Face's text models take), the rows of padded positions are left out. They change no
output a user reads, yet on MiniLM with Lee's texts padded to 128 they were half the
activation energy entering the first layer, and they changed which ranks looked cheap in error.

Whitened factors fit the samples they were computed from: on MobileNetV2, 16 photos' statistics
gave a plan 0.15 relative output error on those photos and 0.85 on 16 others. So errors are
measured on samples held out of the statistics (``split_calibration``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

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
    at the pixels a 1x1 conv reads for convolutions (its stride skips the others), and for a
    k x k conv the vertical patches its spatial SVD's first conv reads (``vertical_patches``)."""
    if site.side == "right":
        return activation.reshape(-1, activation.shape[-1])
    if site.side == "left":
        return np.swapaxes(activation, -1, -2).reshape(-1, activation.shape[-2])
    if site.kernel != (1, 1):
        return vertical_patches(site, activation)
    strided = activation[:, :, :: site.strides[0], :: site.strides[1]]
    return strided.transpose(0, 2, 3, 1).reshape(-1, activation.shape[1])


def vertical_patches(site: Site, activation: np.ndarray) -> np.ndarray:
    """The kh x 1 patches of a k x k conv's input (N, C, H, W) at each output row and input
    column, one row each, features ordered (channel, kernel row) as in
    ``decompositions.spatial_unfolding``: height padded, strided and dilated as the conv does
    (its width is the second conv's business)."""
    _, channels, height, _ = activation.shape
    kh, stride, dilation = site.kernel[0], site.strides[0], site.dilations[0]
    top, bottom = height_pads(site, height)
    padded = np.pad(activation, ((0, 0), (0, 0), (top, bottom), (0, 0)))
    rows_out = (height + top + bottom - dilation * (kh - 1) - 1) // stride + 1
    taps = [padded[:, :, i * dilation: i * dilation + stride * (rows_out - 1) + 1: stride]
            for i in range(kh)]
    return np.stack(taps, axis=2).transpose(0, 3, 4, 1, 2).reshape(-1, channels * kh)


def height_pads(site: Site, height: int) -> tuple[int, int]:
    """A conv's (top, bottom) padding at input height ``height``, ``auto_pad`` resolved."""
    if site.auto_pad == "VALID":
        return 0, 0
    if site.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return site.pads[0], site.pads[2]
    stride, span = site.strides[0], site.dilations[0] * (site.kernel[0] - 1) + 1
    total = max(0, (-(-height // stride) - 1) * stride + span - height)
    half = total // 2
    return (half, total - half) if site.auto_pad == "SAME_UPPER" else (total - half, half)


def padding_mask_input(feed: runtime.Feeds) -> str | None:
    """The name of the feed's padding mask: an input of ``runtime.PADDING_MASK_INPUTS`` shaped
    (batch, sequence) that holds only 0 and 1, and some 1s; None where it has none."""
    for name in runtime.PADDING_MASK_INPUTS:
        mask = feed.get(name)
        if mask is not None and mask.ndim == 2 and np.isin(mask, (0, 1)).all() and mask.any():
            return name
    return None


def padding_mask(feed: runtime.Feeds) -> np.ndarray | None:
    """The feed's positions that hold data, (batch, sequence) booleans, where the feed carries
    a padding mask (``padding_mask_input``); None otherwise."""
    name = padding_mask_input(feed)
    return None if name is None else feed[name].astype(bool)


def per_position(array: np.ndarray, mask: np.ndarray | None) -> bool:
    """Whether ``array`` holds one row per (batch, sequence) position of ``mask``: shaped
    (batch, sequence, ...) or (batch * sequence, ...)."""
    return mask is not None and array.ndim >= 2 and (
        array.shape[:2] == mask.shape or array.shape[0] == mask.size)


def data_rows(site: Site, activation: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``feature_rows`` of the positions that hold data: padded positions dropped where the
    activation has one row per masked position (a matrix site's ``x @ W`` on token states)."""
    rows = feature_rows(site, activation)
    if site.side == "right" and per_position(activation, mask) and len(rows) == mask.size:
        return rows[mask.reshape(-1)]
    return rows


class SiteStatistics(NamedTuple):
    """Per site name: ``X^T X`` of its input features, and their mean (one value a feature)."""

    grams: dict[str, np.ndarray]
    means: dict[str, np.ndarray]


HELD_OUT_FRACTION = 4  # one calibration sample in this many is held out of the statistics


class CalibrationSplit(NamedTuple):
    """Calibration feeds split into those the statistics are fitted on and those errors are
    measured on."""

    fit: list[runtime.Feeds]
    held_out: list[runtime.Feeds]

    @property
    def disjoint(self) -> bool:
        return self.fit is not self.held_out


def split_calibration(feeds: Sequence[runtime.Feeds]) -> CalibrationSplit:
    """The last quarter of ``feeds`` (at least one) held out of the statistics, the rest to fit
    them; a single feed does both (its errors are then measured on the data they were fitted
    to). The last ones, not a sample of them: feeds that belong together, such as a photo and
    its mirror image, are usually given next to each other."""
    feeds = list(feeds)
    if len(feeds) < 2:
        return CalibrationSplit(feeds, feeds)
    held = max(1, len(feeds) // HELD_OUT_FRACTION)
    return CalibrationSplit(feeds[:-held], feeds[-held:])


def site_statistics(
    model: ir.Model,
    sites: Sequence[Site],
    feeds: Sequence[runtime.Feeds],
    progress: Callable[[str], None] = lambda message: None,
    shrink: bool = True,
) -> SiteStatistics:
    """``X^T X`` and the mean row of X (``feature_rows``) at the input of each site over
    ``feeds`` (padded positions left out, ``data_rows``); the Gram matrix shrunk towards a
    multiple of the identity by the Ledoit-Wolf rule (``shrink``).

    Every sample counts alike, however many rows it holds: a sample's rows are weighted by
    ``N / (F n_f)`` (``n_f`` its rows, ``N`` all rows, ``F`` the samples), which changes
    nothing when all samples have as many rows. Once padding is left out, a one-word query
    holds 3 rows where a passage holds 128, and would otherwise hardly count, although a
    model serving both is judged on each alike. (The planner's model error pools feeds
    instead; see ``Planner.model_error``.) On MiniLM
    at 75% of its latency (one planner run each way), the plain-SVD planner's plan kept the
    dense model's word similarities better with samples weighed alike (Spearman over 79,800
    word pairs 0.46, against 0.35 with rows weighed alike).

    Few calibration samples for many features (a classifier's 1280 inputs from 32 images) give
    a rank-deficient Gram matrix: factors whitened by it fit the calibration set exactly and
    generalise badly. Ledoit-Wolf picks the shrinkage from the data themselves (none when
    samples are plentiful).
    """
    names = {s.name: site_input_name(model, s) for s in sites}
    session = runtime.session(model, sorted(set(names.values())))
    # per site: X^T X, sum_i |x_i|^4, row count, sum_i x_i, each sample's rows weighted
    stats: dict[str, list] = {s.name: [0.0, 0.0, 0, 0.0] for s in sites}
    for index, feed in enumerate(feeds):
        progress(f"calibration activations {index + 1}/{len(feeds)}")
        outputs = runtime.run(session, feed)
        mask = padding_mask(feed)
        for site in sites:
            name = names[site.name]
            activation = outputs[name] if name in outputs else feed[name]
            rows = data_rows(site, activation, mask).astype(np.float64)
            weight = 1 / max(len(rows), 1)
            entry = stats[site.name]
            entry[0] = entry[0] + weight * (rows.T @ rows)
            entry[1] += weight**2 * float(np.sum(np.sum(rows**2, axis=1) ** 2))
            entry[2] += rows.shape[0]
            entry[3] = entry[3] + weight * rows.sum(axis=0)
    # back to the scale of rows: weights N / (F n_f), not 1 / n_f
    scale = {name: entry[2] / max(len(feeds), 1) for name, entry in stats.items()}
    stats = {name: [gram * scale[name], fourth * scale[name] ** 2, count, total * scale[name]]
             for name, (gram, fourth, count, total) in stats.items()}
    grams = {name: ledoit_wolf(gram, fourth, count) if shrink else gram
             for name, (gram, fourth, count, _) in stats.items()}
    means = {name: total / count for name, (_, _, count, total) in stats.items()}
    return SiteStatistics(grams, means)


def ledoit_wolf(gram: np.ndarray, fourth: float, count: int) -> np.ndarray:
    """The Ledoit-Wolf shrinkage of the second-moment matrix, scaled back to a Gram matrix.

    With ``S = gram / n``, ``m = tr(S) / d``, ``delta^2 = ||S - m I||_F^2`` and
    ``beta^2 = min(delta^2, (sum_i ||x_i||^4 - n ||S||_F^2) / n^2)``, the estimate is
    ``n ((beta^2 / delta^2) m I + (1 - beta^2 / delta^2) S)``. Only the Gram matrix and
    ``sum_i ||x_i||^4`` are needed, so it streams over the feeds (scikit-learn's
    ``ledoit_wolf`` needs every sample in memory at once).

    References
    ----------
    .. [1] O. Ledoit, M. Wolf, "A well-conditioned estimator for large-dimensional covariance
       matrices", J. Multivariate Analysis 88(2), 2004.
    """
    second = gram / count
    dims = len(second)
    mean = np.trace(second) / dims
    delta = float(np.sum((second - mean * np.eye(dims)) ** 2))
    if delta <= 0:
        return gram
    beta = min(delta, max(0.0, (fourth - count * float(np.sum(second**2))) / count**2))
    weight = beta / delta
    return count * (weight * mean * np.eye(dims) + (1 - weight) * second)
