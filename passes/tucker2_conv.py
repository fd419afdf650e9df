"""Tucker-2 of a k x k convolution: a 1x1 / k x k / 1x1 chain (Kim et al., ICLR 2016).

With ``W[o, c, i, j] ~= sum_{a, b} U_out[o, a] core[a, b, i, j] U_in[c, b]``
(ranks r_out <= C_out, r_in <= C_in):

    Conv(x, W) + b  ~=  Conv1x1(Conv_kxk(Conv1x1(x, U_in^T), core), U_out) + b

The k x k core keeps the original stride, padding (explicit or auto_pad) and dilation. The
first 1x1 runs at the *input* resolution H W, before the stride, and has no bias, so zero
padding commutes with it.

    parameters  C_in r_in + r_in r_out kh kw + r_out C_out
    FLOPs       2 N (H W C_in r_in + H_out W_out (r_in r_out kh kw + r_out C_out))

HOSVD (truncated SVD of the mode-0 and mode-1 unfoldings) initialises the factors; optional HOOI
sweeps (partial Tucker in tensorly) refine them.

With calibration means the mean output error is added to the last 1x1 conv's bias
(``BiasCorrection``), as for spatial SVD: with ``E = W - W_r`` and ``mu`` the mean vertical
input patch, ``delta[o] = sum_{c, i, j} E[o, c, i, j] mu[(c, i)]``
(``passes.base.kernel_mean_error``). The first 1x1 conv has no bias and the core none either,
so their zero padding stays exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from lrdeploy.decompositions import tucker2
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


class Tucker2Conv(BiasCorrection, Factorization):
    method = "tucker2"

    def __init__(self, refine_sweeps: int = 0,
                 means: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__(means)
        self.refine_sweeps = refine_sweeps

    def applies(self, site: Site) -> bool:
        return site.is_conv and site.kernel != (1, 1)

    def unfoldings(self, site: Site) -> list[np.ndarray]:
        w = site.weight
        return [w.reshape(w.shape[0], -1), w.transpose(1, 0, 2, 3).reshape(w.shape[1], -1)]

    def cost(self, site: Site, ranks: Sequence[int]) -> Cost:
        r_out, r_in = ranks
        c_out, c_in, kh, kw = site.weight.shape
        params = c_in * r_in + r_in * r_out * kh * kw + r_out * c_out + site.bias_params
        flops = None
        if site.input_shape is not None and site.output_shape is not None:
            n, _, h, w = site.input_shape
            h_out, w_out = site.output_shape[2:]
            flops = 2 * n * (h * w * c_in * r_in + h_out * w_out * (r_in * r_out * kh * kw
                                                                    + r_out * c_out))
        return Cost(params, flops)

    def factors(self, site: Site, ranks: Sequence[int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``core`` (r_out, r_in, kh, kw), ``u_out`` (C_out, r_out), ``u_in`` (C_in, r_in)."""
        return tucker2(site.weight, (ranks[0], ranks[1]), self.refine_sweeps)

    def approximation(self, site: Site, ranks: Sequence[int]) -> np.ndarray:
        return _composed(*self.factors(site, ranks))

    def rewrite(self, graph: ir.Graph, node: ir.Node, site: Site, ranks: Sequence[int]) -> None:
        names = chain_node_names(site.name, "tucker", 3)
        core, u_out, u_in = self.factors(site, ranks)
        weight_value = node.inputs[1]
        first_w = add_initializer(graph, f"{site.name}/tucker_in", u_in.T[:, :, None, None],
                                  weight_value)
        core_w = add_initializer(graph, f"{site.name}/tucker_core", core, weight_value)
        last_w = add_initializer(graph, f"{site.name}/tucker_out", u_out[:, :, None, None],
                                 weight_value)
        first = conv_node(names[0], node.inputs[0], first_w, None, (1, 1))
        middle = conv_node(names[1], first.outputs[0], core_w, None, site.kernel,
                           site.strides, site.pads, site.dilations, site.auto_pad)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        shift = self.output_shift(
            site, lambda: kernel_mean_error(site, _composed(core, u_out, u_in)))
        if shift is not None:
            bias = shifted_bias(graph, f"{site.name}/tucker_b", bias, shift)
        last = conv_node(names[2], middle.outputs[0], last_w, bias, (1, 1))
        replace_node(graph, node, [first, middle, last])


def _composed(core: np.ndarray, u_out: np.ndarray, u_in: np.ndarray) -> np.ndarray:
    """The k x k kernel the 1x1 / k x k / 1x1 chain computes."""
    return np.einsum("oa,abij,cb->ocij", u_out, core, u_in)
