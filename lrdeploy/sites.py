"""Factorizable sites: the Gemm / MatMul / Conv nodes of the main graph whose weight is constant.

Every dense-weight operator the finder sees is either a ``Site`` or a ``SkippedSite`` with the
reason, so a report always accounts for all of them.

Conventions: a matrix site computes ``x @ W`` (``side == "right"``, W is K x N) or ``W @ x``
(``side == "left"``, W is M x K); Gemm's ``transB`` is undone so W is always the matrix applied.
A conv site holds the 2-D kernel ``W[C_out, C_in, kh, kw]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

DENSE_WEIGHT_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN")
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


@dataclass(eq=False)
class Site:
    """One factorizable operator. Shapes are concrete when known (at the analysed input shape)."""

    name: str
    op: str
    side: str  # "right", "left" or "conv"
    weight: np.ndarray
    bias_params: int = 0
    bias_follows: bool = False  # a constant row vector is added right after (MatMul + Add)
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    strides: tuple[int, ...] = (1, 1)
    pads: tuple[int, ...] = (0, 0, 0, 0)
    dilations: tuple[int, ...] = (1, 1)
    auto_pad: str = "NOTSET"

    @property
    def is_conv(self) -> bool:
        return self.side == "conv"

    @property
    def kernel(self) -> tuple[int, int]:
        return (self.weight.shape[2], self.weight.shape[3]) if self.is_conv else (1, 1)

    @property
    def params(self) -> int:
        return int(self.weight.size) + self.bias_params

    @property
    def vectors(self) -> int | None:
        """Vectors one inference multiplies by the matrix (None when shapes are unknown)."""
        if self.input_shape is None:
            return None
        inner = self.weight.shape[0] if self.side == "right" else self.weight.shape[1]
        return math.prod(self.input_shape) // inner

    @property
    def flops(self) -> int | None:
        """Dense FLOPs (2 per multiply-add) of one inference; None when shapes are unknown."""
        if self.is_conv:
            if self.output_shape is None:
                return None
            n, _, ho, wo = self.output_shape
            return 2 * n * ho * wo * int(self.weight.size)
        if self.vectors is None:
            return None
        return 2 * self.vectors * int(self.weight.size)


@dataclass(frozen=True)
class SkippedSite:
    """A dense-weight operator left untouched, and why."""

    name: str
    op: str
    reason: str


@dataclass
class SiteScan:
    sites: list[Site] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)


def model_params(model: ir.Model) -> int:
    """The model's weights: elements of its floating-point initializers, subgraphs included
    (weights are lifted to initializers). Integer initializers are shapes and indices, such as
    the Reshape targets of a tensor-train chain, not parameters: counted, they made a chain
    hold more parameters than its factors (532 against 512 for one 64 x 64 TT layer)."""
    graphs = {id(model.graph): model.graph}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.graph is not None:
            graphs.setdefault(id(node.graph), node.graph)
    return sum(int(v.const_value.size) for g in graphs.values()
               for v in g.initializers.values()
               if v.const_value is not None and v.const_value.dtype.is_floating_point())


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of the main graph's initializers (the weights an ONNX file stores)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant tensor as numpy, or None if it is computed or overridable."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def following_bias(node: ir.Node, width: int) -> tuple[ir.Node, int] | None:
    """The Add that alone consumes ``node``'s output and adds a constant row vector of ``width``
    values to it (the bias of a linear layer traced as MatMul + Add), and the constant's input
    index."""
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None
    user, index = uses[0]
    if user.op_type != "Add":
        return None
    bias = constant_array(user.inputs[1 - index])
    if bias is None or bias.ndim == 0 or bias.size != width or bias.shape[-1] != width:
        return None
    return user, 1 - index


def find_sites(
    model: ir.Model, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> SiteScan:
    """Classify every dense-weight operator of ``model`` (canonical form, see ``frontend``).

    ``shapes`` maps value names to concrete shapes (from a probe run); without them, static
    shapes recorded in the model are used, and FLOPs stay unknown where there are none.
    """
    shapes = dict(shapes or {})
    scan = SiteScan()
    for node in model.graph:
        if _is_dense_weight_op(node):
            result = classify(node, shapes)
            (scan.sites if isinstance(result, Site) else scan.skipped).append(result)
        for subgraph in _subgraphs(node):
            for inner in ir.traversal.RecursiveGraphIterator(subgraph):
                if _is_dense_weight_op(inner):
                    reason = f"inside a subgraph of {node.op_type} node '{node.name}'"
                    scan.skipped.append(SkippedSite(inner.name or "", inner.op_type, reason))
    return scan


def _is_dense_weight_op(node: ir.Node) -> bool:
    return node.op_type in DENSE_WEIGHT_OPS and node.domain in ("", "ai.onnx")


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.as_graphs())
    return graphs


def _shape_of(value: ir.Value | None, shapes: Mapping[str, tuple[int, ...]]):
    if value is None:
        return None
    if value.name in shapes:
        return tuple(shapes[value.name])
    if value.shape is not None and value.shape.is_static():
        return tuple(int(d) for d in value.shape)
    return None


def classify(node: ir.Node, shapes: Mapping[str, tuple[int, ...]]) -> Site | SkippedSite:
    op = node.op_type

    def skip(reason: str) -> SkippedSite:
        return SkippedSite(node.name or "", op, reason)

    if op in ("ConvTranspose", "LSTM", "GRU", "RNN"):
        return skip(f"{op} is not factorized")
    weight_index = _weight_input_index(node)
    if weight_index is None:
        return skip("dynamic weight: no operand is a constant initializer")
    weight_value = node.inputs[weight_index]
    weight = constant_array(weight_value)
    if weight_value.const_value.dtype not in FLOAT_TYPES:
        return skip(f"weight of type {weight_value.const_value.dtype.name} is not floating point")
    users = len(weight_value.uses())
    if users > 1:
        return skip(f"weight '{weight_value.name}' is shared by {users} operators")
    activation = node.inputs[1 - weight_index] if op != "Conv" else node.inputs[0]
    input_shape = _shape_of(activation, shapes)
    output_shape = _shape_of(node.outputs[0], shapes)
    bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
    bias_params = int(bias.size) if bias is not None else 0

    if op == "Conv":
        if weight.ndim != 4:
            return skip(f"{weight.ndim - 2}-D convolution (only 2-D is factorized)")
        group = _int_attr(node, "group", 1)
        if group != 1:
            kind = "depthwise" if weight.shape[1] == 1 else "grouped"
            return skip(f"{kind} convolution (group={group})")
        return Site(
            name=node.name,
            op=op,
            side="conv",
            weight=weight,
            bias_params=bias_params,
            input_shape=input_shape,
            output_shape=output_shape,
            strides=tuple(node.attributes.get_ints("strides", (1, 1))),
            pads=tuple(node.attributes.get_ints("pads", (0, 0, 0, 0))),
            dilations=tuple(node.attributes.get_ints("dilations", (1, 1))),
            auto_pad=node.attributes.get_string("auto_pad", "NOTSET"),
        )

    if weight.ndim != 2:
        return skip(f"constant operand is {weight.ndim}-D, not a matrix")
    side = "right" if weight_index == 1 else "left"
    bias_follows = op == "MatMul" and side == "right" and \
        following_bias(node, weight.shape[1]) is not None
    if op == "Gemm":
        if _int_attr(node, "transA", 0) or side == "left":
            return skip("Gemm with a transposed or constant first operand")
        if _int_attr(node, "transB", 0):
            weight = weight.T
    return Site(
        name=node.name,
        op=op,
        side=side,
        weight=np.ascontiguousarray(weight),
        bias_params=bias_params,
        bias_follows=bias_follows,
        input_shape=input_shape,
        output_shape=output_shape,
    )


def weight_operand(node: ir.Node) -> ir.Value | None:
    """The constant operand ``classify`` reads a site's weight from (None when there is none)."""
    index = _weight_input_index(node)
    return None if index is None else node.inputs[index]


def as_operand(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """A weight oriented as ``Site.weight``, laid out as ``node``'s weight operand (the inverse
    of ``classify``: a Gemm's ``transB`` is applied again)."""
    return weight.T if node.op_type == "Gemm" and _int_attr(node, "transB", 0) else weight


def _weight_input_index(node: ir.Node) -> int | None:
    if node.op_type == "Conv":
        return 1 if constant_array(node.inputs[1]) is not None else None
    for index in (1, 0):
        if constant_array(node.inputs[index]) is not None:
            return index
    return None


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    return int(node.attributes.get_int(name, default))
