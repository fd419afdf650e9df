"""Microcontrollers: the arena planner, and the C project of a real CNN built with the host
compiler and for a Cortex-M4 run on qemu-system-arm, both checked against onnxruntime."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from onnx import helper

from conftest import EXAMPLES, make_model, run_cli, tensor_value
from lrdeploy.targets.arena import Buffer, plan_arena


def _no_conflicts(buffers: list[Buffer], offsets: dict[str, int]) -> bool:
    for a, b in itertools.combinations(buffers, 2):
        if a.overlaps(b) and offsets[a.name] < offsets[b.name] + b.size \
                and offsets[b.name] < offsets[a.name] + a.size:
            return False
    return True


def test_arena_reuses_dead_buffers_on_a_chain() -> None:
    # a -> b -> c -> d: at most two neighbours are alive at once, so the best arena is the
    # largest neighbouring pair, a + b = 150 bytes, against 260 without reuse.
    chain = [Buffer("a", 100, 0, 1), Buffer("b", 50, 1, 2), Buffer("c", 80, 2, 3),
             Buffer("d", 30, 3, 4)]
    plan = plan_arena(chain, alignment=1)
    assert plan.size == plan.lower_bound == 150
    assert plan.total == 260
    assert _no_conflicts(chain, plan.offsets)


def test_arena_is_optimal_on_a_branching_graph() -> None:
    # x feeds y and z (a fork), y and z feed w (a join); x dies once both branches have read it.
    # Step 1: x, y alive (64 + 32); step 2: x, y, z (64 + 32 + 48 = 144); step 3: y, z, w
    # (32 + 48 + 16 = 96). Best possible: 144, which needs x's bytes reused by w.
    graph = [Buffer("x", 64, 0, 2), Buffer("y", 32, 1, 3), Buffer("z", 48, 2, 3),
             Buffer("w", 16, 3, 4)]
    plan = plan_arena(graph, alignment=16)
    assert plan.lower_bound == 144
    assert plan.size == 144
    assert plan.offsets["w"] < 64  # inside x's dead bytes
    assert _no_conflicts(graph, plan.offsets)


def test_arena_never_exceeds_the_sum_and_never_overlaps_live_buffers() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        count = int(rng.integers(1, 12))
        buffers = []
        for index in range(count):
            first = int(rng.integers(0, 10))
            buffers.append(Buffer(f"b{index}", int(rng.integers(1, 5000)), first,
                                  first + int(rng.integers(0, 5))))
        plan = plan_arena(buffers, alignment=16)
        assert plan.lower_bound <= plan.size <= plan.total
        assert all(offset % 16 == 0 for offset in plan.offsets.values())
        aligned = [Buffer(b.name, -(-b.size // 16) * 16, b.first, b.last) for b in buffers]
        assert _no_conflicts(aligned, plan.offsets)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    """The example's CNN (72k params) and a wide variant (540k params: 2.1 MiB of weights, over
    the Cortex-M4's 1 MiB of flash), trained on scikit-learn's digits."""
    outdir = tmp_path_factory.mktemp("digits")
    for extra in ([], ["--hidden", "1024", "--epochs", "3"]):
        proc = subprocess.run([sys.executable, str(EXAMPLES / "digits_cnn.py"), "-o",
                               str(outdir), *extra], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert "held-out accuracy" in proc.stdout
    return {"dense": outdir / "digits_cnn.onnx", "wide": outdir / "digits_cnn_1024.onnx",
            "calib": outdir / "digits_calib.npz", "dir": outdir}


def _compile_and_verify(model, outdir, calib, *options, target: str = "cortex-m4") -> dict:
    proc = run_cli("compile", model, "--target", target, "-o", outdir, *options)
    assert proc.returncode == 0, proc.stderr
    assert "flash" in proc.stdout and "arena" in proc.stdout
    for where in ([], ["--emulate"]):
        check = run_cli("verify", outdir, "--calib", calib, *where)
        assert check.returncode == 0, check.stderr
        assert "verified" in check.stdout
    return json.loads((outdir / "manifest.json").read_text())


def test_digits_cnn_runs_on_host_c_and_on_an_emulated_cortex_m4(digits) -> None:
    dense = _compile_and_verify(digits["dense"], digits["dir"] / "m4", digits["calib"])
    lowrank = _compile_and_verify(digits["dense"], digits["dir"] / "m4_lr", digits["calib"],
                                  "--rank", "energy:0.9")
    project = digits["dir"] / "m4"
    assert not any("tvm/" in (project / name).read_text()
                   for name in ("model.c", "kernels.c", "model.h"))
    # A C project cannot be timed over RPC: refused before onnxruntime times anything.
    refused = run_cli("profile", project, "--runtime", "ort", "--runtime", "tvm")
    assert refused.returncode == 2 and "C projects are not timed" in refused.stderr
    assert "Latency" not in refused.stdout
    # A shell's CFLAGS are the host compiler's: the cross build must not take them.
    native = run_cli("verify", project, "--calib", digits["calib"], "--emulate",
                     env={"CFLAGS": "-O2 -march=native"})
    assert native.returncode == 0 and "verified" in native.stdout, native.stderr
    # An output that turned NaN fails, whatever the tolerance (NaN compares false with it).
    broken = digits["dir"] / "m4_nan"
    shutil.copytree(project, broken)
    source = (broken / "model.c").read_text()
    *_, last = re.finditer(r"static const float \w+_data\[\d+\][^=]*= \{\n\s*([^,]+),", source)
    source = source[:last.start(1)] + '__builtin_nanf("")' + source[last.end(1):]
    (broken / "model.c").write_text(source)
    failed = run_cli("verify", broken, "--calib", digits["calib"])
    assert failed.returncode != 0 and "verified" not in failed.stdout, failed.stdout
    for manifest in (dense, lowrank):
        figures = manifest["mcu"]
        assert figures["weight_bytes"] == manifest["param_bytes"]
        assert figures["flash_bytes"] == figures["weight_bytes"] + figures["code_bytes"]
        assert figures["flash_bytes"] <= figures["flash_limit_bytes"]
        assert figures["arena_bytes"] == figures["arena_lower_bound"]  # optimal here
        assert figures["arena_bytes"] < figures["arena_without_reuse"]
    # The dense weights go to flash as they are in the ONNX; the low-rank ones are fewer.
    assert dense["mcu"]["weight_bytes"] == dense["onnx_param_bytes"]
    assert lowrank["mcu"]["weight_bytes"] < dense["mcu"]["weight_bytes"]
    assert lowrank["compression"]["sites_factorized"] >= 1


def test_the_cortex_m7_row_builds_and_runs_on_its_own_emulated_board(digits) -> None:
    """Another core, FPU, board and flash size, from the device table's row alone."""
    outdir = digits["dir"] / "m7"
    manifest = _compile_and_verify(digits["dense"], outdir, digits["calib"], "--rank",
                                   "energy:0.9", target="cortex-m7")
    makefile = (outdir / "Makefile").read_text()
    assert "-mcpu=cortex-m7" in makefile and "-mfpu=fpv5-d16" in makefile
    assert "-M mps2-an500" in makefile  # the board verify --emulate started
    assert manifest["mcu"]["flash_limit_bytes"] == 2048 * 1024
    assert manifest["compression"]["sites_factorized"] >= 1
    # What the project's own Makefile built there does not stop compiling into it again.
    built = subprocess.run(["make", "-s", "-C", str(outdir), "lib"], capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert (outdir / "liblrd_model.a").is_file()
    again = run_cli("compile", digits["dense"], "--target", "cortex-m7", "-o", outdir)
    assert again.returncode == 0, again.stderr
    assert not (outdir / "liblrd_model.a").exists()  # the new project is not built yet


def test_a_model_too_big_for_the_flash_is_refused_then_fits_with_a_parameter_budget(
        digits) -> None:
    outdir = digits["dir"] / "m4_wide"
    proc = run_cli("compile", digits["wide"], "--target", "cortex-m4", "-o", outdir)
    assert proc.returncode == 2
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "does not fit 'cortex-m4': flash" in message and "exceeds 1024 KiB by" in message
    overshoot = float(message.split("exceeds 1024 KiB by ")[1].split(" KiB")[0])
    assert overshoot > 1000  # 2.1 MiB of weights
    assert not outdir.exists()
    suggested = message.rsplit("--budget-params ", 1)[1].split()[0]
    manifest = _compile_and_verify(digits["wide"], outdir, digits["calib"],
                                   "--budget-params", suggested, "--calib", digits["calib"])
    assert manifest["mcu"]["flash_bytes"] <= 1024 * 1024
    assert manifest["compression"]["model_params_after"] <= int(suggested)


def test_models_the_c_deployment_cannot_take_fail_in_one_line(tmp_path) -> None:
    two_inputs = make_model([helper.make_node("Add", ["a", "b"], ["y"])],
                            [tensor_value("a", [1, 4]), tensor_value("b", [1, 4])], ["y"], [])
    path = tmp_path / "two_inputs.onnx"
    path.write_bytes(two_inputs.SerializeToString())
    proc = run_cli("compile", path, "--target", "cortex-m4", "-o", tmp_path / "out")
    assert proc.returncode == 2
    # Refused before TVM is imported: its log lines would come first.
    assert proc.stderr.startswith("lrdeploy: error: two_inputs.onnx: microcontroller "
                                  "deployment takes a model with one input"), proc.stderr
    assert not (tmp_path / "out").exists()
    two_outputs = make_model([helper.make_node("Relu", ["a"], ["y"]),
                              helper.make_node("Neg", ["a"], ["z"])],
                             [tensor_value("a", [1, 4])], ["y", "z"], [])
    path = tmp_path / "two_outputs.onnx"
    path.write_bytes(two_outputs.SerializeToString())
    proc = run_cli("compile", path, "--target", "cortex-m4", "-o", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.startswith("lrdeploy: error: two_outputs.onnx: microcontroller "
                                  "deployment takes a model with one output; this one has 2"), \
        proc.stderr
