"""Loading: external data (inside the folder only), Constant-node weights, BatchNorm folding,
torch tracing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import lrdeploy
from conftest import make_model, tensor_value, weight
from lrdeploy import frontend
from lrdeploy.errors import LrdeployError
from lrdeploy.sites import find_sites


def linear_model() -> onnx.ModelProto:
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                      [tensor_value("x", [4, 64])], ["y"], [weight("w", (64, 48), 0)])


def test_external_data_inside_the_model_folder_loads(tmp_path):
    model = linear_model()
    expected = numpy_helper.to_array(model.graph.initializer[0])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    assert (tmp_path / "m.onnx.data").exists()
    loaded = frontend.load_onnx(path)
    (site,) = find_sites(frontend.canonicalize(loaded)).sites
    assert np.array_equal(site.weight, expected)


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    model = linear_model()
    onnx.save_model(model, str(tmp_path / "stolen.onnx"), save_as_external_data=True,
                    location="secret.bin", size_threshold=0)
    external = onnx.load(tmp_path / "stolen.onnx", load_external_data=False)
    for entry in external.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    onnx.save_model(external, inner / "evil.onnx")
    with pytest.raises(LrdeployError, match="outside the model folder"):
        frontend.load_onnx(inner / "evil.onnx")


def test_constant_node_weights_are_lifted_and_factorized():
    w = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)
    const = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w"),
                             name="const_w")
    model = make_model([const, helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [tensor_value("x", [4, 64])], ["y"], [])
    canonical = frontend.canonicalize(ir.serde.deserialize_model(model))
    assert "Constant" not in Counter(n.op_type for n in canonical.graph)
    (site,) = find_sites(canonical).sites
    assert site.name == "mm" and np.array_equal(site.weight, w)
    result = lrdeploy.compress(model, rank="full", guard=False)
    assert result.fidelity[0].relative_l2_error < 1e-5


def test_batchnorm_is_folded_into_the_conv_and_the_result_is_unchanged():
    rng = np.random.default_rng(2)
    c = 6
    inits = [weight("w", (c, 3, 3, 3), 3),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["t", "gamma", "beta", "mean", "var"], ["y"],
                              name="bn")]
    model = make_model(nodes, [tensor_value("x", [1, 3, 8, 8])], ["y"], inits)
    canonical = frontend.canonicalize(ir.serde.deserialize_model(model))
    assert [n.op_type for n in canonical.graph] == ["Conv"]
    (site,) = find_sites(canonical).sites
    assert site.bias_params == c  # the folded BN became the conv's bias
    result = lrdeploy.compress(model, rank="full", guard=False, method="tucker2")
    assert result.fidelity[0].relative_l2_error < 1e-5


def test_torch_module_is_traced_and_compressed():
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    result = lrdeploy.compress(net, example_inputs=[torch.randn(2, 32)], rank="full",
                               guard=False)
    assert [e.method for e in result.plan.entries] == ["svd", "svd"]
    assert result.fidelity[0].relative_l2_error < 1e-5


def test_dynamic_axes_written_as_minus_one_get_the_default_size():
    # Old exporters (this is how PaddleOCR's classifier declares its batch) write -1.
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [tensor_value("x", [-1, 64])], ["y"], [weight("w", (64, 48), 0)])
    result = lrdeploy.compress(model, rank="full", guard=False)
    (spec,) = result.report["inputs"]
    assert spec["shape"] == [1, 64] and spec["assumed_axes"] == [0]
    assert result.report["sites"][0]["flops_before"] == 2 * 64 * 48


def test_an_axis_given_for_one_input_sizes_the_same_named_axis_of_the_others():
    """input_ids=1,128 alone once left attention_mask at the default 32, and the model failed to
    run (an Add broadcasting 32 by 128): the README's own example on a BERT-like model."""
    nodes = [helper.make_node("Add", ["ids", "mask"], ["s"]),
             helper.make_node("MatMul", ["s", "w"], ["y"], name="mm")]
    model = make_model(nodes, [tensor_value("ids", ["batch", "sequence", 64]),
                               tensor_value("mask", ["batch", "sequence", 64])],
                       ["y"], [weight("w", (64, 48), 0)])
    result = lrdeploy.compress(model, rank="full", guard=False,
                               input_shapes={"ids": (2, 128, 64)})
    ids, mask = result.report["inputs"]
    assert ids["shape"] == mask["shape"] == [2, 128, 64]
    assert mask["assumed_axes"] == []
    # Given none, both inputs' named axes are defaulted, and both say so.
    ids, mask = lrdeploy.compress(model, rank="full", guard=False).report["inputs"]
    assert ids["assumed_axes"] == mask["assumed_axes"] == [0, 1]
    with pytest.raises(LrdeployError, match="axis 'sequence' two sizes, 128 and 64"):
        lrdeploy.compress(model, input_shapes={"ids": (2, 128, 64), "mask": (2, 64, 64)})
