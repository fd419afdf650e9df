"""End to end on real models shipped by PyPI packages (installed by scripts/setup.sh)."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lrdeploy
from conftest import EXAMPLES, REPO, package_file, run_cli

pytestmark = pytest.mark.slow
MOBILENET = f"{EXAMPLES / 'mobilenet_v2.py'}:mobilenet_v2"


def _assert_exact(result) -> None:
    for f in result.fidelity:
        assert f.relative_l2_error <= 1e-4, f
    print({f.name: (f.relative_l2_error, f.noise_floor) for f in result.fidelity})


def _print_totals(label: str, report: dict) -> None:
    totals = report["totals"]
    print(f"{label}: {totals['sites_factorized']}/{totals['sites']} sites factorized, "
          f"{totals['sites_skipped']} skipped, params {totals['model_params_before']:,} -> "
          f"{totals['model_params_after']:,}, site FLOPs {totals['site_flops_before']} -> "
          f"{totals['site_flops_after']}, min cosine {report['verification']['min_cosine']:.6f}")


def test_minilm_full_rank_is_exact(minilm_l3):
    result = lrdeploy.compress(minilm_l3, rank="full", guard=False)
    assert [e.method for e in result.plan.entries] == ["svd"] * 18
    _assert_exact(result)


def test_minilm_energy_rule_writes_a_smaller_valid_model(minilm_l3, tmp_path):
    out, report = tmp_path / "minilm_lr.onnx", tmp_path / "report.json"
    proc = run_cli("compress", minilm_l3, "-o", out, "--rank", "energy:0.9", "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    _print_totals("MiniLM-L3 energy:0.9", data)
    assert data["totals"]["model_params_after"] < data["totals"]["model_params_before"]
    assert data["totals"]["sites_factorized"] > 0
    onnx.checker.check_model(str(out), full_check=True)
    session = ort.InferenceSession(out)
    feeds = {"input_ids": np.array([[101, 7592, 2088, 102]]), "attention_mask": np.ones((1, 4),
                                                                                       np.int64)}
    assert all(np.isfinite(o).all() for o in session.run(None, feeds))


def test_analyze_minilm_prints_the_table_with_closed_form_break_even(minilm_l3, tmp_path):
    table = tmp_path / "analysis.json"
    proc = run_cli("analyze", minilm_l3, "--json", table)
    assert proc.returncode == 0, proc.stderr
    assert "Factorizable sites (18)" in proc.stdout and "break-even" in proc.stdout
    rows = json.loads(table.read_text())["sites"]
    assert len(rows) == 18
    for row in rows:
        m, n = row["weight_shape"]
        assert row["break_even_ranks"] == [(m * n - 1) // (m + n)]
        assert row["energy_90"][0] <= row["energy_95"][0] <= row["energy_99"][0] <= min(m, n)
        assert 1 <= row["effective_rank"][0] <= min(m, n)


def _photo(size: int) -> np.ndarray:
    """A real photograph (foolbox's first ImageNet sample) scaled to [-1, 1], NCHW."""
    from PIL import Image

    path = package_file("foolbox", r"imagenet_00_\d+\.jpg$")
    pixels = np.asarray(Image.open(path).convert("RGB").resize((size, size)), np.float32)
    return ((pixels / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]


def test_ocr_detector_tucker2_and_skipped_sites(ocr_det, tmp_path):
    # A text detector's output on noise is ~1e-4 everywhere, where float32 alone (onnxruntime
    # with and without its graph rewrites) differs by 4e-4 relative: check on a real photo.
    calib = tmp_path / "photo.npz"
    np.savez(calib, x=_photo(160))
    exact = lrdeploy.compress(ocr_det, rank="full", guard=False, calib=calib)
    _assert_exact(exact)
    out = tmp_path / "ocr_lr.onnx"
    result = lrdeploy.compress(ocr_det, out, rank="ratio:0.5",
                               input_shapes={"x": (1, 3, 160, 160)})
    _print_totals("PP-OCRv6 det ratio:0.5", result.report)
    methods = {e.method for e in result.plan.entries}
    assert "tucker2" in methods
    reasons = {(s.op, s.reason.split(" (")[0]) for s in result.analysis.skipped}
    assert ("ConvTranspose", "ConvTranspose is not factorized") in reasons
    assert ("Conv", "depthwise convolution") in reasons
    onnx.checker.check_model(str(out), full_check=True)
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "ConvTranspose" in ops and "Einsum" not in ops
    x = np.random.default_rng(0).standard_normal((1, 3, 160, 160)).astype(np.float32)
    (y,) = ort.InferenceSession(out).run(None, {"x": x})
    assert y.shape[-2:] == (160, 160) and np.isfinite(y).all()


def test_mobilenet_v2_traced_from_torch_is_exact_at_full_rank():
    result = lrdeploy.compress(MOBILENET, rank="full", guard=False,
                               input_shapes={"x": (1, 3, 224, 224)})
    methods = [e.method for e in result.plan.entries]
    assert methods.count("tucker2") == 1 and methods.count("svd") >= 35
    _assert_exact(result)


def test_mobilenet_v2_ratio_half_prints_top1_agreement():
    import subprocess

    proc = subprocess.run([sys.executable, EXAMPLES / "mobilenet_v2.py", "--rank", "ratio:0.5"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    assert "top-1 agreement low-rank vs dense:" in proc.stdout
    assert "dense 0.90" in proc.stdout  # the real ImageNet weights and images are in use


def test_silero_vad_subgraph_weights_are_skipped_with_reason(silero_vad, tmp_path):
    calib = tmp_path / "vad.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, input=0.1 * rng.standard_normal((2, 1, 512)).astype(np.float32),
             state=np.zeros((2, 2, 1, 128), np.float32), sr=np.full(2, 16000, np.int64))
    out, report = tmp_path / "vad.onnx", tmp_path / "vad.json"
    proc = run_cli("compress", silero_vad, "-o", out, "--calib", calib, "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["sites"] == []
    assert len(data["skipped"]) >= 10
    assert all(s["reason"].startswith("inside a subgraph of If node") for s in data["skipped"])
    onnx.checker.check_model(str(out), full_check=True)
    assert data["verification"]["min_cosine"] == 1.0
