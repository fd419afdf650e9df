"""Spatial SVD of a k x k convolution: a kh x 1 conv then a 1 x kw conv (Jaderberg et al. 2014).

Unfold the kernel as the (C_in kh) x (C_out kw) matrix ``M[(c, i), (o, j)] = W[o, c, i, j]``;
its rank-r SVD ``M ~= A B`` gives

    vertical[k, c, i, 0]   = A[(c, i), k]      (r filters of size kh x 1)
    horizontal[o, k, 0, j] = B[k, (o, j)]      (C_out filters of size 1 x kw)

and ``Conv(x, W) = Conv_{1 x kw}(Conv_{kh x 1}(x, vertical), horizontal)`` exactly at full rank.
The vertical conv takes the height stride / padding / dilation, the horizontal one the width's;
the vertical conv has no bias, so the width padding of its output is still zero. With
auto_pad SAME_*, each conv pads its own axis as the original would (padding is per axis).

    parameters  r (C_in kh + C_out kw)
    FLOPs       2 N r (H_out W C_in kh + H_out W_out C_out kw)

With calibration means the mean output error is added to the horizontal conv's bias
(``BiasCorrection``). ``mu`` is the mean vertical input patch (features ``(c, i)``, as the
unfolding's rows: ``calibration.vertical_patches``); every horizontal tap j reads such a patch,
so with ``E = W - W_r`` the output's mean error is ``delta[o] = sum_{c, i, j} E[o, c, i, j]
mu[(c, i)]`` (``passes.base.kernel_mean_error``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from lrdeploy.decompositions import spatial_svd, spatial_unfolding
from lrdeploy.passes.base import (
    BiasCorrection,
    Cost,
    Factorization,
    add_initializer,
    chain_node_names,
    conv_node,
    kernel_mean_error,
    replace_node,
    shifted_bias,
)
from lrdeploy.sites import Site


class SpatialSVDConv(BiasCorrection, Factorization):
    method = "spatial"

    def applies(self, site: Site) -> bool:
        return site.is_conv and site.kernel != (1, 1)

    def unfoldings(self, site: Site) -> list[np.ndarray]:
        return [spatial_unfolding(site.weight)]

    def cost(self, site: Site, ranks: Sequence[int]) -> Cost:
        (rank,) = ranks
        c_out, c_in, kh, kw = site.weight.shape
        flops = None
        if site.input_shape is not None and site.output_shape is not None:
            n, _, _, w = site.input_shape
            h_out, w_out = site.output_shape[2:]
            flops = 2 * n * rank * (h_out * w * c_in * kh + h_out * w_out * c_out * kw)
        return Cost(rank * (c_in * kh + c_out * kw) + site.bias_params, flops)

    def inputs_on_rows(self, site: Site) -> bool:
        return True  # M[(c, i), (o, j)]: input channel and kernel row on the rows

    def kernels(self, site: Site, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The vertical and horizontal kernels (``decompositions.spatial_svd``)."""
        return spatial_svd(site.weight, rank)

    def approximation(self, site: Site, ranks: Sequence[int]) -> np.ndarray:
        (rank,) = ranks
        return _composed(*self.kernels(site, rank))

    def rewrite(self, graph: ir.Graph, node: ir.Node, site: Site, ranks: Sequence[int]) -> None:
        names = chain_node_names(site.name, "spatial", 2)
        (rank,) = ranks
        vertical, horizontal = self.kernels(site, rank)
        kh, kw = site.kernel
        top, left, bottom, right = site.pads
        weight_value = node.inputs[1]
        v = add_initializer(graph, f"{site.name}/spatial_v", vertical, weight_value)
        h = add_initializer(graph, f"{site.name}/spatial_h", horizontal, weight_value)
        first = conv_node(names[0], node.inputs[0], v, None, (kh, 1),
                          (site.strides[0], 1), (top, 0, bottom, 0), (site.dilations[0], 1),
                          site.auto_pad)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        shift = self.output_shift(
            site, lambda: kernel_mean_error(site, _composed(vertical, horizontal)))
        if shift is not None:
            bias = shifted_bias(graph, f"{site.name}/spatial_b", bias, shift)
        second = conv_node(names[1], first.outputs[0], h, bias, (1, kw),
                           (1, site.strides[1]), (0, left, 0, right), (1, site.dilations[1]),
                           site.auto_pad)
        replace_node(graph, node, [first, second])


def _composed(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    """The k x k kernel the vertical then horizontal conv compute."""
    return np.einsum("kci,okj->ocij", vertical[..., 0], horizontal[:, :, 0, :])
