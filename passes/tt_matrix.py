"""Tensor-train matrix: a constant Gemm / MatMul weight becomes d small cores, applied to the
activation one at a time.

For ``y = x @ W`` with W (K x N), K = k_1...k_d, N = n_1...n_d and the TT-SVD cores
G_i (r_{i-1}, k_i, n_i, r_i) (``decompositions.tt_matrix``):

    y[b, (j_1..j_d)] ~= sum_{i_1..i_d} x[b, (i_1..i_d)] G_1[i_1, j_1] ... G_d[i_d, j_d]

(each G_i[i, j] an r_{i-1} x r_i matrix), parameters ``sum_i r_{i-1} k_i n_i r_i`` instead of
K N. The activation is reshaped to (batch..., k_1, ..., k_d) and absorbs the cores in the
layout's contraction order, each step a Transpose (when needed), a Reshape and a MatMul
(``lrdeploy.tensorize``); the dense W is never rebuilt and no Einsum is emitted. For Gemm,
``alpha`` is folded into the last core and ``beta * C`` added at the end. Exact at full TT ranks.

The ``ranks`` this rule takes per site are a ``TTLayout`` (modes, ranks and order), not a
tuple of ints.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lrdeploy.decompositions import tt_matrix, tt_matrix_dense
from lrdeploy.passes.base import Cost, Factorization, add_initializer, replace_node
from lrdeploy.sites import Site
from lrdeploy.tensorize import ChainBuilder, TTLayout, build_chain, contraction_steps, flop_cost


class TTMatrix(Factorization):
    method = "tt"

    def applies(self, site: Site) -> bool:
        return site.side == "right"

    def unfoldings(self, site: Site) -> list[np.ndarray]:
        return []  # TT ranks come with a shape (TTLayout), not from one matrix's spectrum

    def full_ranks(self, site: Site) -> tuple[int, ...]:
        return ()

    def cost(self, site: Site, ranks: TTLayout) -> Cost:
        vectors = site.vectors
        flops = None if vectors is None else int(sum(
            flop_cost(vectors)(step) for step in contraction_steps(ranks)))
        return Cost(ranks.params + site.bias_params, flops)

    def cores(self, site: Site, layout: TTLayout) -> list[np.ndarray]:
        problem = layout.problem(*site.weight.shape)
        if problem:
            raise ValueError(f"site '{site.name}': TT layout {problem}")
        return tt_matrix(site.weight, layout.in_modes, layout.out_modes, layout.ranks)

    def approximation(self, site: Site, ranks: TTLayout) -> np.ndarray:
        return tt_matrix_dense(self.cores(site, ranks))

    def rewrite(self, graph: ir.Graph, node: ir.Node, site: Site, ranks: TTLayout) -> None:
        layout = ranks
        cores = self.cores(site, layout)
        weight = node.inputs[1]

        def add_constant(name: str, array: np.ndarray) -> ir.Value:
            # Shapes stay int64; cores and scales take the weight's dtype.
            return add_initializer(graph, name, array,
                                   None if array.dtype == np.int64 else weight)

        shape = node.inputs[0].shape
        builder = ChainBuilder(f"{site.name}/tt", None if shape is None else len(shape) - 1,
                               add_constant)
        alpha, beta, bias = 1.0, 1.0, None
        if node.op_type == "Gemm":
            alpha = node.attributes.get_float("alpha", 1.0)
            beta = node.attributes.get_float("beta", 1.0)
            bias = node.inputs[2] if len(node.inputs) > 2 else None
        y = build_chain(builder, node.inputs[0], layout, cores, scale=alpha)
        if bias is not None:
            if beta != 1.0:
                scale = add_constant(f"{site.name}/tt_beta", np.array(beta))
                bias = builder.add_node("Mul", [bias, scale])
            y = builder.add_node("Add", [y, bias])
        replace_node(graph, node, builder.nodes)

