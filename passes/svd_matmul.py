"""Truncated SVD of a constant Gemm / MatMul weight: one matrix product becomes two.

For ``y = x @ W`` with W (K x N) and ``W ~= U V`` (U: K x r, V: r x N, the rank-r SVD with
sqrt(s) on each side):

    y ~= (x @ U) @ V               parameters r (K + N) instead of K N

The factors are applied to the activation in sequence, never multiplied together, so constant
folding (ONNX optimisers, TVM) cannot rebuild the dense W. For Gemm,
``y = alpha * x @ W + beta * C`` becomes ``MatMul(x, U)`` then ``Gemm(., V, C, alpha, beta)``.
A constant left operand, ``y = W @ x``, becomes ``U @ (V @ x)``.
It pays off only when ``r (K + N) < K N`` (the break-even rank), for FLOPs and parameters alike.
With calibration means the mean output error is added to the bias (``MatrixFactorization``):
a Gemm's C, or the constant of the ``Add`` that follows a MatMul as a linear layer's bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from lrdeploy.passes.base import (
    Cost,
    MatrixFactorization,
    add_initializer,
    chain_node_names,
    replace_node,
    shifted_bias,
)
from lrdeploy.sites import Site, following_bias


class SVDMatMul(MatrixFactorization):
    method = "svd"

    def applies(self, site: Site) -> bool:
        return not site.is_conv

    def matrix(self, site: Site) -> np.ndarray:
        return site.weight

    def cost(self, site: Site, ranks: Sequence[int]) -> Cost:
        (rank,) = ranks
        rows, cols = site.weight.shape
        vectors = site.vectors
        flops = None if vectors is None else 2 * vectors * rank * (rows + cols)
        return Cost(rank * (rows + cols) + site.bias_params, flops)

    def rewrite(self, graph: ir.Graph, node: ir.Node, site: Site, ranks: Sequence[int]) -> None:
        names = chain_node_names(site.name, "svd", 2)
        (rank,) = ranks
        left, right = self.factors(site, self.matrix(site), rank)
        weight_value = node.inputs[1] if site.side == "right" else node.inputs[0]
        u = add_initializer(graph, f"{site.name}/svd_U", left, weight_value)
        v = add_initializer(graph, f"{site.name}/svd_V", right, weight_value)
        if site.side == "left":
            first = ir.node("MatMul", [v, node.inputs[1]], name=names[0])
            second = ir.node("MatMul", [u, first.outputs[0]], name=names[1])
            replace_node(graph, node, [first, second])
            return
        first = ir.node("MatMul", [node.inputs[0], u], name=names[0])
        shift = self.output_shift(site, lambda: self.matrix(site) - left @ right)
        if node.op_type == "Gemm":
            alpha = node.attributes.get_float("alpha", 1.0)
            beta = node.attributes.get_float("beta", 1.0)
            bias = list(node.inputs[2:])
            if shift is not None and beta != 0:
                bias = [shifted_bias(graph, f"{site.name}/svd_C", bias[0], alpha * shift / beta)]
            second = ir.node("Gemm", [first.outputs[0], v, *bias],
                             attributes={"alpha": alpha, "beta": beta}, name=names[1])
        else:
            second = ir.node("MatMul", [first.outputs[0], v], name=names[1])
            if shift is not None:  # into the Add of the layer's bias
                add, index = following_bias(node, site.weight.shape[1])
                add.replace_input_with(index, shifted_bias(graph, f"{site.name}/svd_bias",
                                                           add.inputs[index], shift))
        replace_node(graph, node, [first, second])
