"""Data-aware (whitened) SVD: factors that keep the layer's *outputs* on calibration data.

Plain SVD minimises the weight error ``||W - U V||``; what matters is the output error on the
activations X that actually reach the layer. With ``X^T X = R^T R`` (Cholesky, damped):

    ||X W - X U V||_F = ||R W - R U V||_F
    R W ~= P_r S_r Q_r^T          (truncated SVD of the whitened weight)
    U = R^{-1} P_r S_r^{1/2},  V = S_r^{1/2} Q_r^T

so the rank-r factors are optimal for the calibration data, and the squared output error on
that data is the tail ``sum_{i>r} s_i^2`` of the whitened spectrum (used by the rank rules:
``energy:E`` keeps a fraction E of the output energy). On other data it is larger; the planner
measures it on held-out samples (``decompositions.svd_output_errors`` with ``fit_gram``).

Matrices (``y = x @ W``: X rows are the vectors x) and 1x1 convolutions (``y = W x`` at every
pixel: X rows are pixels, W is transposed around the whitening) get the same graph as plain SVD;
only the factor values change. A site with no calibration statistics gets plain SVD factors.
The bias is corrected as for plain SVD (``MatrixFactorization``); whitening by the uncentred
``X^T X`` already keeps the mean direction among the first ones, so the correction is small here.

k x k convolutions, the analogue on unfolded inputs (``wspatial``): spatial SVD factors the
unfolding ``M[(c, i), (o, j)] = W[o, c, i, j]`` (``spatial_svd_conv``). With X the vertical
input patches (one row per output row and input column: ``X[(h, w), (c, i)] = x[c, h s + i d,
w]`` with the height stride s and dilation d, x padded in height), the output is (width stride
1 and no width padding, for short) ``y[o, h, w] = sum_j (X M)[(h, w + j), (o, j)]``: each
horizontal tap j reads column j of X M. The factors whitened by ``X^T X`` minimise
``||X M - X A B||_F^2``, the sum over the taps of each tap's squared output error; the cross
terms between taps (neighbouring columns' errors adding up in one output) are left out, as
the objective of an SVD must be one matrix product. Its graph is plain spatial SVD's, and its
bias is corrected as there (``spatial_svd_conv``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lrdeploy.decompositions import spatial_svd, whitened_svd_factors, whitening
from lrdeploy.passes.base import MatrixFactorization
from lrdeploy.passes.spatial_svd_conv import SpatialSVDConv
from lrdeploy.passes.svd_conv1x1 import SVDConv1x1
from lrdeploy.passes.svd_matmul import SVDMatMul
from lrdeploy.sites import Site


def whitened_unfolding(matrix: np.ndarray, gram: np.ndarray | None, inputs_on_rows: bool
                       ) -> np.ndarray:
    """``R M`` with ``R^T R = gram``, the input features' side of ``matrix`` whitened (its
    spectrum sets the data-aware ranks); ``matrix`` as it is without a ``gram``."""
    if gram is None:
        return matrix
    if inputs_on_rows:
        return whitening(gram) @ matrix
    return (whitening(gram) @ matrix.T).T


class Whitened:
    """Mixin over a rule with a data-aware variant (a ``BiasCorrection`` rule); ``grams`` and
    ``means`` map a site name to ``X^T X`` and the mean of its input features. The whitened
    unfolding's spectrum sets the data-aware ranks."""

    def __init__(self, grams: Mapping[str, np.ndarray] | None = None,
                 means: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__(means)
        self.grams = dict(grams or {})

    def unfoldings(self, site: Site) -> list[np.ndarray]:
        (matrix,) = super().unfoldings(site)
        return [whitened_unfolding(matrix, self.grams.get(site.name), self.inputs_on_rows(site))]


class WhitenedSVD(Whitened, MatrixFactorization):
    """Mixin over an SVD rule."""

    method = "wsvd"

    def factors(self, site: Site, matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        gram = self.grams.get(site.name)
        if gram is None:
            return super().factors(site, matrix, rank)
        if self.inputs_on_rows(site):
            return whitened_svd_factors(matrix, gram, rank)
        left, right = whitened_svd_factors(matrix.T, gram, rank)
        return right.T, left.T


class WhitenedSVDMatMul(WhitenedSVD, SVDMatMul):
    pass


class WhitenedSVDConv1x1(WhitenedSVD, SVDConv1x1):
    pass


class WhitenedSpatialSVDConv(Whitened, SpatialSVDConv):
    """Spatial SVD fitted to calibration data; ``grams`` maps a site name to ``X^T X`` of its
    vertical input patches (see the module doc)."""

    method = "wspatial"

    def kernels(self, site: Site, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return spatial_svd(site.weight, rank, self.grams.get(site.name))
