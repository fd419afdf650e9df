"""The factorization methods by name, and which one a site gets under ``--method``.

Matrices and 1x1 convolutions use SVD (Tucker-2 and spatial SVD reduce to it there): data-aware
(whitened) SVD when calibration statistics are given, plain SVD otherwise. ``--method`` chooses
what k x k convolutions get; spatial SVD is data-aware with calibration statistics too (Tucker-2
is not: its factors are fitted to the kernel alone).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lrdeploy.errors import LrdeployError
from lrdeploy.passes.base import Factorization
from lrdeploy.passes.spatial_svd_conv import SpatialSVDConv
from lrdeploy.passes.svd_conv1x1 import SVDConv1x1
from lrdeploy.passes.svd_matmul import SVDMatMul
from lrdeploy.passes.tt_matrix import TTMatrix
from lrdeploy.passes.tucker2_conv import Tucker2Conv
from lrdeploy.passes.whitened_svd import (
    WhitenedSpatialSVDConv,
    WhitenedSVDConv1x1,
    WhitenedSVDMatMul,
)
from lrdeploy.sites import Site

METHOD_CHOICES = ("auto", "svd", "tucker2", "spatial")
DENSE = "dense"
# Each method that calibration data can fit, and its data-aware variant.
DATA_AWARE = {"svd": "wsvd", "spatial": "wspatial"}
PLAIN = {aware: plain for plain, aware in DATA_AWARE.items()}
Grams = Mapping[str, np.ndarray]
Means = Mapping[str, np.ndarray]


def rules(tucker_sweeps: int = 0, grams: Grams | None = None, means: Means | None = None
          ) -> list[Factorization]:
    """One rule object per (method, site kind); ``grams`` feed the data-aware ones and
    ``means`` correct the biases of every SVD, spatial SVD and Tucker-2."""
    return [SVDMatMul(means), SVDConv1x1(means), WhitenedSVDMatMul(grams, means),
            WhitenedSVDConv1x1(grams, means), Tucker2Conv(tucker_sweeps, means),
            SpatialSVDConv(means), WhitenedSpatialSVDConv(grams, means), TTMatrix()]


def rule_for(method: str, site: Site, tucker_sweeps: int = 0, grams: Grams | None = None,
             means: Means | None = None) -> Factorization | None:
    """The rule that applies ``method`` to ``site``, or None if the method does not fit it."""
    for rule in rules(tucker_sweeps, grams, means):
        if rule.method == method and rule.applies(site):
            return rule
    return None


def method_for(choice: str, site: Site, data_aware: bool = False) -> str | None:
    """The method ``--method choice`` gives ``site`` (None: the choice does not cover it)."""
    if choice not in METHOD_CHOICES:
        raise LrdeployError(f"--method {choice!r}: expected one of {', '.join(METHOD_CHOICES)}")
    if not site.is_conv or site.kernel == (1, 1):
        return "wsvd" if data_aware else "svd"
    if choice == "svd":
        return None
    if choice == "auto":
        return "tucker2"
    return DATA_AWARE[choice] if data_aware and choice in DATA_AWARE else choice
