"""The budget planner: knapsack, data-aware factorization, latency cache, budgets end to end."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
from onnx import helper, numpy_helper

import lrdeploy
from conftest import decaying_mlp, make_model, run_cli, tensor_value
from lrdeploy import runtime
from lrdeploy.analysis import analyze_model
from lrdeploy.api import Budget, plan_for_budget
from lrdeploy.calibration import (
    feature_rows,
    ledoit_wolf,
    padding_mask,
    site_statistics,
    split_calibration,
)
from lrdeploy.decompositions import (
    singular_values,
    spatial_svd,
    spatial_unfolding,
    svd_factors,
    svd_output_errors,
    whitened_svd_factors,
    whitening,
)
from lrdeploy.errors import LrdeployWarning
from lrdeploy.latency import (
    OnnxruntimeLatency,
    RooflineLatency,
    TvmLatency,
    latency_model,
    node_costs,
    structure_key,
)
from lrdeploy.methods import rule_for
from lrdeploy.plan import Plan, PlanEntry, apply_plan
from lrdeploy.planner import (
    LOOSEN_ABOVE,
    Planner,
    WeightSubstitution,
    error_notes,
    rank_grid,
    standalone,
)
from lrdeploy.search import Frontier, Option
from lrdeploy.targets.devices import get_device, host_cpu_model, host_simd_lanes


def test_knapsack_is_optimal_on_a_hand_checked_instance():
    groups = [
        [Option(10, 0.0), Option(6, 1.0), Option(3, 5.0)],
        [Option(8, 0.0), Option(5, 0.5), Option(2, 4.0)],
        [Option(4, 0.0), Option(1, 3.0)],
    ]
    frontier = Frontier(groups, bin_size=1)
    # Budget 14: (6, 5, 1) costs 12, error 4.5; (6, 5, 4)=15 too much; (10, 2, 1)=13 err 7;
    # (3, 8, 1)=12 err 8; (6, 2, 4)=12 err 5.0; (3, 5, 4)=12 err 5.5 -> best is error 4.5.
    best = frontier.best(14)
    assert best.picks == (1, 1, 1) and best.cost == 12 and best.error == pytest.approx(4.5)
    # Brute force agrees at every budget.
    for budget in range(6, 23):
        feasible = [sum(g[p].error for g, p in zip(groups, picks, strict=True))
                    for picks in itertools.product(*(range(len(g)) for g in groups))
                    if sum(g[p].cost for g, p in zip(groups, picks, strict=True)) <= budget]
        assert frontier.best(budget).error == pytest.approx(min(feasible))
    with pytest.raises(lrdeploy.LrdeployError, match="below the least reachable cost 6"):
        frontier.best(5)
    points = frontier.points()
    assert points[0].cost == 6 and points[-1].error == 0.0
    assert all(a.cost < b.cost and a.error > b.error for a, b in itertools.pairwise(points))


def test_knapsack_with_coarse_bins_never_exceeds_the_budget_and_keeps_dense_at_its_cost():
    # Bins coarser than the costs: a choice whose costs round down must not be returned over
    # the budget, and the dense choice (error 0) must fit a budget equal to its exact cost.
    generator = np.random.default_rng(3)
    groups = []
    for _ in range(40):
        dense = float(generator.uniform(0.3, 1.0))
        groups.append([Option(dense, 0.0)] + [
            Option(dense * f, float(generator.uniform(0.1, 2.0)) * (1 - f))
            for f in sorted(generator.uniform(0.05, 0.95, size=4))])
    dense_cost = sum(g[0].cost for g in groups)
    frontier = Frontier(groups, bin_size=dense_cost / 300)
    assert frontier.best(dense_cost).error == 0.0
    for budget in np.linspace(frontier.least_cost, dense_cost, 50):
        assert frontier.best(budget).cost <= budget * (1 + 1e-12)
    small = Frontier([[Option(10, 0), Option(3.0, 0.5), Option(3.4, 0.1)],
                      [Option(5, 0), Option(1.0, 0.3)]], bin_size=2.0)
    assert small.best(4.3).cost <= 4.3 and small.best(4.0) == small.cheapest()


def _anisotropic_data(rows: int, features: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.exp(-np.arange(features) / 6.0)  # known covariance: diag(scales^2) rotated
    rotation, _ = np.linalg.qr(rng.standard_normal((features, features)))
    return rng.standard_normal((rows, features)) * scales @ rotation.T


def test_rank_grid_keeps_to_the_simd_width():
    # A rank off the width leaves onnxruntime's blocked convolution layout (see rank_grid), so
    # every site wider than the width gets multiples of it only: 24 channels at width 16 get 16,
    # not the 6, 12 and 18 a quarter-rank step would give.
    for lanes in (4, 8, 16):
        for full in (24, 32, 96, 144, 160, 384, 1536):
            grid = rank_grid(full, lanes, hints=[0.37 * full])
            assert grid and all(r % lanes == 0 and 0 < r < full for r in grid), (lanes, full)
    assert rank_grid(24, 16) == [16]
    # A site no wider than the width still has candidates, on a quarter of its rank.
    assert rank_grid(16, 16) == [4, 8, 12]


@pytest.mark.parametrize(("flags", "lanes"), [
    ("flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw", 16),
    ("flags\t\t: fpu sse sse2 avx avx2 fma", 8),
    ("flags\t\t: fpu sse sse2 sse4_2", 4),
    ("Features\t: fp asimd evtstrm aes crc32", 4),
])
def test_host_simd_lanes_come_from_the_cpu_flags(tmp_path, flags, lanes):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{flags}\n\nprocessor\t: 1\n{flags}\n")
    assert host_simd_lanes(cpuinfo) == lanes


def test_the_host_row_reads_its_width_and_falls_back_to_4(tmp_path):
    assert get_device("host").simd_lanes == host_simd_lanes()
    assert host_simd_lanes(tmp_path / "missing") == 4


def _whitened_spectrum(weight: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Squared singular values of ``R W``: their tail sums are the whitened factors' output
    errors on the data of ``gram``."""
    return singular_values(whitening(gram) @ weight) ** 2


def test_data_aware_factors_have_smaller_output_error_than_plain_svd():
    rng = np.random.default_rng(0)
    x = _anisotropic_data(2000, 48, seed=1)
    weight = rng.standard_normal((48, 32))
    gram = x.T @ x
    whitened = _whitened_spectrum(weight, gram)
    plain_tail = svd_output_errors(weight, gram)
    for rank in (2, 4, 8, 16):
        left, right = whitened_svd_factors(weight, gram, rank)
        aware = np.linalg.norm(x @ weight - x @ left @ right) ** 2
        u, v = svd_factors(weight, rank)
        plain = np.linalg.norm(x @ weight - x @ u @ v) ** 2
        assert aware < 0.5 * plain  # much better where the data are anisotropic
        assert aware == pytest.approx(whitened[rank:].sum(), rel=1e-3)  # damping aside
        assert plain == pytest.approx(plain_tail[rank], rel=1e-6)
    # Isotropic data: whitening is plain SVD.
    left, right = whitened_svd_factors(weight, np.eye(48), 8)
    u, v = svd_factors(weight, 8)
    assert np.allclose(left @ right, u @ v, atol=1e-8)


def test_held_out_errors_of_whitened_factors_show_what_the_fit_hides():
    """Whitened factors fitted to 16 samples of 64 features: at rank 16 they reproduce those
    samples' outputs exactly (the tail of their own spectrum is nil), not those of other
    samples of the same data, which ``svd_output_errors(W, held_out_gram, fit_gram)`` gives
    exactly."""
    rng = np.random.default_rng(5)
    data = _anisotropic_data(400, 64, seed=6)
    fit, held = data[:16], data[16:]
    weight = rng.standard_normal((64, 40))
    on_held = svd_output_errors(weight, held.T @ held, fit.T @ fit)
    on_fit = _whitened_spectrum(weight, fit.T @ fit)
    for rank in (4, 8, 16):
        left, right = whitened_svd_factors(weight, fit.T @ fit, rank)
        measured = np.linalg.norm(held @ (weight - left @ right)) ** 2
        assert on_held[rank] == pytest.approx(measured, rel=1e-6)
    assert on_fit[16:].sum() / on_fit.sum() < 1e-6
    assert on_held[16] / on_held[0] > 0.01


def test_calibration_split_holds_out_the_last_quarter():
    feeds = [{"x": np.full(2, i)} for i in range(10)]
    split = split_calibration(feeds)
    assert [f["x"][0] for f in split.held_out] == [8, 9] and len(split.fit) == 8
    assert split.disjoint
    one = split_calibration(feeds[:1])
    assert one.fit == one.held_out == feeds[:1] and not one.disjoint


def _conv(path, kernel: tuple[int, int], attributes: dict, channels: int = 16,
          size: int = 12) -> np.ndarray:
    """Writes a one-Conv model (channels -> 24, no bias) to ``path``; returns its kernel."""
    kernel_weights = np.random.default_rng(0).standard_normal(
        (24, channels, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=list(kernel),
                            **attributes)
    model = make_model([node], [tensor_value("x", [1, channels, size, size])], ["y"],
                       [numpy_helper.from_array(kernel_weights, "w")])
    path.write_bytes(model.SerializeToString())
    return kernel_weights


@pytest.mark.parametrize("attributes", [
    {"strides": [2, 1], "dilations": [2, 1], "pads": [1, 0, 2, 0]},
    # Height 12, stride 2: SAME pads 1 row, below (UPPER) or above (LOWER).
    {"strides": [2, 1], "auto_pad": "SAME_UPPER"},
    {"strides": [2, 1], "auto_pad": "SAME_LOWER"},
    {"strides": [3, 1], "auto_pad": "VALID"},
])
def test_vertical_patches_times_the_unfolded_kernel_is_the_conv(tmp_path, attributes):
    """With a kh x 1 kernel, the conv is exactly the patches (calibration's rows for a k x k
    site) times spatial SVD's unfolding: the rows hold the right pixels, in the right order."""
    kernel = _conv(tmp_path / "conv.onnx", (3, 1), attributes)
    analysis = analyze_model(lrdeploy.load(tmp_path / "conv.onnx").canonical)
    x = np.random.default_rng(1).standard_normal((1, 16, 12, 12)).astype(np.float32)
    y = runtime.run(runtime.session(analysis.model), {"x": x})["y"]
    rows = feature_rows(analysis.sites[0], x) @ spatial_unfolding(kernel)
    assert np.allclose(rows.reshape(1, y.shape[2], 12, 24).transpose(0, 3, 1, 2), y, atol=1e-4)


def test_data_aware_spatial_svd_keeps_a_k_by_k_convs_outputs(tmp_path, latency_cache):
    kernel = _conv(tmp_path / "conv.onnx", (3, 3), {"pads": [1, 1, 1, 1]})
    # Eight images whose pixels share a known channel covariance; the last two are held out.
    images = _anisotropic_data(8 * 144, 16, seed=5).reshape(8, 1, 12, 12, 16)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=images.transpose(0, 1, 4, 2, 3).astype(np.float32))
    aware = lrdeploy.compress(tmp_path / "conv.onnx", rank="rank:16", method="spatial",
                              calib=calib)
    assert [e.method for e in aware.plan.factorized()] == ["wspatial"]
    plain = lrdeploy.compress(tmp_path / "conv.onnx", calib=calib, plan=Plan(
        [PlanEntry(e.site, "spatial", e.ranks) for e in aware.plan.entries]))
    assert aware.fidelity[0].relative_l2_error < 0.7 * plain.fidelity[0].relative_l2_error
    # Exact at full rank, like every rewrite.
    loaded = lrdeploy.load(tmp_path / "conv.onnx")
    analysis = analyze_model(loaded.canonical)
    split = split_calibration(runtime.load_calibration(calib, analysis.specs))
    analysis.grams, analysis.means = site_statistics(analysis.model, analysis.sites, split.fit)
    vertical, horizontal = spatial_svd(kernel, 48, analysis.grams["conv"])
    assert np.allclose(np.einsum("kci,okj->ocij", vertical[..., 0], horizontal[:, :, 0]), kernel,
                       atol=1e-3)
    # The planner offers both, and on the held-out images the whitened factors err less.
    host = get_device("host")
    planner = Planner(analysis, host, RooflineLatency(host), split.held_out)
    errors = {(c.method, c.ranks): c.site_error for c in planner.options[0].candidates}
    shared = [ranks for method, ranks in errors if method == "wspatial"
              and ("spatial", ranks) in errors]
    assert shared and all(errors["wspatial", r] < errors["spatial", r] for r in shared)


@pytest.fixture
def mlp(tmp_path):
    return decaying_mlp(tmp_path / "mlp.onnx")


@pytest.fixture
def latency_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRDEPLOY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _calibration(model_path, tmp_path, count: int = 6):
    # Samples of one distribution (one covariance), as a calibration set is.
    x = _anisotropic_data(256 * count, 512, seed=10).astype(np.float32).reshape(count, 256, 512)
    path = tmp_path / "calib.npz"
    np.savez(path, x=x)
    return path


def test_a_fed_weight_gives_the_outputs_of_the_rewritten_model(mlp, tmp_path, latency_cache):
    """The planner's single-site model errors feed each candidate's approximation to one
    session of the dense model instead of rewriting it: the outputs must be the rewritten
    model's, for plain and whitened factors alike."""
    analysis = analyze_model(lrdeploy.load(mlp).canonical)
    split = split_calibration(runtime.load_calibration(_calibration(mlp, tmp_path, 8),
                                                       analysis.specs))
    analysis.grams, analysis.means = site_statistics(analysis.model, analysis.sites, split.fit)
    host = get_device("host")
    planner = Planner(analysis, host, RooflineLatency(host), split.held_out)
    substitution = WeightSubstitution(analysis.model, analysis.sites)
    checked = set()
    for options in planner.options:
        site = options.site
        for candidate in options.candidates[1::4]:
            rule = rule_for(candidate.method, site, grams=analysis.grams)
            (fed,) = substitution.outputs(site, rule.approximation(site, candidate.ranks),
                                          split.held_out[:1])
            rewritten = planner.apply(Plan([candidate.entry(site.name)]))
            (expected,) = runtime.run(runtime.session(rewritten), split.held_out[0]).values()
            assert np.allclose(fed[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
            assert not np.allclose(fed[0], planner.dense_outputs[1][0][0], rtol=1e-3)
            checked.add(candidate.method)
    assert checked == {"svd", "wsvd"}


def test_budget_is_met_on_host_and_the_latency_cache_is_reused(mlp, tmp_path, latency_cache):
    device = get_device("host")
    analysis = analyze_model(lrdeploy.load(mlp).canonical)
    feeds = [runtime.random_inputs(analysis.model, analysis.specs, seed) for seed in range(2)]
    planner = Planner(analysis, device, OnnxruntimeLatency(device), feeds)
    planner.measure_latency()
    assert planner.latency.measured > 0
    reference = planner.dense_model_ms  # the plan checks update it as they time the model
    outcome = planner.solve("ms", 0.7, relative=True)  # 70% of the dense model's latency
    budget = outcome.budget
    assert budget == pytest.approx(0.7 * reference, rel=1e-9)
    assert outcome.dense == reference  # the figure the budget and the plans were scaled to
    assert outcome.measured <= budget
    assert outcome.plan.factorized()
    # Of the plans that fit, the one whose real model error is least is kept.
    fits = [a["measured_relative_error"] for a in outcome.attempts
            if "measured_relative_error" in a]
    assert fits and outcome.measured_error == pytest.approx(min(fits), rel=1e-6)
    assert not outcome.notes  # 70% of a decaying spectrum keeps the outputs close
    assert outcome.frontier[0]["cost"] < outcome.frontier[-1]["cost"]
    # A second planner for the same device measures no chain again.
    again = Planner(analysis, device, OnnxruntimeLatency(device), feeds)
    again.measure_latency()
    assert again.latency.measured == 0 and again.latency.reused == planner.latency.measured + \
        planner.latency.reused
    assert list(latency_cache.glob("latency/host-onnxruntime.json"))


class BurstyLatency(OnnxruntimeLatency):
    """Chains are timed for real; a plan's side-by-side timings read as scripted fractions of
    the dense model, as a load burst on a shared host makes them: the planner's decisions on
    noisy timings cannot be checked on timings that happen to be quiet."""

    def __init__(self, device, ratios):
        super().__init__(device)
        self.ratios = list(ratios)

    def pair_ms(self, model, reference, feed):
        return self.ratios.pop(0), 1.0


@pytest.mark.parametrize(("ratios", "refused"), [((1.3, 0.95, 0.97), False),
                                                  ((1.3, 1.2, 0.9), True),
                                                  ((1.3, 1.02, 1.03), True)])
def test_one_slow_timing_of_the_cheapest_plan_does_not_refuse_the_budget(
        mlp, latency_cache, ratios, refused):
    device = get_device("host")
    analysis = analyze_model(lrdeploy.load(mlp).canonical)
    feeds = [runtime.random_inputs(analysis.model, analysis.specs, 0)]
    latency = BurstyLatency(device, [])
    planner = Planner(analysis, device, latency, feeds)
    planner.measure_latency()
    reference = planner.dense_model_ms
    least = planner.rest("ms") + planner.frontier("ms").least_cost
    fraction = least / reference  # aiming under it, the first plan measured is the cheapest
    latency.ratios = [r * fraction for r in ratios]
    if refused:  # the median of its three timings decides; near the budget is not within it
        with pytest.raises(lrdeploy.LrdeployError, match="least reachable .* as measured"):
            planner.solve("ms", fraction, relative=True)
        assert not latency.ratios
        return
    outcome = planner.solve("ms", fraction, relative=True)
    assert outcome.attempts[0]["cheapest"] and len(outcome.attempts) == 1
    assert outcome.measured == pytest.approx(0.97 * outcome.budget)


def test_a_budget_the_dense_model_meets_measures_one_plan(mlp, latency_cache):
    """Far above the dense model's time the plan keeps every site dense and is the only plan
    measured: loosening the search finds it again, which ends the search (it once stepped on
    down to the cheapest plan and measured that too)."""
    device = get_device("host")
    analysis = analyze_model(lrdeploy.load(mlp).canonical)
    latency = BurstyLatency(device, [1.0, 1.0])  # a fit is timed twice; a third would not pop
    planner = Planner(analysis, device, latency,
                      [runtime.random_inputs(analysis.model, analysis.specs, 0)])
    planner.measure_latency()
    outcome = planner.solve("ms", 100 * planner.dense_model_ms)
    assert len(outcome.attempts) == 1 and not latency.ratios
    assert {entry.method for entry in outcome.plan.entries} == {"dense"}
    assert outcome.measured_error == 0
    assert any("the dense model meets the budget" in note for note in outcome.notes)


def test_cli_plan_round_trip_and_impossible_budget(mlp, tmp_path, latency_cache):
    plan_path, report = tmp_path / "mlp.plan.json", tmp_path / "report.json"
    done = run_cli("plan", mlp, "--budget-params", "400000", "-o", plan_path,
                   "--report", report, "--plot", tmp_path / "frontier.png")
    assert done.returncode == 0, done.stderr
    assert "no calibration data" in done.stderr  # plain SVD, with a warning
    data = json.loads(report.read_text())
    assert data["measured"] <= 400000 and data["plan"]["entries"]
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    # Every measured error is printed beside the additive prediction.
    fits = [a for a in data["attempts"] if "measured_relative_error" in a]
    assert fits and all(f"{a['measured']:,.0f} params -> error "
                        f"{a['measured_relative_error']:.4g}" in done.stdout for a in fits)
    plan = Plan.load(plan_path)
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    out = tmp_path / "small.onnx"
    done = run_cli("compress", mlp, "--plan", plan_path, "-o", out, "--report",
                   tmp_path / "c.json")
    assert done.returncode == 0, done.stderr
    assert lrdeploy.sites.model_params(lrdeploy.load(out).canonical) == data["measured"]
    done = run_cli("plan", mlp, "--budget-params", "30%", "--report", report, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert data["measured"] <= 0.3 * data["dense"]
    assert data["budget"]["value"] == pytest.approx(0.3 * data["dense"])
    done = run_cli("plan", mlp, "--budget-ms", "0.0001", "-o", tmp_path / "never.json")
    assert done.returncode == 2 and "below the least reachable" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "never.json").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--rpc", "localhost"], "--rpc 'localhost': expected HOST:PORT"),
    (["--key", "rpi4"], "--key 'rpi4' names a device of a tracker: give --tracker"),
    (["--tracker", "127.0.0.1:9190"], "--tracker needs --key"),
    (["--engine", "roofline", "--rpc", "127.0.0.1:9090"], "--engine roofline does not use"),
])
def test_a_device_address_that_cannot_be_used_is_refused_before_planning(mlp, tmp_path,
                                                                          options, message):
    """Once, a key without a tracker or an RPC server on the host was ignored (the plan timed
    on this machine), and an address without a port failed only after the model's analysis."""
    done = run_cli("plan", mlp, "--budget-ms", "80%", *options, "-o", tmp_path / "p.json")
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "no calibration data" not in done.stderr  # refused before the model was read
    assert not (tmp_path / "p.json").exists()


def test_an_rpc_server_for_the_host_times_with_tvm_there():
    assert isinstance(latency_model(get_device("host"), rpc="127.0.0.1:9090"), TvmLatency)
    assert isinstance(latency_model(get_device("host")), OnnxruntimeLatency)


def test_data_aware_compress_beats_plain_svd_on_calibration_data(mlp, tmp_path):
    calib = _calibration(mlp, tmp_path)
    plain = lrdeploy.compress(mlp, rank="rank:32", samples=2)
    aware = lrdeploy.compress(mlp, rank="rank:32", calib=calib)
    assert {e.method for e in aware.plan.factorized()} == {"wsvd"}
    plain_on_calib = lrdeploy.compress(mlp, calib=calib,
                                       plan=Plan([PlanEntry(e.site, "svd", e.ranks)
                                                  for e in aware.plan.entries]))
    # At the same ranks, on the same held-out sample, the whitened factors nearly halve the
    # error.
    assert aware.fidelity[0].relative_l2_error < 0.6 * plain_on_calib.fidelity[0].relative_l2_error
    # The statistics are fitted on 5 of the 6 samples; the last one measures the fidelity.
    verification = aware.report["verification"]
    assert verification["feeds"] == 1 and "held out" in verification["feed_source"]
    x = np.load(calib)["x"]
    dense_y = runtime.run(runtime.session(lrdeploy.load(mlp).canonical), {"x": x[-1]})["y"]
    aware_y = runtime.run(runtime.session(aware.model), {"x": x[-1]})["y"]
    assert aware.fidelity[0].relative_l2_error == pytest.approx(
        np.linalg.norm(aware_y - dense_y) / np.linalg.norm(dense_y), rel=1e-4)
    assert plain.plan.factorized()[0].method == "svd"


def test_grams_and_standalone_chains(mlp, tmp_path):
    loaded = lrdeploy.load(mlp)
    analysis = analyze_model(loaded.canonical)
    feeds = runtime.load_calibration(_calibration(mlp, tmp_path, 2), analysis.specs)
    raw = site_statistics(loaded.canonical, analysis.sites, feeds, shrink=False).grams
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    assert np.allclose(raw["fc1"], x.T @ x, rtol=1e-6)
    # Ledoit-Wolf keeps the trace and lifts the smallest eigenvalues (512 samples, 512 features)
    shrunk = site_statistics(loaded.canonical, analysis.sites, feeds).grams["fc1"]
    assert np.trace(shrunk) == pytest.approx(np.trace(raw["fc1"]))
    assert np.linalg.eigvalsh(shrunk)[0] > 2 * np.linalg.eigvalsh(raw["fc1"])[0]
    one = standalone(loaded.canonical, analysis.sites[0])
    assert [n.op_type for n in one.graph] == ["MatMul"]
    out = runtime.run(runtime.session(one), {"x": feeds[0]["x"]})["y"]
    assert np.allclose(out, feeds[0]["x"] @ analysis.sites[0].weight, rtol=1e-4, atol=1e-4)
    factorized = apply_plan(one, Plan([PlanEntry("fc1", "svd", [16])]), analysis.sites[:1])
    assert structure_key(factorized) != structure_key(one)


def test_ledoit_wolf_shrinks_only_when_samples_are_few():
    rng = np.random.default_rng(3)

    def shrunk(rows: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((rows, 40)) * np.exp(-np.arange(40) / 8)
        gram = x.T @ x
        return gram, ledoit_wolf(gram, float(np.sum(np.sum(x**2, axis=1) ** 2)), rows)

    gram, estimate = shrunk(20000)
    assert np.linalg.norm(estimate - gram) < 0.02 * np.linalg.norm(gram)
    gram, estimate = shrunk(10)  # rank 10 of 40: the estimate must be full rank
    assert np.linalg.matrix_rank(gram) == 10 and np.linalg.eigvalsh(estimate)[0] > 0


def test_a_plan_that_destroys_the_outputs_is_kept_with_a_warning(tmp_path, latency_cache):
    """y = x W - x V with V close to W: any factorization's error dwarfs the small output."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    v = w + 0.01 * rng.standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("MatMul", ["x", "v"], ["b"], name="second"),
             helper.make_node("Sub", ["a", "b"], ["y"])]
    model = make_model(nodes, [tensor_value("x", [32, 64])], ["y"],
                       [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v")])
    path = tmp_path / "difference.onnx"
    path.write_bytes(model.SerializeToString())
    analysis = analyze_model(lrdeploy.load(path).canonical)
    feeds = [runtime.random_inputs(analysis.model, analysis.specs, seed) for seed in range(2)]
    planner = Planner(analysis, get_device("host"), RooflineLatency(get_device("host")), feeds)
    with pytest.warns(LrdeployWarning, match="no closer to the dense model's than zeros"):
        outcome = planner.solve("params", 0.6, relative=True)
    assert outcome.plan.factorized() and outcome.measured_error >= 1
    assert outcome.notes and "too tight" in outcome.notes[0]


def test_a_large_error_is_told_apart_from_a_useless_one():
    assert error_notes(0.3) == []
    (large,) = error_notes(0.87)
    assert "87% of their size" in large and "measure its accuracy" in large
    (useless,) = error_notes(1.2)
    assert "no closer to the dense model's than zeros" in useless


def test_roofline_plans_for_an_unreachable_device(mlp, latency_cache):
    with pytest.warns(LrdeployWarning, match="no calibration data"):
        outcome = plan_for_budget(mlp, Budget("ms", 1e6, target="rpi4"))
    assert outcome.estimate and "estimate" in outcome.engine
    assert outcome.plan.factorized() == []  # a generous budget keeps everything dense
    device = get_device("rpi4")
    roofline = RooflineLatency(device)
    dense = roofline.model_ms(lrdeploy.load(mlp).canonical, {"x": np.zeros((256, 512),
                                                                           np.float32)})
    flops = 2 * 2 * 256 * 512 * 1024
    assert dense >= flops / (device.peak_gflops * 1e6)


def test_the_roofline_counts_a_transformer_whole_and_plans_a_relative_budget(minilm_l3,
                                                                            latency_cache):
    """ONNX shape inference loses MiniLM's batch axis (a Slice of a buffer), after which no
    MatMul has a shape: the roofline takes the shapes from one onnxruntime run instead, so
    every MatMul counts its FLOPs and the embedding lookup moves the rows it returns, not the
    table. The whole plan's estimate then agrees with its chains', and a share of the dense
    model's estimate is planned for a board without a server (it missed on the first plan)."""
    model = lrdeploy.load(minilm_l3).canonical
    costs = dict(zip([node.name for node in model.graph], node_costs(model), strict=True))
    matmuls = [costs[node.name] for node in model.graph if node.op_type == "MatMul"]
    assert len(matmuls) == 24 and all(flops > 0 for flops, _ in matmuls)
    (lookup,) = [costs[node.name] for node in model.graph
                 if node.op_type == "Gather" and "word_embeddings" in node.name]
    assert lookup[1] < 4 * 30522 * 384 / 100  # a 32-token lookup, not the 47 MB table
    with pytest.warns(LrdeployWarning, match="no calibration data"):
        outcome = plan_for_budget(minilm_l3, Budget("ms", 0.8, relative=True, target="rpi4"))
    assert outcome.estimate and outcome.plan.factorized()
    assert outcome.measured <= outcome.budget == pytest.approx(0.8 * outcome.dense)
    assert outcome.measured == pytest.approx(outcome.predicted, rel=0.02)
    # An estimate does not vary, so it is searched to the budget like a measurement: here the
    # first plan left 1.9% of it unused, and the search loosened towards it (four plans that
    # missed it by 0.03 to 0.55%: a whole plan's estimate is not its chains' sum).
    assert outcome.measured >= (1 - 2 * LOOSEN_ABOVE) * outcome.budget
    assert max(a["search_budget"] for a in outcome.attempts) > outcome.budget


def test_a_half_precision_gpu_model_is_planned_at_half_precision(mlp, tmp_path,
                                                                  latency_cache):
    """``--dtype float16`` on a GPU target: the roofline takes the float16 peak and 2-byte
    values, so a budget the float32 model needs factorizing for keeps every site dense at half
    precision, and ``compile --dtype float16`` plans its budget so."""
    device = get_device("mali-g610")
    model = lrdeploy.load(mlp).canonical
    feed = {"x": np.zeros((256, 512), np.float32)}
    single, half = (RooflineLatency(device, dtype=dtype).model_ms(model, feed)
                    for dtype in ("float32", "float16"))
    assert half < 0.6 * single  # its MatMuls are compute-bound, at twice the peak
    budget = 0.7 * single
    with pytest.warns(LrdeployWarning, match="no calibration data"):
        at_single = plan_for_budget(mlp, Budget("ms", budget, target="mali-g610"))
        at_half = plan_for_budget(mlp, Budget("ms", budget, target="mali-g610",
                                              dtype="float16"))
    assert at_single.plan.factorized() and not at_half.plan.factorized()
    assert "float16" in at_half.engine and "float16" not in at_single.engine
    refused = run_cli("plan", mlp, "--budget-ms", "1", "--dtype", "float16")
    assert refused.returncode == 2 and "for GPU targets" in refused.stderr
    out = tmp_path / "art"
    done = run_cli("compile", mlp, "--target", "mali-g610", "--dtype", "float16",
                   "--budget-ms", f"{budget}", "-o", out)
    assert done.returncode == 0, done.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert {entry["method"] for entry in plan["entries"]} == {"dense"}


def test_tvm_engine_times_chains_on_host_and_caches_them(mlp, latency_cache):
    analysis = analyze_model(lrdeploy.load(mlp).canonical)
    site = analysis.sites[0]
    dense = standalone(analysis.model, site)
    chain = apply_plan(dense, Plan([PlanEntry(site.name, "svd", [32])]), analysis.sites[:1])
    engine = TvmLatency(get_device("host"))
    dense_ms, chain_ms = engine.chain_ms([dense, chain])
    assert engine.measured == 2 and 0 < chain_ms < dense_ms  # rank 32 of 512: 8x fewer FLOPs
    again = TvmLatency(get_device("host"))
    assert again.chain_ms([chain]) == [chain_ms] and again.measured == 0
    assert (latency_cache / "latency" / "host-tvm.json").is_file()


def test_tvm_engine_with_sampled_schedules_compiles_chains_so(mlp, latency_cache, monkeypatch):
    """A plan for compile --sample-schedules times its chains compiled the same way, in a
    table of their own (untuned figures may not stand in for them)."""
    from lrdeploy import deploy

    compiled = []

    def compile_and_record(*args, **kwargs):
        compiled.append(kwargs["sample_schedules"])
        return real_compile(*args, **kwargs)

    real_compile = deploy.compile_model
    monkeypatch.setattr(deploy, "compile_model", compile_and_record)
    analysis = analyze_model(lrdeploy.load(mlp).canonical)
    chain = standalone(analysis.model, analysis.sites[0])
    engine = latency_model(get_device("host"), "tvm", sample_schedules=True)
    assert engine.chain_ms([chain])[0] > 0 and compiled == [True]
    assert "sampled schedules" in engine.label
    assert (latency_cache / "latency" / "host-tvm-sampled.json").is_file()
    assert TvmLatency(get_device("host")).table.entries == {}


def test_compile_with_a_parameter_budget(mlp, tmp_path, latency_cache):
    out = tmp_path / "art"
    done = run_cli("compile", mlp, "--budget-params", "300000", "-o", out)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert any(e["method"] == "svd" for e in plan["entries"])
    assert manifest["onnx_param_bytes"] <= 4 * 300000
    done = run_cli("verify", out)
    assert done.returncode == 0, done.stderr


def test_latency_threads_are_timed_and_cached_apart(mlp, tmp_path, latency_cache):
    analysis = analyze_model(lrdeploy.load(mlp).canonical)
    chain = standalone(analysis.model, analysis.sites[0])
    device = get_device("host")
    one = OnnxruntimeLatency(device, threads=1)
    assert one.chain_ms([chain])[0] > 0 and "1 thread" in one.label
    assert (latency_cache / "latency" / "host-onnxruntime-1t.json").is_file()
    default = OnnxruntimeLatency(device)
    default.chain_ms([chain])
    assert default.measured == 1 and default.reused == 0  # not taken from the 1-thread table
    result = run_cli("plan", mlp, "--budget-ms", "50%", "--latency-threads", "0")
    assert result.returncode == 2 and "--latency-threads must be at least 1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_latency_table_from_another_engine_version_is_measured_again(mlp, latency_cache):
    analysis = analyze_model(lrdeploy.load(mlp).canonical)
    chain = standalone(analysis.model, analysis.sites[0])
    first = OnnxruntimeLatency(get_device("host"))
    first.chain_ms([chain])
    path = latency_cache / "latency" / "host-onnxruntime.json"
    saved = json.loads(path.read_text())
    assert saved["stamp"] == first.stamp() and "onnxruntime " in saved["stamp"]
    assert OnnxruntimeLatency(get_device("host")).table.entries == saved["entries"]
    saved["stamp"] = saved["stamp"].replace("onnxruntime ", "onnxruntime 0.0.0-was-")
    path.write_text(json.dumps(saved))
    with pytest.warns(LrdeployWarning, match="another engine version"):
        again = OnnxruntimeLatency(get_device("host"))
    again.chain_ms([chain])
    assert again.measured == 1 and again.reused == 0
    assert json.loads(path.read_text())["stamp"] == first.stamp()
    # A table from before stamps (a bare mapping) is measured again too.
    path.write_text(json.dumps(saved["entries"]))
    assert OnnxruntimeLatency(get_device("host")).table.entries == {}


def test_host_cpu_model_comes_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx\n")
    assert host_cpu_model(cpuinfo) == "AMD EPYC 7B13"
    assert host_cpu_model(tmp_path / "missing")  # the architecture where cpuinfo is missing


@pytest.mark.parametrize("threads", [1, 2])
def test_pair_timing_compares_a_model_with_its_reference(mlp, latency_cache, threads):
    """The plan check's timing (the two take turns, the median ratio within a pair of turns:
    single runs with one thread, runs back to back with a pool) finds a model level with
    itself and half the work below the whole."""
    analysis = analyze_model(lrdeploy.load(mlp).canonical)
    first_layer = standalone(analysis.model, analysis.sites[0])  # half the model's FLOPs
    latency = OnnxruntimeLatency(get_device("host"), threads=threads)
    feed = runtime.random_inputs(analysis.model, analysis.specs, 0)
    same, reference = latency.pair_ms(analysis.model, analysis.model, feed)
    assert 0.8 < same / reference < 1.25
    part, whole = latency.pair_ms(first_layer, analysis.model, feed)
    assert part < 0.8 * whole
    assert latency.measured == 0  # whole-model timings are never cached


def test_bias_correction_removes_the_mean_output_error(tmp_path):
    """Inputs with a large mean (as after a ReLU): the corrected chain's output error on the
    calibration data has no mean left and equals the centred data's error, for a MatMul + bias
    Add (the bias shifted), a Gemm (its C) and a 1x1 conv (its bias). A bare MatMul has no bias
    to shift and is left as it is: the graph's operators stay those of the plain plan."""
    rng = np.random.default_rng(3)
    x = (_anisotropic_data(512, 48, seed=4) + rng.uniform(1, 3, 48)).astype(np.float32)
    w = rng.standard_normal((48, 40)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
             helper.make_node("MatMul", ["x", "w_linear"], ["xw"], name="linear"),
             helper.make_node("Add", ["xw", "bias"], ["d"], name="linear_bias"),
             helper.make_node("Gemm", ["x", "g", "c"], ["b"], name="gemm", transB=1, alpha=0.5,
                              beta=2.0),
             helper.make_node("Transpose", ["x"], ["xt"], name="features_first"),
             helper.make_node("Reshape", ["xt", "shape"], ["img"], name="to_image"),
             helper.make_node("Conv", ["img", "k", "kb"], ["conv"], name="conv",
                              kernel_shape=[1, 1])]
    # The conv reads x as one image of 512 pixels with 48 channels.
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w.copy(), "w_linear"),
             numpy_helper.from_array(np.ones(40, np.float32), "bias"),
             numpy_helper.from_array(w.T.copy(), "g"),
             numpy_helper.from_array(np.ones(40, np.float32), "c"),
             numpy_helper.from_array(np.array([1, 48, 512, 1], np.int64), "shape"),
             numpy_helper.from_array(w.T[:, :, None, None].copy(), "k"),
             numpy_helper.from_array(np.ones(40, np.float32), "kb")]
    path = tmp_path / "three.onnx"
    model = make_model(nodes, [tensor_value("x", [512, 48])], ["a", "b", "conv", "d"], inits)
    path.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "calib.npz", x=x[None])
    entries = [PlanEntry(name, "svd", [6]) for name in ("mm", "linear", "gemm", "conv")]
    # One sample both fits the means and measures the errors (the exact identity below needs
    # that), which is worth a warning to a user.
    with pytest.warns(LrdeployWarning, match="one calibration sample both fits"):
        plain = lrdeploy.compress(path, plan=Plan(entries), calib=tmp_path / "calib.npz")
    plan = Plan(entries, bias_correction=True)
    assert Plan.from_dict(plan.to_dict()).bias_correction
    with pytest.raises(lrdeploy.LrdeployError, match="bias_correction must be true or false"):
        Plan.from_dict({**plan.to_dict(), "bias_correction": "no"})
    with pytest.warns(LrdeployWarning, match="one calibration sample both fits"):
        corrected = lrdeploy.compress(path, plan=plan, calib=tmp_path / "calib.npz")
    assert [structure_key(m) for m in (plain.model, corrected.model)] == \
        [structure_key(corrected.model)] * 2
    analysis = analyze_model(lrdeploy.load(path).canonical)
    linear = next(s for s in analysis.sites if s.name == "linear")
    assert [n.op_type for n in standalone(analysis.model, linear).graph] == ["MatMul", "Add"]
    feeds = {"x": x}
    dense = runtime.run(runtime.session(lrdeploy.load(path).canonical), feeds)
    before = runtime.run(runtime.session(plain.model), feeds)
    after = runtime.run(runtime.session(corrected.model), feeds)
    left, right = svd_factors(w.astype(np.float64), 6)
    centred = x.astype(np.float64) - x.mean(axis=0)
    assert np.array_equal(after["a"], before["a"])
    for name, scale in (("d", 1.0), ("b", 0.5)):
        error = after[name] - dense[name]
        assert np.abs(error.mean(axis=0)).max() < 1e-3 * np.abs(dense[name]).mean()
        expected = scale * np.linalg.norm(centred @ (w - left @ right))
        assert np.linalg.norm(error) == pytest.approx(expected, rel=1e-3)
        assert np.linalg.norm(error) < 0.8 * np.linalg.norm(before[name] - dense[name])
    conv_error = (after["conv"] - dense["conv"])[0, :, :, 0]  # channels x pixels
    assert np.linalg.norm(conv_error) == pytest.approx(
        np.linalg.norm(centred @ (w - left @ right)), rel=1e-3)
    assert np.abs(conv_error.mean(axis=1)).max() < 1e-3 * np.abs(dense["conv"]).mean()
    assert np.linalg.norm(conv_error) < 0.8 * np.linalg.norm(before["conv"] - dense["conv"])
    # The planner measures its plan both ways and keeps the correction here, where it helps.
    # A width of 8 whatever the host's, so that half the parameters is reachable (at width 16
    # these 40-wide sites could go no lower than rank 16).
    analysis.grams, analysis.means = site_statistics(analysis.model, analysis.sites, [feeds])
    device = dataclasses.replace(get_device("host"), simd_lanes=8)
    planner = Planner(analysis, device, RooflineLatency(device), [feeds], data_aware=False)
    outcome = planner.solve("params", 0.5, relative=True)
    assert outcome.plan.bias_correction and outcome.attempts[0]["bias_correction"]
    uncorrected = dataclasses.replace(outcome.plan, bias_correction=False)
    assert outcome.measured_error < planner.model_error(planner.apply(uncorrected))[0]


def test_kxk_conv_bias_correction_removes_the_mean_output_error(tmp_path):
    """A 3 x 3 conv (no padding, so every tap reads data) on inputs with large channel means:
    with the correction, plain spatial SVD's and Tucker-2's output errors have next to no mean
    left per channel and are smaller; the operators are those of the uncorrected chains."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((1, 8, 16, 16)) + rng.uniform(1, 3, (1, 8, 1, 1))).astype(np.float32)
    node = helper.make_node("Conv", ["x", "k", "kb"], ["y"], name="conv", kernel_shape=[3, 3])
    inits = [numpy_helper.from_array(rng.standard_normal((12, 8, 3, 3)).astype(np.float32), "k"),
             numpy_helper.from_array(np.ones(12, np.float32), "kb")]
    path = tmp_path / "conv.onnx"
    path.write_bytes(make_model([node], [tensor_value("x", [1, 8, 16, 16])], ["y"], inits)
                     .SerializeToString())
    np.savez(tmp_path / "calib.npz", x=x)
    ranks = {"spatial": [4], "wspatial": [4], "tucker2": [4, 4]}
    models = {}
    for method, correct in itertools.product(ranks, (False, True)):
        plan = Plan([PlanEntry("conv", method, ranks[method])], bias_correction=correct)
        with pytest.warns(LrdeployWarning, match="one calibration sample both fits"):
            models[method, correct] = lrdeploy.compress(path, plan=plan,
                                                        calib=tmp_path / "calib.npz").model
    assert structure_key(models["spatial", False]) == structure_key(models["wspatial", True])
    dense = runtime.run(runtime.session(lrdeploy.load(path).canonical), {"x": x})["y"]
    errors = {key: runtime.run(runtime.session(m), {"x": x})["y"] - dense
              for key, m in models.items()}
    mean = {key: np.abs(e.mean(axis=(0, 2, 3))).max() for key, e in errors.items()}
    size = {key: np.linalg.norm(e) for key, e in errors.items()}
    for method in ("spatial", "tucker2"):
        assert structure_key(models[method, False]) == structure_key(models[method, True])
        # Not exactly none: each tap reads 14 of the 16 columns the mean patch was taken over.
        assert mean[method, True] < 0.05 * mean[method, False]
        assert size[method, True] < 0.9 * size[method, False]
    assert "conv/tucker_b" in models["tucker2", True].graph.initializers
    # Whitened factors keep the mean direction themselves: their correction is applied (a new
    # bias) but moves little.
    assert mean["wspatial", False] < 0.05 * mean["spatial", False]
    assert "conv/spatial_b" in models["wspatial", True].graph.initializers
    assert "conv/spatial_b" not in models["wspatial", False].graph.initializers
    assert size["wspatial", True] < 1.01 * size["wspatial", False]


def test_google_berts_input_mask_is_a_padding_mask_too():
    mask = np.array([[1, 1, 1, 0, 0]], np.int32)
    assert (padding_mask({"input_ids": mask, "input_mask": mask}) == mask.astype(bool)).all()
    assert padding_mask({"input_mask": 2 * mask}) is None  # not a 0 / 1 mask


def test_padding_changes_neither_the_statistics_nor_the_verification(minilm_l3, tmp_path):
    """A Hugging Face text model fed the same 9 tokens alone and padded to 48: the padded
    positions (masked by ``attention_mask``) must not enter the calibration statistics nor the
    comparison of a lossy model's per-token outputs."""
    tokens = np.array([[101, 7592, 2088, 2003, 1037, 3899, 2005, 6251, 102]], np.int64)
    alone = {"input_ids": tokens, "attention_mask": np.ones_like(tokens)}
    padded = {"input_ids": np.pad(tokens, ((0, 0), (0, 39))),
              "attention_mask": np.pad(np.ones_like(tokens), ((0, 0), (0, 39)))}
    loaded = lrdeploy.load(minilm_l3)
    analysis = analyze_model(loaded.canonical, probe_feed=padded)
    statistics = [site_statistics(loaded.canonical, analysis.sites, [feed], shrink=False)
                  for feed in (alone, padded)]
    assert len(statistics[0].grams) >= 18  # 6 matrix sites in each of the 3 layers
    for site, gram in statistics[0].grams.items():
        assert np.allclose(statistics[1].grams[site], gram, rtol=1e-3,
                           atol=1e-4 * np.abs(gram).max()), site
        assert np.allclose(statistics[1].means[site], statistics[0].means[site], rtol=1e-3,
                           atol=1e-4 * np.abs(statistics[0].means[site]).max()), site
    # Two samples of 9 and 20 tokens count alike: each one's rows weighted by 14.5 / its rows.
    longer = {name: np.tile(value, (1, 3))[:, :20] for name, value in alone.items()}
    both = site_statistics(loaded.canonical, analysis.sites, [alone, longer], shrink=False)
    single = site_statistics(loaded.canonical, analysis.sites, [longer], shrink=False)
    for site, gram in both.grams.items():
        expected = 14.5 / 9 * statistics[0].grams[site] + 14.5 / 20 * single.grams[site]
        assert np.allclose(gram, expected, rtol=1e-6), site
    lossy = apply_plan(loaded.canonical, Plan([PlanEntry(s.name, "svd", [32])
                                               for s in analysis.sites]), analysis.sites)
    errors = {name: [f.relative_l2_error for f in lrdeploy.verify.compare(
        loaded.canonical, lossy, [feed])] for name, feed in (("alone", alone),
                                                               ("padded", padded))}
    assert max(errors["alone"]) > 0.05  # rank 32 of 384 is lossy
    assert np.allclose(errors["padded"], errors["alone"], rtol=1e-3), errors
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{name: np.stack([padded[name]] * 2) for name in padded})
    report = lrdeploy.compress(minilm_l3, rank="rank:32", calib=calib).report
    assert "attention_mask marks as padding left out" in report["verification"]["feed_source"]
    random_feed = runtime.random_inputs(loaded.canonical, analysis.specs)
    assert random_feed["attention_mask"].all() and random_feed["input_ids"].std() > 0


def test_site_errors_of_different_measures_are_never_compared(tmp_path):
    """A Tucker-2 weight error (two modes' tails summed, above 1 at low ranks) and a spatial
    SVD error do not measure the same thing: no candidate may be dropped, before its model
    error is known, for a candidate of another measure."""
    _conv(tmp_path / "conv.onnx", (3, 3), {"pads": [1, 1, 1, 1]}, channels=32)
    analysis = analyze_model(lrdeploy.load(tmp_path / "conv.onnx").canonical)
    host = get_device("host")
    feeds = [runtime.random_inputs(analysis.model, analysis.specs, seed) for seed in range(2)]
    planner = Planner(analysis, host, RooflineLatency(host), feeds)
    (options,) = planner.options
    planner._measure_model_errors("params")
    dense, *menu = options.menu
    assert {c.measure for c in menu} == {"tucker2", "spatial"}
    for candidate in menu:
        rivals = [c for c in menu if c.measure == candidate.measure and c is not candidate]
        if candidate.params < dense.params and not any(
                c.params <= candidate.params and c.site_error < candidate.site_error
                for c in rivals):
            assert candidate.model_error > 0, candidate  # it was on its measure's curve
    # Candidates that a cheaper one of the other measure beats in site error still get
    # their model error (comparing across measures dropped them).
    assert any(c.model_error > 0 and any(
        o.measure != c.measure and o.params <= c.params and o.site_error < c.site_error
        for o in menu) for c in menu)
    kept = options.candidates[1:]
    assert not any(a.params <= b.params and a.model_error < b.model_error
                   for a in kept for b in kept if a is not b)
