"""Every rewrite is exact at full rank, emits only plain operators, and the guard holds."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import lrdeploy
from conftest import make_model, tensor_value, weight
from lrdeploy import runtime
from lrdeploy.methods import rule_for
from lrdeploy.sites import as_operand, find_sites, weight_operand
from lrdeploy.tensorize import TTLayout


def _conv(name, x, w, out, **attrs):
    return helper.make_node("Conv", [x, w, f"{name}_b"], [out], name=name, **attrs)


def conv_model(**attrs) -> onnx.ModelProto:
    kh, kw = attrs.get("kernel_shape", [3, 3])
    nodes = [_conv("conv", "x", "w", "y", **attrs)]
    inits = [weight("w", (12, 8, kh, kw), 1), weight("conv_b", (12,), 2)]
    return make_model(nodes, [tensor_value("x", [2, 8, 17, 15])], ["y"],
                      inits)


LINEAR_MODELS = {
    "matmul_3d_input": make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor_value("x", [2, 5, 24])], ["y"], [weight("w", (24, 16), 1)]),
    "matmul_left_constant": make_model(
        [helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")],
        [tensor_value("x", [24, 7])], ["y"], [weight("w", (16, 24), 1)]),
    "gemm_transB_bias_alpha_beta": make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1, alpha=0.5,
                          beta=2.0)],
        [tensor_value("x", [3, 24])], ["y"],
        [weight("w", (16, 24), 1), weight("b", (16,), 2)]),
    "gemm_plain_layout": make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm")],
        [tensor_value("x", [3, 24])], ["y"], [weight("w", (24, 16), 1)]),
}

CONV_MODELS = {
    "conv3x3_stride2_pad": conv_model(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "conv3x2_asym_pad_dilation": conv_model(kernel_shape=[3, 2], pads=[2, 0, 1, 1],
                                            dilations=[2, 1], strides=[1, 2]),
    "conv3x3_same_upper_stride2": conv_model(kernel_shape=[3, 3], strides=[2, 2],
                                             auto_pad="SAME_UPPER"),
    "conv1x1_stride2_pad": conv_model(kernel_shape=[1, 1], strides=[2, 2], pads=[1, 1, 1, 1]),
}


def _relative_errors(result) -> list[float]:
    return [f.relative_l2_error for f in result.fidelity]


@pytest.mark.parametrize("name", sorted(LINEAR_MODELS))
def test_svd_on_matrices_is_exact_at_full_rank(name):
    result = lrdeploy.compress(LINEAR_MODELS[name], rank="full", guard=False)
    assert [e.method for e in result.plan.entries] == ["svd"]
    assert max(_relative_errors(result)) <= 1e-5
    ops = Counter(n.op_type for n in result.model.graph)
    assert ops["MatMul"] + ops["Gemm"] == 2 and "Einsum" not in ops


@pytest.mark.parametrize("method", ["tucker2", "spatial"])
@pytest.mark.parametrize("name", sorted(CONV_MODELS))
def test_conv_rewrites_are_exact_at_full_rank(name, method):
    result = lrdeploy.compress(CONV_MODELS[name], rank="full", method=method, guard=False)
    (entry,) = result.plan.entries
    expected = "svd" if "1x1" in name else method
    assert entry.method == expected
    assert max(_relative_errors(result)) <= 1e-5
    convs = [n for n in result.model.graph if n.op_type == "Conv"]
    assert len(convs) == {"svd": 2, "spatial": 2, "tucker2": 3}[expected]


def test_truncation_reduces_params_and_matches_the_cost_model():
    result = lrdeploy.compress(LINEAR_MODELS["matmul_3d_input"], rank="rank:4")
    (site,) = result.report["sites"]
    assert site["ranks"] == [4]
    assert site["params_after"] == 4 * (24 + 16) < site["params_before"] == 24 * 16
    assert site["flops_after"] == 2 * 10 * 4 * (24 + 16)
    assert result.report["totals"]["model_params_after"] == 4 * (24 + 16)
    shapes = sorted(tuple(v.const_value.shape) for v in result.model.graph.initializers.values())
    assert shapes == [(4, 16), (24, 4)]


def test_break_even_guard_keeps_unprofitable_sites_dense():
    # 24 x 16: rank r pays off only while r (24 + 16) < 384, i.e. r <= 9.
    model = LINEAR_MODELS["matmul_3d_input"]
    kept = lrdeploy.compress(model, rank="rank:10")
    assert kept.plan.entries[0].method == "dense"
    assert "break-even" in kept.plan.entries[0].note
    assert [n.op_type for n in kept.model.graph] == ["MatMul"]
    factorized = lrdeploy.compress(model, rank="rank:9")
    assert factorized.plan.entries[0].method == "svd"


def test_tucker2_first_conv_runs_before_the_stride():
    result = lrdeploy.compress(CONV_MODELS["conv3x3_stride2_pad"], rank="rank:4",
                               method="tucker2")
    (site,) = result.report["sites"]
    # input 2x8x17x15, output 2x12x9x8: 1x1 at input resolution, core and last 1x1 at output.
    expected = 2 * 2 * (17 * 15 * 8 * 4 + 9 * 8 * (4 * 4 * 9 + 4 * 12))
    assert site["flops_after"] == expected
    assert site["flops_before"] == 2 * 2 * 9 * 8 * 12 * 8 * 9


def _random_gram(size: int) -> np.ndarray:
    x = np.random.default_rng(size).standard_normal((4 * size, size)) * np.linspace(0.2, 3, size)
    return x.T @ x


APPROXIMATED = [
    ("matmul_3d_input", "svd", (5,)), ("matmul_3d_input", "wsvd", (5,)),
    ("matmul_left_constant", "svd", (5,)), ("matmul_left_constant", "wsvd", (5,)),
    ("gemm_transB_bias_alpha_beta", "svd", (5,)), ("gemm_transB_bias_alpha_beta", "wsvd", (5,)),
    ("matmul_3d_input", "tt", TTLayout((4, 6), (4, 4), (3,))),
    ("gemm_transB_bias_alpha_beta", "tt", TTLayout((4, 6), (4, 4), (3,))),
    ("conv1x1_stride2_pad", "svd", (3,)), ("conv1x1_stride2_pad", "wsvd", (3,)),
    ("conv3x3_stride2_pad", "tucker2", (4, 3)), ("conv3x2_asym_pad_dilation", "tucker2", (4, 3)),
    ("conv3x3_stride2_pad", "spatial", (4,)), ("conv3x2_asym_pad_dilation", "wspatial", (4,)),
    ("conv3x3_same_upper_stride2", "wspatial", (4,)),
]


@pytest.mark.parametrize(("name", "method", "ranks"), APPROXIMATED)
def test_a_rules_approximation_is_the_weight_its_chain_applies(name, method, ranks):
    """The planner measures a candidate's model error by feeding ``approximation`` in place of
    the weight: the original operator with it must compute what the rewritten chain does."""
    model = ir.serde.deserialize_model({**LINEAR_MODELS, **CONV_MODELS}[name])
    (site,) = find_sites(model).sites
    inputs = site.weight.shape[0] if site.side == "right" else site.weight.shape[1]
    if site.is_conv:
        inputs = site.weight.shape[1] * (site.kernel[0] if "spatial" in method else 1)
    rule = rule_for(method, site, grams={site.name: _random_gram(inputs)})
    substituted = model.clone()
    node = next(n for n in substituted.graph if n.name == site.name)
    approximation = rule.approximation(site, ranks)
    assert approximation.shape == site.weight.shape
    weight_operand(node).const_value = ir.tensor(
        as_operand(node, approximation).astype(np.float32))
    (x,) = runtime.graph_inputs(model)
    feed = {x.name: np.random.default_rng(0).standard_normal(
        [int(d) for d in x.shape]).astype(np.float32)}
    dense, chain, fed = (next(iter(runtime.run(runtime.session(m), feed).values()))
                         for m in (model, rule(model, {site.name: ranks}), substituted))
    assert np.allclose(fed, chain, rtol=1e-4, atol=1e-4 * np.abs(chain).max())
    assert not np.allclose(dense, chain, rtol=1e-2)  # the ranks truncate: a real test
