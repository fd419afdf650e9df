"""What every low-rank rewrite shares: the rule-object interface and the graph plumbing.

A ``Factorization`` is a rule object. It says which sites it applies to, which matrices'
spectra set its ranks (one matrix per rank), what a choice of ranks costs in parameters and
FLOPs, and how to rewrite one node. Calling it, ``rule(model, {site_name: ranks})``, is the pure
``Model -> Model`` pass: the input model is not modified.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lrdeploy.decompositions import svd_factors
from lrdeploy.sites import Site, classify


@dataclass(frozen=True)
class Cost:
    """Parameters and FLOPs of one site's operator chain (FLOPs None when shapes are unknown)."""

    params: int
    flops: int | None


class Factorization:
    """Base class of the low-rank rewrites; subclasses fill in the four methods below."""

    method: str = ""

    def applies(self, site: Site) -> bool:
        raise NotImplementedError

    def unfoldings(self, site: Site) -> list[np.ndarray]:
        """The matrices whose singular values set each rank, in the order of ``ranks``."""
        raise NotImplementedError

    def cost(self, site: Site, ranks: Sequence[int]) -> Cost:
        raise NotImplementedError

    def rewrite(self, graph: ir.Graph, node: ir.Node, site: Site, ranks: Sequence[int]) -> None:
        """Replace ``node`` in ``graph`` by the factorized chain (in place, on a copy)."""
        raise NotImplementedError

    def approximation(self, site: Site, ranks: Sequence[int]) -> np.ndarray:
        """The weight, shaped as ``site.weight``, that the chain ``rewrite`` builds applies:
        the site's operator with this weight computes what the chain does, up to rounding (and
        before any bias correction). The planner measures a candidate's model error by feeding
        it in place of the weight, without building the chain."""
        raise NotImplementedError

    def inputs_on_rows(self, site: Site) -> bool:
        """Whether ``unfoldings(site)[0]`` holds the site's input features on its rows
        (``y = x @ M``), which is what whitening by the inputs' ``X^T X`` multiplies; rules
        with a data-aware variant say."""
        raise NotImplementedError

    def full_ranks(self, site: Site) -> tuple[int, ...]:
        return tuple(min(m.shape) for m in self.unfoldings(site))

    def __call__(self, model: ir.Model, ranks_by_site: Mapping[str, Sequence[int]]) -> ir.Model:
        model = model.clone()
        nodes = {node.name: node for node in model.graph}
        for name, ranks in ranks_by_site.items():
            node = nodes[name]
            site = classify(node, {})
            if not isinstance(site, Site) or not self.applies(site):
                raise ValueError(f"{self.method} does not apply to site '{name}'")
            self.rewrite(model.graph, node, site, ranks)
        RemoveUnusedNodesPass()(model)
        return model


class BiasCorrection:
    """Bias correction for a rule whose chain ends in the site's bias (with ``means``, by site
    name: the mean ``mu`` of the site's input features on calibration data). Written as
    ``y = x @ W + b`` with an approximation ``W ~= A``, the output error at an input x is
    ``x @ E`` with ``E = W - A``; its mean ``delta = mu @ E`` is a constant, and is added to
    the bias:

        y ~= x @ A + (b + delta)
        ||X E - 1 delta||_F^2 = ||(X - 1 mu) E||_F^2 = ||X E||_F^2 - n ||delta||^2

    so the site's output error on the calibration data never grows, for any factors. Only
    sites with a bias get it (a Gemm's C, a conv's bias, the Add after a MatMul), so the chain's
    operators and shapes, hence its latency, are those of the uncorrected one. Inputs after a
    ReLU or a LayerNorm have means far from zero, which plain SVD ignores: at half rank the
    correction removes about a fifth (MiniLM-L6) and a third (MobileNetV2) of the sites'
    squared output error. The *model's* error need not follow (on MiniLM-L6 it grows), so the
    planner measures a plan both ways. Nagel et al. [1] correct quantized weights the same way.

    References
    ----------
    .. [1] M. Nagel, M. van Baalen, T. Blankevoort, M. Welling, "Data-Free Quantization Through
       Weight Equalization and Bias Correction", ICCV 2019.
    """

    def __init__(self, means: Mapping[str, np.ndarray] | None = None) -> None:
        self.means = dict(means or {})

    def corrects_bias(self, site: Site) -> bool:
        return site.name in self.means and bool(site.bias_params or site.bias_follows)

    def output_shift(self, site: Site, error: Callable[[], np.ndarray]) -> np.ndarray | None:
        """``delta = mu @ error()`` for the weight error oriented as in ``y = x @ W`` (input
        features on its rows); None where the site's bias is not corrected. ``error`` is
        called only then: a chain built without means does not pay for the dense product."""
        return self.means[site.name] @ error() if self.corrects_bias(site) else None


def kernel_mean_error(site: Site, approximation: np.ndarray) -> np.ndarray:
    """A k x k conv's weight error ``E = W - approximation`` summed over the kernel's columns,
    as the (C_in kh) x C_out matrix that a k x k site's ``means`` (the mean vertical input patch,
    ``calibration.vertical_patches``) multiplies to give the mean output error: every column
    tap j reads such a patch, so

        delta[o] = sum_{c, i, j} E[o, c, i, j] mu[(c, i)]

    exact away from the width padding (a tap that reads padding reads zeros, not the mean)."""
    error = (site.weight - approximation).sum(axis=3)
    return error.reshape(len(error), -1).T


class MatrixFactorization(BiasCorrection, Factorization):
    """A rule whose site is one matrix split in two factors (SVD of a matrix or a 1x1 conv);
    ``factors`` is where data-aware variants choose the factors differently. Biases are
    corrected with ``means`` (``BiasCorrection``)."""

    def inputs_on_rows(self, site: Site) -> bool:
        # x @ W; W @ x and a 1x1 conv's (C_out, C_in) kernel hold the inputs on their columns
        return site.side == "right"

    def matrix(self, site: Site) -> np.ndarray:
        """The matrix ``rewrite`` splits: ``matrix(site) ~= left @ right``."""
        raise NotImplementedError

    def unfoldings(self, site: Site) -> list[np.ndarray]:
        return [self.matrix(site)]

    def factors(self, site: Site, matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``matrix ~= left @ right`` with ``rank`` columns in ``left``."""
        return svd_factors(matrix, rank)

    def approximation(self, site: Site, ranks: Sequence[int]) -> np.ndarray:
        (rank,) = ranks
        left, right = self.factors(site, self.matrix(site), rank)
        return (left @ right).reshape(site.weight.shape)


# Nodes of a factorized chain are named SITE/TAG_INDEX (e.g. ".../query/MatMul/svd_0"), so a
# node name in a profile or a kernel table leads back to its site.
CHAIN_TAGS = ("svd", "tucker", "spatial", "tt")
_CHAIN_NODE = re.compile(rf"^(?P<site>.+)/({'|'.join(CHAIN_TAGS)})_\d+$")


def chain_node_names(site_name: str, tag: str, count: int) -> list[str]:
    """Names of the ``count`` nodes of the chain that replaces site ``site_name``."""
    assert tag in CHAIN_TAGS
    return [f"{site_name}/{tag}_{index}" for index in range(count)]


def site_of_node(node_name: str) -> tuple[str, bool]:
    """The site a node belongs to, and whether it is part of a factorized chain."""
    match = _CHAIN_NODE.match(node_name)
    return (match.group("site"), True) if match else (node_name, False)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, like: ir.Value | None
                    ) -> ir.Value:
    """Register ``array`` (cast to the dtype of ``like``; as it is without one) as a new
    initializer of ``graph``."""
    dtype = None if like is None else like.const_value.dtype.numpy()
    # ascontiguousarray makes a 0-d array 1-d: the reshape keeps a scalar (Gemm's beta) one.
    tensor = ir.tensor(np.ascontiguousarray(array, dtype=dtype).reshape(array.shape), name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def shifted_bias(graph: ir.Graph, name: str, bias: ir.Value, shift: np.ndarray) -> ir.Value:
    """A new initializer ``bias + shift`` (the constant ``bias`` may be shared)."""
    return add_initializer(graph, name, bias.const_value.numpy() + shift, bias)


def replace_node(graph: ir.Graph, node: ir.Node, chain: Sequence[ir.Node]) -> None:
    """Put ``chain`` where ``node`` was; the chain's last output takes over the node's output."""
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], list(chain), [node.outputs[0]], [chain[-1].outputs[0]]
    )


def conv_node(
    name: str,
    x: ir.Value,
    weight: ir.Value,
    bias: ir.Value | None,
    kernel: tuple[int, int],
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    auto_pad: str = "NOTSET",
) -> ir.Node:
    """A plain group-1 2-D Conv node. ``auto_pad`` SAME_* / VALID replaces explicit ``pads``:
    SAME padding is computed per spatial axis, so a conv that keeps one axis's kernel, stride
    and dilation pads that axis exactly as the original did."""
    inputs = [x, weight] if bias is None else [x, weight, bias]
    attributes = {
        "kernel_shape": list(kernel),
        "strides": list(strides),
        "dilations": list(dilations),
        "group": 1,
    }
    if auto_pad == "NOTSET":
        attributes["pads"] = list(pads)
    else:
        attributes["auto_pad"] = auto_pad
    return ir.node("Conv", inputs, attributes=attributes, name=name)
