"""Tensor-train layers: exactness, the contraction-order search, the exported chain, the
shape choice and the planner's use of TT."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import lrdeploy
from conftest import make_model, run_cli, tensor_value
from lrdeploy import runtime
from lrdeploy.analysis import analyze_model
from lrdeploy.api import Budget, plan_for_budget
from lrdeploy.latency import RooflineLatency
from lrdeploy.passes.tt_matrix import TTMatrix
from lrdeploy.plan import Plan, PlanEntry, apply_plan
from lrdeploy.planner import Planner
from lrdeploy.targets.devices import get_device
from lrdeploy.tensorize import (
    TTLayout,
    best_order,
    choose_shape,
    einsum_reference,
    flop_cost,
    max_tt_ranks,
    measured_step_cost,
    order_cost,
    prime_split,
)


def _two_layer(tmp_path, weight1: np.ndarray, weight2: np.ndarray, batch=(2, 5)):
    """x (batch..., K) -> MatMul W1 -> Reshape to 2-D -> Gemm(alpha 0.5, beta 2, transB) W2."""
    rows = math.prod(batch)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "flat"], ["h2"], name="flatten"),
             helper.make_node("Gemm", ["h2", "w2", "b2"], ["y"], name="gemm", alpha=0.5,
                              beta=2.0, transB=1)]
    model = make_model(nodes, [tensor_value("x", [*batch, weight1.shape[0]])], ["y"], [
        numpy_helper.from_array(weight1.astype(np.float32), "w1"),
        numpy_helper.from_array(weight2.T.astype(np.float32), "w2"),
        numpy_helper.from_array(np.linspace(-1, 1, weight2.shape[1]).astype(np.float32), "b2"),
        numpy_helper.from_array(np.array([rows, weight1.shape[1]], np.int64), "flat")])
    path = tmp_path / "two_layer.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _full(in_modes, out_modes, order=None) -> TTLayout:
    return TTLayout(in_modes, out_modes, max_tt_ranks(in_modes, out_modes), order)


@pytest.mark.parametrize("mm_layout, gemm_layout", [
    (_full((2, 3, 4), (2, 3, 5)), _full((5, 6), (3, 4), (1, 0))),
    (_full((4, 6), (6, 5), (1, 0)), _full((2, 3, 5), (2, 3, 2), (2, 0, 1))),
    (_full((2, 2, 2, 3), (2, 3, 5, 1), (3, 1, 0, 2)), _full((5, 6), (4, 3))),
])
def test_tt_chain_is_exact_at_full_rank(tmp_path, mm_layout, gemm_layout):
    rng = np.random.default_rng(0)
    path = _two_layer(tmp_path, rng.standard_normal((24, 30)), rng.standard_normal((30, 12)))
    model = lrdeploy.load(path).canonical
    feed = runtime.random_inputs(model, runtime.input_specs(model))
    reference = runtime.run(runtime.session(model), feed)["y"]
    factorized = TTMatrix()(model, {"mm": mm_layout, "gemm": gemm_layout})
    # Gemm's beta 2 becomes a scalar constant, which must stay a scalar for the checker.
    onnx.checker.check_model(ir.serde.serialize_model(factorized), full_check=True)
    produced = runtime.run(runtime.session(factorized), feed)["y"]
    assert np.abs(produced - reference).max() <= 1e-4 * np.abs(reference).max()
    # Below full rank it is an approximation, not a copy.
    truncated = TTLayout(mm_layout.in_modes, mm_layout.out_modes,
                         tuple(1 for _ in mm_layout.ranks), mm_layout.order)
    rough = runtime.run(runtime.session(TTMatrix()(model, {"mm": truncated})), feed)["y"]
    assert np.abs(rough - reference).max() > 1e-2 * np.abs(reference).max()


def test_order_search_is_optimal_on_a_hand_checked_chain():
    # K = 2 x 8, N = 8 x 2, rank 4, one vector. Left to right: contract k1 (rows 8, inner 2,
    # cols 8*4) then (k2, r) (rows 8, inner 8*4, cols 2): 2*(8*2*32 + 8*32*2) = 2048 FLOPs.
    # Right to left: k2 (rows 2, inner 8, cols 2*4) then (k1, r) (rows 2, inner 2*4, cols 8):
    # 2*(2*8*8 + 2*8*8) = 512 FLOPs.
    layout = TTLayout((2, 8), (8, 2), (4,))
    assert order_cost(layout, flop_cost(1)) == 2048
    assert best_order(layout, flop_cost(1)) == ((1, 0), 512)
    # On a 4-core chain the programme agrees with brute force over all 24 orders.
    layout = TTLayout((3, 4, 2, 5), (2, 6, 3, 2), (5, 7, 3))
    for batch in (1, 32):
        order, cost = best_order(layout, flop_cost(batch))
        brute = min(order_cost(TTLayout(layout.in_modes, layout.out_modes, layout.ranks, p),
                               flop_cost(batch)) for p in itertools.permutations(range(4)))
        assert cost == brute and order_cost(
            TTLayout(layout.in_modes, layout.out_modes, layout.ranks, order),
            flop_cost(batch)) == cost
    # opt_einsum's FLOP-optimal path is a reference and never worse than any x-first order
    # by its own count (it may contract cores together).
    path, flops = einsum_reference(layout, 1)
    assert len(path) == 4 and flops > 0


def test_exported_chain_has_no_einsum_and_never_the_dense_weight(tmp_path):
    rng = np.random.default_rng(1)
    # One activation vector: a node holding the weight's 720 numbers could be nothing else.
    path = _two_layer(tmp_path, rng.standard_normal((24, 30)), rng.standard_normal((30, 12)),
                      batch=(1,))
    model = lrdeploy.load(path).canonical
    layout = TTLayout((4, 6), (5, 6), (3,), (1, 0))
    out = TTMatrix()(model, {"mm": layout})
    proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(out), strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert "Einsum" not in ops and ops.count("MatMul") == 2
    dense_size = 24 * 30
    sizes = {v.name: math.prod(d.dim_value for d in v.type.tensor_type.shape.dim)
             for v in proto.graph.value_info}
    chain_outputs = [o for n in proto.graph.node if n.name.startswith("mm/tt") for o in n.output]
    assert chain_outputs and all(sizes[o] != dense_size for o in chain_outputs if o in sizes)
    assert all(math.prod(t.dims) != dense_size for t in proto.graph.initializer)


def test_shape_choice_is_never_predicted_slower_than_the_prime_split():
    assert prime_split(384, 2) == (16, 24) and prime_split(1536, 3) == (6, 16, 16)
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((384, 256)) / 20
    cost = measured_step_cost(RooflineLatency(get_device("rpi4"), cache=False), (128,))
    choice = choose_shape(weight, 384 * 256 // 8, cost)
    assert choice.naive is not None and choice.naive in choice.options
    assert choice.chosen.latency <= choice.naive.latency
    assert choice.chosen.layout.params <= 384 * 256 // 8
    assert choice.chosen.error <= max(o.error for o in choice.options if o.naive)
    # Its order is the best for its shape.
    assert choice.chosen.latency <= choice.chosen.naive_order_latency


def test_planner_chooses_tt_where_it_beats_svd_and_plans_round_trip(tmp_path, monkeypatch):
    """A Kronecker-structured weight has full matrix rank but TT rank 1: under a parameter
    budget the planner must pick TT for it, and the saved plan must re-apply."""
    monkeypatch.setenv("LRDEPLOY_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(3)
    kron = np.kron(rng.standard_normal((16, 16)), rng.standard_normal((16, 16)))
    path = _two_layer(tmp_path, kron, rng.standard_normal((256, 64)), batch=(4, 8))
    outcome = plan_for_budget(path, Budget("params", 0.5, relative=True, tensor_train=True))
    by_site = {e.site: e for e in outcome.plan.entries}
    assert by_site["mm"].method == "tt" and outcome.measured_error < 0.05
    assert outcome.measured <= 0.5 * outcome.dense
    # Save, load, re-apply: the same model.
    plan = Plan.from_dict(json.loads(json.dumps(outcome.plan.to_dict())))
    analysis = analyze_model(lrdeploy.load(path).canonical)
    again = apply_plan(analysis.model, plan, analysis.sites)
    feed = runtime.random_inputs(again, runtime.input_specs(again))
    assert np.allclose(runtime.run(runtime.session(again), feed)["y"],
                       runtime.run(runtime.session(outcome.model), feed)["y"], atol=1e-5)
    # A TT entry without its layout is refused with a one-line error.
    with pytest.raises(lrdeploy.LrdeployError, match="malformed plan entry"):
        Plan.from_dict({"format": "lrdeploy-plan/1",
                        "entries": [{"site": "mm", "method": "tt", "ranks": [4]}]})
    bad = Plan([PlanEntry("mm", "tt", [4], tt={"in_modes": [16, 16], "out_modes": [4, 4],
                                                 "order": [0, 1]})])
    with pytest.raises(lrdeploy.LrdeployError, match="do not make 256 x 256"):
        apply_plan(analysis.model, bad, analysis.sites)


def test_cli_plan_with_tt_writes_a_reappliable_plan(tmp_path):
    rng = np.random.default_rng(4)
    kron = np.kron(rng.standard_normal((8, 16)), rng.standard_normal((16, 8)))
    path = _two_layer(tmp_path, kron, rng.standard_normal((128, 32)), batch=(4, 8))
    plan_path = tmp_path / "plan.json"
    result = run_cli("plan", path, "--budget-params", "40%", "--tt", "-o", plan_path)
    assert result.returncode == 0, result.stderr
    entries = json.loads(plan_path.read_text())["entries"]
    assert any(e["method"] == "tt" and "tt" in e for e in entries)
    out = tmp_path / "small.onnx"
    result = run_cli("compress", path, "--plan", plan_path, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "MatMul" in {n.op_type for n in onnx.load(out).graph.node}


def test_tensor_train_candidates_keep_to_the_break_even_guard(tmp_path):
    """At batch 1 a TT chain of a 256 x 256 layer can cost twice the dense FLOPs while
    holding far fewer parameters: a parameter budget must not be offered it."""
    weight = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [tensor_value("x", [1, 256])], ["y"],
                       [numpy_helper.from_array(weight, "w")])
    path = tmp_path / "wide.onnx"
    path.write_bytes(model.SerializeToString())
    analysis = analyze_model(lrdeploy.load(path).canonical)
    host = get_device("host")
    feeds = [runtime.random_inputs(analysis.model, analysis.specs, 0)]
    planner = Planner(analysis, host, RooflineLatency(host), feeds, methods=("svd", "tt"))
    (options,) = planner.options
    (site,) = analysis.sites
    rule = TTMatrix()
    for candidate in (c for c in options.menu if c.method == "tt"):
        cost = rule.cost(site, candidate.tt)
        assert cost.params < site.params and cost.flops < site.flops, candidate
