"""compile / verify / bundle: real TVM builds, aarch64 artifacts run under qemu with the runner."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

import lrdeploy
from conftest import EXAMPLES, decaying_mlp, package_file, run_cli
from lrdeploy.deploy import bundle_artifact, compile_model, read_manifest, verify_artifact
from lrdeploy.errors import LrdeployError

pytestmark = pytest.mark.slow
MOBILENET = f"{EXAMPLES / 'mobilenet_v2.py'}:mobilenet_v2"
ELF_MACHINE_AARCH64 = 183


def elf_machine(path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    return int.from_bytes(header[18:20], "little")


def photo_npz(path, size: int):
    from PIL import Image

    image = package_file("foolbox", r"imagenet_00_\d+\.jpg$")
    pixels = np.asarray(Image.open(image).convert("RGB").resize((size, size)), np.float32)
    np.savez(path, x=((pixels / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None])
    return path


@pytest.fixture(scope="module")
def minilm_rpi4(tmp_path_factory, minilm_l3):
    work = tmp_path_factory.mktemp("minilm")
    compressed = work / "minilm_lr.onnx"
    lrdeploy.compress(minilm_l3, compressed, rank="rank:64")
    outdir = work / "rpi4"
    manifest = compile_model(compressed, "rpi4", outdir)
    return outdir, manifest, compressed


def test_minilm_rpi4_artifact_is_aarch64_and_matches_onnxruntime_under_qemu(minilm_rpi4):
    outdir, manifest, _ = minilm_rpi4
    assert elf_machine(outdir / "model.so") == ELF_MACHINE_AARCH64
    assert manifest["device"]["name"] == "rpi4" and manifest["linked"]
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    result = verify_artifact(outdir, emulate=True)
    print({f.name: f.relative_l2_error for f in result.fidelity})
    assert result.emulated and result.max_relative_error <= 1e-4


def test_factorized_weights_survive_compilation(minilm_rpi4, minilm_l3):
    _, manifest, compressed = minilm_rpi4
    dense_bytes = sum(t.ByteSize() for t in onnx.load(minilm_l3).graph.initializer)
    factorized_bytes = manifest["onnx_param_bytes"]
    embedded = manifest["param_bytes"]
    print(f"artifact weights {embedded:,} B, factorized ONNX {factorized_bytes:,} B, "
          f"dense ONNX {dense_bytes:,} B")
    assert abs(embedded - factorized_bytes) <= 0.1 * factorized_bytes
    assert abs(embedded - dense_bytes) > 0.1 * dense_bytes  # not refolded into dense weights


def test_bundle_runs_on_its_own_under_qemu(minilm_rpi4, tmp_path):
    outdir, manifest, _ = minilm_rpi4
    bundle = bundle_artifact(outdir, tmp_path / "bundle")
    assert elf_machine(bundle / "lrdeploy_runner") == ELF_MACHINE_AARCH64
    readme = (bundle / "README.md").read_text()
    assert "lrdeploy_runner" in readme and "glibc 2." in readme
    inputs = []
    for spec in manifest["inputs"]:
        path = tmp_path / f"{spec['name']}.npy"
        np.save(path, np.ones(spec["shape"], dtype=spec["dtype"]))
        inputs += ["-i", str(path)]
    proc = subprocess.run(["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu",
                           "./lrdeploy_runner", "model.so", *inputs,
                           "-o", str(tmp_path / "outputs"), "--runs", "1", "--warmup", "0"],
                          cwd=bundle, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["outputs"] == len(manifest["outputs"])
    # The runner makes the outputs' folder (-o names one that does not exist yet).
    assert len(list((tmp_path / "outputs").glob("output_*.npy"))) == len(manifest["outputs"])
    # Nowhere inside the artifact: compile replaces only what it wrote there.
    proc = run_cli("bundle", outdir, outdir / "bundle")
    _assert_clean_failure(proc, "is inside the input folder")


def test_mobilenet_v2_compressed_compiles_for_rpi4_and_matches(tmp_path):
    outdir = tmp_path / "mobilenet_rpi4"
    manifest = compile_model(MOBILENET, "rpi4", outdir, input_shapes={"x": (1, 3, 224, 224)},
                             compress_options={"rank": "ratio:0.5"})
    assert manifest["compression"]["sites_factorized"] > 30
    assert elf_machine(outdir / "model.so") == ELF_MACHINE_AARCH64
    result = verify_artifact(outdir, emulate=True, samples=1)
    print({f.name: f.relative_l2_error for f in result.fidelity})
    assert result.max_relative_error <= 1e-4


def test_ocr_detector_compressed_compiles_for_rpi4_and_matches(tmp_path, ocr_det):
    outdir = tmp_path / "ocr_rpi4"
    # energy:0.99 keeps the detector's output alive; at ratio:0.5 its probabilities collapse to
    # ~1e-7 and any comparison measures float32 noise only (README: verify --tolerance).
    manifest = compile_model(ocr_det, "rpi4", outdir, input_shapes={"x": (1, 3, 160, 160)},
                             compress_options={"rank": "energy:0.99"})
    assert manifest["compression"]["sites_factorized"] > 0
    assert elf_machine(outdir / "model.so") == ELF_MACHINE_AARCH64
    result = verify_artifact(outdir, emulate=True, calib=photo_npz(tmp_path / "p.npz", 160))
    print({f.name: f.relative_l2_error for f in result.fidelity})
    assert result.max_relative_error <= 1e-4


def test_host_compile_and_verify_in_process(tmp_path, minilm_l3):
    outdir = tmp_path / "host"
    # attention_mask's sequence_length is input_ids': its size follows
    proc = run_cli("compile", minilm_l3, "--target", "host", "-o", outdir, "--rank",
                   "energy:0.9", "--input-shape", "input_ids=1,16")
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(outdir)
    assert [i["shape"] for i in manifest["inputs"]] == [[1, 16], [1, 16]]
    assert manifest["compression"]["model_params_after"] < manifest["compression"][
        "model_params_before"]
    assert (outdir / "compression.json").is_file() and (outdir / "plan.json").is_file()
    proc = run_cli("verify", outdir)
    assert proc.returncode == 0, proc.stderr
    assert "in-process" in proc.stdout
    # a folder missing a file its manifest names is refused in one line, either file
    for name in (manifest["artifact"], manifest["onnx"]):
        incomplete = tmp_path / f"without-{name}"
        shutil.copytree(outdir, incomplete)
        (incomplete / name).unlink()
        for command in (["verify", incomplete], ["profile", incomplete, "--runs", "1"]):
            _assert_clean_failure(run_cli(*command), f"{name} is missing")


def test_sampled_schedules_are_stored_and_the_artifact_still_matches(tmp_path):
    """--sample-schedules gives every kernel a MetaSchedule schedule without measuring (TVM's
    CPU pipeline schedules none); the artifact still matches onnxruntime."""
    model = decaying_mlp(tmp_path / "mlp.onnx", rows=32, width=64, hidden=128)
    outdir = tmp_path / "sampled"
    proc = run_cli("compile", model, "--target", "host", "--sample-schedules", "-o", outdir)
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(outdir)
    sampled = manifest["tuning"]["sampled_kernels"]
    assert manifest["tuning"]["database"] == "tuning"
    assert 2 <= sampled <= len(manifest["kernels"])
    records = (outdir / "tuning" / "database_tuning_record.json").read_text().splitlines()
    assert len(records) == sampled
    proc = run_cli("verify", outdir)
    assert proc.returncode == 0, proc.stderr
    refused = run_cli("compile", model, "--target", "cortex-m4", "--sample-schedules", "-o",
                      tmp_path / "m4")
    _assert_clean_failure(refused, "--sample-schedules is for CPU targets run by TVM's VM")


def test_tuning_stores_its_trials_and_the_tuned_artifact_still_matches(tmp_path):
    """--tune-trials measures MetaSchedule candidates here and keeps every trial in the
    artifact's database (TVM's own builder would time out importing tensor_intrin in each
    worker: targets/tuning.build_candidate); it is refused where the board is not here."""
    model = decaying_mlp(tmp_path / "mlp.onnx", rows=32, width=64, hidden=128)
    outdir = tmp_path / "tuned"
    proc = run_cli("compile", model, "--target", "host", "--tune-trials", "4", "-o", outdir)
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(outdir)
    assert manifest["tuning"] == {"trials": 4, "database": "tuning"}
    records = (outdir / "tuning" / "database_tuning_record.json").read_text().splitlines()
    assert len(records) == 4
    # each candidate was built and timed (a failed one would carry 1e10 s or none)
    assert all(0 < json.loads(r)[1][1][0] < 1 for r in records)
    proc = run_cli("verify", outdir)
    assert proc.returncode == 0, proc.stderr
    refused = run_cli("compile", model, "--target", "rpi4", "--tune-trials", "4", "-o",
                      tmp_path / "rpi4")
    _assert_clean_failure(refused, "tuning for 'rpi4': lrdeploy tunes on this machine only")


def test_compile_replaces_only_an_artifact_of_its_own_and_plans_on_tvm(tmp_path):
    """An output folder is replaced whole, so it must hold nothing but an earlier artifact;
    a budget on the host is planned on TVM's timings, as the artifact will run."""
    model = decaying_mlp(tmp_path / "mlp.onnx", rows=32, width=64, hidden=128)
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "a web app"}')
    (webapp / "index.html").write_text("<html></html>")
    _assert_clean_failure(run_cli("compile", model, "-o", webapp), "not an lrdeploy artifact")
    assert sorted(p.name for p in webapp.iterdir()) == ["index.html", "manifest.json"]
    _assert_clean_failure(run_cli("compile", model, "-o", tmp_path / "o", "--only", "*"),
                          "--only", "give one of those too")

    outdir = tmp_path / "planned"
    proc = run_cli("compile", model, "-o", outdir, "--budget-ms", "80%", "--no-latency-cache")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((outdir / "compression.json").read_text())
    assert "(tvm on host" in report["plan_source"]
    assert report["output"] == str(outdir / "model.onnx")
    assert re.search(r"compressed:\s+parameters\s+[\d,]+\s+->", proc.stdout)
    assert set(read_manifest(outdir)["files"]) == {p.name for p in outdir.iterdir()}

    _assert_clean_failure(run_cli("verify", outdir, "--emulate"), "drop --emulate")
    _assert_clean_failure(run_cli("profile", outdir, "--html", outdir / "manifest.json"),
                          "inside the input folder")
    (outdir / "notes.txt").write_text("mine")
    _assert_clean_failure(run_cli("compile", model, "-o", outdir), "holds notes.txt")
    (outdir / "notes.txt").unlink()
    _assert_clean_failure(run_cli("compile", outdir / "model.onnx", "-o", outdir),
                          "is inside", "which compile replaces")
    assert (outdir / "model.onnx").is_file()


def test_android_without_ndk_writes_object_archive(tmp_path, minilm_l3, monkeypatch):
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    manifest = compile_model(minilm_l3, "android-arm64", tmp_path / "android")
    assert manifest["artifact"] == "model.tar" and not manifest["linked"]
    assert any("ANDROID_NDK_HOME" in note for note in manifest["notes"])
    import tarfile

    with tarfile.open(tmp_path / "android" / "model.tar") as archive:
        objects = [m for m in archive.getnames() if m.endswith(".o")]
    assert objects
    with pytest.raises(LrdeployError, match="not linked"):
        verify_artifact(tmp_path / "android", emulate=True)
    # A phone has no compiler to link it: refused before any connection is tried.
    with pytest.raises(LrdeployError, match="not linked into model.so"):
        lrdeploy.profile([tmp_path / "android"], rpc="127.0.0.1:9")


def _assert_clean_failure(proc, *fragments):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("lrdeploy: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


def test_unknown_target_lists_the_known_ones(tmp_path, minilm_l3):
    proc = run_cli("compile", minilm_l3, "--target", "rpi9", "-o", tmp_path / "out")
    _assert_clean_failure(proc, "unknown target 'rpi9'", "rpi4", "jetson-orin-cpu")
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_is_refused_and_left_alone(tmp_path, minilm_l3):
    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"not mine to overwrite")
    proc = run_cli("compile", minilm_l3, "--target", "host", "-o", taken)
    _assert_clean_failure(proc, "taken.onnx: exists and is a file")
    assert taken.read_bytes() == b"not mine to overwrite"


def test_missing_cross_compiler_names_the_debian_package(tmp_path, minilm_l3):
    devices = tmp_path / "devices.toml"
    devices.write_text('''
[board-x]
description = "a board whose toolchain is not installed"
family = "arm_cpu"
tvm_target = { kind = "llvm", mtriple = "aarch64-linux-gnu", mattr = ["+neon"] }
triple = "aarch64-linux-gnu"
cores = 4
peak_gflops = 10.0
bandwidth_gbs = 2.0
l2_kib = 512
cross_compiler = "aarch64-board-x-gcc"
cross_compiler_package = "gcc-board-x"
''')
    proc = run_cli("compile", minilm_l3, "--target", "board-x", "--device-file", devices,
                   "-o", tmp_path / "out")
    _assert_clean_failure(proc, "aarch64-board-x-gcc", "gcc-board-x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["devices.toml"]
    listed = run_cli("targets", "--device-file", devices)
    assert listed.returncode == 0 and "board-x" in listed.stdout


def test_targets_json_is_a_device_file(tmp_path):
    """The --device-file help says ``targets --json`` shows the rows' fields: a row copied
    from it, renamed and edited, is read back as a new device."""
    listed = run_cli("targets", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert rows["rpi4"]["simd_lanes"] == 4 and rows["rpi4"]["tvm_target"]["kind"] == "llvm"
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps({"my-pi": {**rows["rpi4"], "peak_gflops": 12.5}}))
    again = json.loads(run_cli("targets", "--json", "--device-file", devices).stdout)
    assert again["my-pi"] == {**rows["rpi4"], "peak_gflops": 12.5}
    assert again["rpi4"] == rows["rpi4"]


def test_device_file_with_a_missing_field_is_refused(tmp_path, minilm_l3):
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps({"half-board": {"description": "no target", "family": "host",
                                                  "triple": "x", "cores": 1}}))
    proc = run_cli("compile", minilm_l3, "--target", "half-board", "--device-file", devices,
                   "-o", tmp_path / "out")
    _assert_clean_failure(proc, "devices.json", "half-board", "tvm_target")
    assert not (tmp_path / "out").exists()


def test_a_negative_tolerance_is_refused_before_the_artifact_runs(tmp_path):
    proc = run_cli("verify", tmp_path, "--tolerance", "-1")
    _assert_clean_failure(proc, "--tolerance -1: a relative error must be >= 0")


def test_artifact_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    for command in (["verify", tmp_path / "empty"], ["bundle", tmp_path / "empty",
                                                     tmp_path / "b"]):
        proc = run_cli(*command)
        _assert_clean_failure(proc, "no manifest.json")
    assert not (tmp_path / "b").exists()


def test_tvm_is_not_imported_by_analysis_or_compression():
    probe = ("import sys, lrdeploy, lrdeploy.cli, lrdeploy.deploy; "
             "print('tvm' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.stdout.strip() == "False"
