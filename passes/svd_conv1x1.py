"""Truncated SVD of a 1x1 convolution: one 1x1 conv becomes two.

A 1x1 conv is the matrix ``W[C_out, C_in]`` applied at every pixel. With ``W ~= U V``
(U: C_out x r, V: r x C_in):

    Conv1x1(x, W) + b  ~=  Conv1x1(Conv1x1(x, V), U) + b     parameters r (C_in + C_out)

Stride and padding go on the first conv: zero-padded pixels map to zero through V (it has no
bias), so the border still receives exactly ``b``. FLOPs are 2 H_out W_out r (C_in + C_out).
With calibration means the mean output error is added to ``b`` (``MatrixFactorization``),
except for a padded conv, whose border would receive it too.
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
    conv_node,
    replace_node,
    shifted_bias,
)
from lrdeploy.sites import Site


class SVDConv1x1(MatrixFactorization):
    method = "svd"

    def applies(self, site: Site) -> bool:
        return site.is_conv and site.kernel == (1, 1)

    def matrix(self, site: Site) -> np.ndarray:
        return site.weight[:, :, 0, 0]

    def corrects_bias(self, site: Site) -> bool:
        padded = any(site.pads) or site.auto_pad not in ("NOTSET", "VALID")
        return super().corrects_bias(site) and not padded

    def cost(self, site: Site, ranks: Sequence[int]) -> Cost:
        (rank,) = ranks
        c_out, c_in = site.weight.shape[:2]
        flops = None
        if site.output_shape is not None:
            n, _, h_out, w_out = site.output_shape
            flops = 2 * n * h_out * w_out * rank * (c_in + c_out)
        return Cost(rank * (c_in + c_out) + site.bias_params, flops)

    def rewrite(self, graph: ir.Graph, node: ir.Node, site: Site, ranks: Sequence[int]) -> None:
        names = chain_node_names(site.name, "svd", 2)
        (rank,) = ranks
        u, v = self.factors(site, self.matrix(site), rank)
        weight_value = node.inputs[1]
        reduce = add_initializer(graph, f"{site.name}/svd_V", v[:, :, None, None], weight_value)
        expand = add_initializer(graph, f"{site.name}/svd_U", u[:, :, None, None], weight_value)
        first = conv_node(names[0], node.inputs[0], reduce, None, (1, 1),
                          site.strides, site.pads, auto_pad=site.auto_pad)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        shift = self.output_shift(site, lambda: (self.matrix(site) - u @ v).T)
        if shift is not None:
            bias = shifted_bias(graph, f"{site.name}/svd_b", bias, shift)
        second = conv_node(names[1], first.outputs[0], expand, bias, (1, 1))
        replace_node(graph, node, [first, second])
