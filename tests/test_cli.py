"""The command line as a user meets it: one-line errors, non-zero exits, nothing written."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import onnx
import pytest
from onnx import helper

import lrdeploy
from conftest import make_model, run_cli, tensor_value, weight


@pytest.fixture
def small_model(tmp_path):
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [tensor_value("x", ["batch", 96])], ["y"], [weight("w", (96, 80), 0)])
    path = tmp_path / "small.onnx"
    onnx.save_model(model, path)
    return path


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lrdeploy: error:")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def _bad_inputs(tmp_path, small_model):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(small_model.read_bytes()[: small_model.stat().st_size // 2])
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 50)
    outside = tmp_path / "inner"
    outside.mkdir()
    onnx.save_model(onnx.load(small_model), str(tmp_path / "shared.onnx"),
                    save_as_external_data=True, location="weights.bin", size_threshold=0)
    escaping = onnx.load(tmp_path / "shared.onnx", load_external_data=False)
    for entry in escaping.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../weights.bin"
    onnx.save_model(escaping, outside / "escape.onnx")
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, x=np.ones((4, 1, 95), np.float32))  # the model takes [batch, 96]
    (tmp_path / "inputs.npz").write_text("x = 1, 2, 3\n")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.ones((4, 1, 96), np.float32))
    np.savez(tmp_path / "nan.npz", x=np.full((4, 1, 96), np.nan, np.float32))
    np.savez(tmp_path / "empty.npz", x=np.ones((0, 1, 96), np.float32))
    plan = tmp_path / "plan.json"
    entry = {"site": "mm", "method": "svd", "ranks": [8]}
    plan.write_text(json.dumps({"format": "lrdeploy-plan/1", "entries": [entry]}))
    (tmp_path / "twice.json").write_text(json.dumps({"format": "lrdeploy-plan/1",
                                                      "entries": [entry, entry]}))
    for name, edited in (("fractional", {**entry, "ranks": [3.5]}),
                         ("misspelt", {**entry, "bias_corection": True})):
        (tmp_path / f"{name}.json").write_text(json.dumps({"format": "lrdeploy-plan/1",
                                                            "entries": [edited]}))
    (tmp_path / "net.py").write_text("import torch\n\n\ndef make():\n"
                                     "    return torch.nn.Linear(96, 80)\n")
    (tmp_path / "tt.json").write_text(json.dumps({"format": "lrdeploy-plan/1", "entries": [
        {"site": "mm", "method": "tt", "ranks": [4]}]}))
    with zipfile.ZipFile(tmp_path / "checkpoint.onnx", "w") as archive:  # as torch.save writes
        archive.writestr("archive/data.pkl", b"weights")
    return {
        "missing file": ([tmp_path / "nope.onnx"], ["nope.onnx", "no such file"]),
        "truncated": ([truncated], ["truncated.onnx"]),
        "not onnx": ([text], ["notes.onnx"]),
        "external outside": ([outside / "escape.onnx"],
                             ["escape.onnx", "outside the model folder"]),
        "malformed rank": ([small_model, "--rank", "energy:1.5"], ["--rank", "energy:1.5"]),
        "unknown rank rule": ([small_model, "--rank", "quantile:3"], ["--rank", "quantile:3"]),
        "output is input": ([small_model, "-o", small_model], ["is the input"]),
        "plan is input": ([small_model, "--save-plan", small_model], ["is the input"]),
        "plan is the calibration": ([small_model, "--rank", "rank:8", "--calib", calib,
                                     "--save-plan", calib], ["calib.npz", "is the input"]),
        "plan is the report": ([small_model, "--save-plan", tmp_path / "out" / "report.json"],
                               ["report.json", "given for two outputs"]),
        "calibration with NaN": ([small_model, "--calib", tmp_path / "nan.npz"],
                                 ["nan.npz", "NaN or infinite"]),
        "calibration without samples": ([small_model, "--calib", tmp_path / "empty.npz"],
                                        ["empty.npz", "no samples"]),
        "plan and rank": ([small_model, "--plan", plan, "--rank", "rank:4"],
                          ["--plan fixes", "drop --rank"]),
        "budget and only": ([small_model, "--budget-params", "50%", "--only", "m*"],
                            ["--budget-params choose", "drop --only"]),
        "plan naming a site twice": ([small_model, "--plan", tmp_path / "twice.json"],
                                     ["twice.json", "mm appear more than once"]),
        "calibration of another shape": ([small_model, "--rank", "rank:8", "--calib", narrow],
                                         ["narrow.npz", "samples of shape [1, 95]",
                                          "the model's input is [?,96]"]),
        "calibration not an npz": ([small_model, "--rank", "rank:8", "--calib",
                                    tmp_path / "inputs.npz"],
                                   ["inputs.npz", "not an .npz archive"]),
        "plan in a missing folder": ([small_model, "--rank", "rank:8", "--save-plan",
                                      tmp_path / "nowhere" / "plan.json"],
                                     ["nowhere", "does not exist"]),
        "min fidelity not a cosine": ([small_model, "--min-fidelity", "1.5"],
                                      ["--min-fidelity 1.5", "between -1 and 1"]),
        "plan is the external data": ([tmp_path / "shared.onnx", "--rank", "rank:8",
                                       "--save-plan", tmp_path / "weights.bin"],
                                      ["weights.bin", "is the input"]),
        "plan is the factory": ([f"{tmp_path / 'net.py'}:make", "--input-shape", "1,96",
                                 "--rank", "rank:8", "--save-plan", tmp_path / "net.py"],
                                ["net.py", "is the input"]),
        "planner option without a budget": ([small_model, "--rank", "rank:8", "--engine",
                                             "roofline"], ["--engine", "only the planner"]),
        "plan and budget": ([small_model, "--plan", plan, "--budget-params", "50%"],
                            ["--plan fixes", "give one of them"]),
        "budget and tucker sweeps": ([small_model, "--budget-params", "50%",
                                      "--tucker-sweeps", "2"], ["drop --tucker-sweeps"]),
        "calibration against --input-shape": ([small_model, "--rank", "rank:8", "--calib",
                                               calib, "--input-shape", "2,96"],
                                              ["calib.npz", "[1, 96]",
                                               "--input-shape gives [2, 96]"]),
        "plan with a fractional rank": ([small_model, "--plan", tmp_path / "fractional.json"],
                                        ["fractional.json", "whole numbers", "[3.5]"]),
        "plan with a misspelt field": ([small_model, "--plan", tmp_path / "misspelt.json"],
                                       ["misspelt.json", "unknown field(s) bias_corection"]),
        "infinite budget": ([small_model, "--budget-params", "inf"],
                            ["--budget-params inf", "positive number"]),
        "factory input misnamed": ([f"{tmp_path / 'net.py'}:make", "--input-shape", "inptu=1,96",
                                    "--rank", "rank:8"],
                                   ["--input-shape names inptu", "forward() takes input"]),
        "a pytorch checkpoint": ([tmp_path / "checkpoint.onnx"],
                                 ["checkpoint.onnx", "a zip archive", "FILE.py:FACTORY"]),
        "samples with calibration": ([small_model, "--rank", "rank:8", "--calib", calib,
                                      "--samples", "5"], ["--samples counts random feeds"]),
        "tt entry without its layout": ([small_model, "--plan", tmp_path / "tt.json"],
                                        ["tt.json", "needs a \"tt\" layout"]),
    }


CASES = ["missing file", "truncated", "not onnx", "external outside", "malformed rank",
         "unknown rank rule", "output is input", "plan is input", "plan is the calibration",
         "plan is the report", "calibration of another shape", "calibration not an npz",
         "calibration with NaN", "calibration without samples", "plan in a missing folder",
         "min fidelity not a cosine", "plan and rank", "budget and only",
         "plan naming a site twice", "plan is the external data", "plan is the factory",
         "planner option without a budget", "plan and budget", "budget and tucker sweeps",
         "calibration against --input-shape", "plan with a fractional rank",
         "plan with a misspelt field", "infinite budget", "factory input misnamed",
         "a pytorch checkpoint", "samples with calibration", "tt entry without its layout"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_error_and_writes_nothing(tmp_path, small_model, case):
    args, fragments = _bad_inputs(tmp_path, small_model)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if "-o" not in args:
        args = [*args, "-o", out_dir / "result.onnx"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    proc = run_cli("compress", *args, "--report", out_dir / "report.json")
    _assert_one_line_error(proc, *fragments)
    assert list(out_dir.iterdir()) == []
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert after == before  # nothing created, nothing touched (the input included)


def test_min_fidelity_failure_writes_nothing_and_names_the_figure(tmp_path, small_model):
    out = tmp_path / "lr.onnx"
    proc = run_cli("compress", small_model, "-o", out, "--rank", "rank:2",
                   "--min-fidelity", "0.999", "--report", tmp_path / "r.json")
    _assert_one_line_error(proc, "below --min-fidelity 0.999")
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_a_site_pattern_that_matches_nothing_is_warned_about(tmp_path, small_model):
    """A typo in --only leaves every site dense: the user is told, not just shown a table of
    dense sites."""
    proc = run_cli("compress", small_model, "-o", tmp_path / "lr.onnx", "--only", "m*",
                   "--only", "attention*", "--skip", "nothing")
    assert proc.returncode == 0, proc.stderr
    assert "--only 'attention*' matches no site" in proc.stderr
    assert "--skip 'nothing' matches no site" in proc.stderr
    assert "'m*' matches" not in proc.stderr  # the model's one site is 'mm'


def test_site_patterns_match_the_names_the_tables_print(tmp_path):
    """Tables drop the names' common prefix ("fc/Gemm" for "/fc/Gemm"), and a Conv with a
    BatchNormalization folded into it keeps its name: patterns written from either work."""
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], name="/block/conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "mu", "var"], ["n"],
                              name="/block/bn"),
             helper.make_node("Flatten", ["n"], ["f"], name="/flatten"),
             helper.make_node("Gemm", ["f", "wf"], ["y"], name="/fc/Gemm")]
    weights = [weight("wc", (16, 8, 3, 3), 1), weight("s", (16,), 2), weight("b", (16,), 3),
               weight("mu", (16,), 4), onnx.numpy_helper.from_array(
                   np.full(16, 0.5, np.float32), "var"), weight("wf", (16 * 36, 32), 5)]
    path = tmp_path / "net.onnx"
    onnx.save_model(make_model(nodes, [tensor_value("x", [1, 8, 8, 8])], ["y"], weights), path)
    report = tmp_path / "r.json"
    proc = run_cli("compress", path, "-o", tmp_path / "lr.onnx", "--rank", "ratio:0.5",
                   "--only", "fc*", "--only", "block/conv", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "matches no site" not in proc.stderr
    sites = {s["site"]: s["method"] for s in json.loads(report.read_text())["sites"]}
    assert sites == {"/block/conv": "tucker2", "/fc/Gemm": "svd"}


def test_compress_writes_model_report_and_plan_that_reapplies(tmp_path, small_model):
    out, report, plan = tmp_path / "lr.onnx", tmp_path / "r.json", tmp_path / "plan.json"
    proc = run_cli("compress", small_model, "-o", out, "--rank", "rank:8", "--report", report,
                   "--save-plan", plan, "--input-shape", "x=3,96")
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(onnx.load(out), full_check=True)
    data = json.loads(report.read_text())
    (site,) = data["sites"]
    assert site["method"] == "svd" and site["ranks"] == [8]
    assert data["inputs"][0]["shape"] == [3, 96]
    assert site["flops_before"] == 2 * 3 * 96 * 80
    assert data["totals"]["model_params_after"] == 8 * (96 + 80)
    assert data["verification"]["onnx_checker"].startswith("passed")
    # edit the plan by hand, re-apply it
    saved = json.loads(plan.read_text())
    saved["entries"][0]["ranks"] = [5]
    plan.write_text(json.dumps(saved))
    again = tmp_path / "again.onnx"
    proc = run_cli("compress", small_model, "-o", again, "--plan", plan)
    assert proc.returncode == 0, proc.stderr
    shapes = sorted(tuple(t.dims) for t in onnx.load(again).graph.initializer)
    assert shapes == [(5, 80), (96, 5)]


@pytest.mark.parametrize("entry, fragments", [
    ({"site": "mm", "method": "svd", "ranks": [500]}, ["ranks [500]", "'mm'"]),
    ({"site": "attention", "method": "svd", "ranks": [8]}, ["names site(s) attention"]),
    ({"site": "attention", "method": "dense"}, ["names site(s) attention"]),
    ({"site": "mm", "method": "tucker2", "ranks": [8, 8]}, ["method 'tucker2'", "'mm'"]),
])
def test_a_plan_that_does_not_fit_the_model_is_refused_naming_its_file(tmp_path, small_model,
                                                                      entry, fragments):
    plan = tmp_path / "edited.json"
    plan.write_text(json.dumps({"format": "lrdeploy-plan/1", "entries": [entry]}))
    proc = run_cli("compress", small_model, "-o", tmp_path / "o.onnx", "--plan", plan)
    _assert_one_line_error(proc, f"{plan}:", *fragments)
    assert not (tmp_path / "o.onnx").exists()


TORCH_MODELS = """\
import torch


class Branching(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 32)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.export cannot trace it
            return self.linear(x)
        return -self.linear(x)


def linear():
    return torch.nn.Linear(64, 32)


def branching():
    return Branching()


def raising():
    return torch.nn.Linear(64)
"""


@pytest.mark.parametrize("factory, shape, fragments", [
    ("linear", "1,65", ["models.py:linear fails on inputs of shape [1, 65]", "RuntimeError",
                        "(1x65 and 64x32)"]),
    ("raising", "1,64", ["models.py:raising: the factory raised: TypeError at models.py line 24",
                         "out_features"]),
    ("branching", "1,64", ["models.py:branching: torch.onnx.export failed",
                           "data-dependent"]),
])
def test_a_torch_model_that_cannot_be_traced_is_one_line_naming_the_file(tmp_path, factory,
                                                                        shape, fragments):
    (tmp_path / "models.py").write_text(TORCH_MODELS)
    proc = run_cli("compress", f"{tmp_path / 'models.py'}:{factory}", "-o", tmp_path / "o.onnx",
                   "--rank", "rank:8", "--input-shape", shape)
    _assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "o.onnx").exists()


def test_planning_a_model_without_sites_is_one_line_naming_it(tmp_path):
    path = tmp_path / "relu.onnx"
    onnx.save_model(make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                               [tensor_value("x", [1, 8])], ["y"], []), path)
    proc = run_cli("plan", path, "--budget-ms", "50%", "-o", tmp_path / "plan.json")
    _assert_one_line_error(proc, f"{path}: no factorizable sites")
    assert not (tmp_path / "plan.json").exists()


def test_a_plan_report_in_a_missing_folder_is_refused_before_planning(tmp_path, small_model):
    proc = run_cli("plan", small_model, "--budget-ms", "50%", "-o", tmp_path / "plan.json",
                   "--report", tmp_path / "nowhere" / "report.json")
    _assert_one_line_error(proc, "nowhere", "does not exist")
    assert [p.name for p in tmp_path.iterdir()] == [small_model.name]


def test_help_explains_the_rank_rules():
    proc = run_cli("compress", "--help")
    assert proc.returncode == 0
    for rule in ("rank:R", "ratio:F", "energy:E", "erank", "vbmf"):
        assert rule in proc.stdout


@pytest.mark.parametrize("command, fragments", [
    (["analyze", "{model}", "--json", "{model}"], ["is the input"]),
    (["plan", "{model}", "--budget-params", "50%", "--plot", "{model}"], ["is the input"]),
    (["plan", "{model}", "--budget-params", "50%", "-o", "{tmp}/p.json", "--report",
      "{tmp}/p.json"], ["given for two outputs"]),
    (["plan", "{model}", "--budget-ms", "50%", "--engine", "onnxruntime",
      "--sample-schedules"], ["--sample-schedules", "needs --engine tvm"]),
    (["plan", "{model}", "--budget-params", "50%", "--plot", "{tmp}/f.txt"],
     ["f.txt", "png, svg, pdf"]),
    (["analyze", "{tmp}/net.py"], ["net.py", "net.py:FACTORY"]),
    (["targets", "--device-file", "{tmp}/board.json"], ["board.json", "peak_gflops=0",
                                                         "above 0"]),
    (["targets", "--device-file", "{tmp}/lanes.json"], ["lanes.json", "simd_lanes=8.0",
                                                        "whole number"]),
    (["compile", "{model}", "-o", "{tmp}/art", "--engine", "roofline"],
     ["--engine", "only the planner"]),
    (["compile", "{model}", "-o", "{tmp}/art", "--samples", "8"],
     ["--samples", "compile compresses the model only with"]),
])
def test_other_commands_refuse_what_would_lose_or_ignore_something(tmp_path, small_model,
                                                                   command, fragments):
    board = {"description": "a board", "family": "arm_cpu", "tvm_target": {"kind": "llvm"},
             "triple": "aarch64-linux-gnu", "cores": 4, "peak_gflops": 0, "bandwidth_gbs": 4,
             "l2_kib": 512}
    (tmp_path / "board.json").write_text(json.dumps({"board": board}))
    (tmp_path / "lanes.json").write_text(json.dumps({"board": {**board, "peak_gflops": 10,
                                                               "simd_lanes": 8.0}}))
    (tmp_path / "net.py").write_text("import torch\n")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    proc = run_cli(*[part.format(model=small_model, tmp=tmp_path) for part in command])
    _assert_one_line_error(proc, *fragments)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


@pytest.mark.parametrize("command, option", [
    (["compress", "{model}", "-o", "{tmp}/o.onnx", "--seed", "-1"], "--seed"),
    (["plan", "{model}", "--budget-params", "50%", "--samples", "0"], "--samples"),
    (["compress", "{model}", "-o", "{tmp}/o.onnx", "--tucker-sweeps", "-1"], "--tucker-sweeps"),
])
def test_out_of_range_counts_and_seeds_are_usage_errors(tmp_path, small_model, command, option):
    proc = run_cli(*[part.format(model=small_model, tmp=tmp_path) for part in command])
    assert proc.returncode == 2
    assert f"argument {option}" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_a_data_aware_plan_applied_without_calibration_is_reported_as_applied(tmp_path,
                                                                             small_model):
    """The model gets plain factors then; the report and the re-saved plan must say so."""
    plan = tmp_path / "aware.json"
    plan.write_text(json.dumps({"format": "lrdeploy-plan/1", "bias_correction": True,
                                "entries": [{"site": "mm", "method": "wsvd", "ranks": [8]}]}))
    report, saved = tmp_path / "r.json", tmp_path / "saved.json"
    proc = run_cli("compress", small_model, "-o", tmp_path / "o.onnx", "--plan", plan,
                   "--report", report, "--save-plan", saved)
    assert proc.returncode == 0, proc.stderr
    assert "get plain factors" in proc.stderr and "biases are left" in proc.stderr
    applied = json.loads(report.read_text())
    assert applied["sites"][0]["method"] == "svd" and applied["bias_correction"] is False
    resaved = json.loads(saved.read_text())
    assert resaved["entries"][0]["method"] == "svd" and resaved["bias_correction"] is False


def test_the_api_refuses_what_the_command_line_refuses(tmp_path, small_model):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "lrdeploy-plan/1",
                                "entries": [{"site": "mm", "method": "svd", "ranks": [8]}]}))
    half = lrdeploy.Budget("params", 0.5, relative=True)
    for kwargs, message in (
            ({"plan": plan, "budget": half}, "give one of them"),
            ({"plan": plan, "rank": "rank:4"}, "drop --rank"),
            ({"budget": half, "only": ["mm"]}, "drop --only"),
            ({"samples": 0}, "samples 0"),
            ({"seed": -1}, "seed -1")):
        with pytest.raises(lrdeploy.LrdeployError, match=message):
            lrdeploy.compress(small_model, tmp_path / "o.onnx", **kwargs)
    with pytest.raises(lrdeploy.LrdeployError, match="positive number"):
        lrdeploy.Budget("params", float("inf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "small.onnx"]


def test_outputs_the_original_holds_not_finite_are_compared_where_finite(tmp_path):
    """Where the original's output is not finite (here NaN, a log of the negative values of an
    input, as -inf where a mask is 0), the same value in the compressed model is agreement, not
    a lost output, and the finite values are compared as usual."""
    path = tmp_path / "log.onnx"
    onnx.save_model(make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                                helper.make_node("Log", ["m"], ["l"]),
                                helper.make_node("Add", ["h", "l"], ["y"])],
                               [tensor_value("x", [4, 96]), tensor_value("m", [4, 80])], ["y"],
                               [weight("w", (96, 80), 0)]), path)
    exact = lrdeploy.compress(path, tmp_path / "exact.onnx", rank="full", guard=False)
    assert exact.fidelity[0].relative_l2_error < 1e-5 and exact.min_cosine > 0.9999
    lossy = lrdeploy.compress(path, tmp_path / "lossy.onnx", rank="rank:8")
    assert 1e-3 < lossy.fidelity[0].relative_l2_error < np.inf
