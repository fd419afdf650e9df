"""profile: local, over RPC to an emulated aarch64 device (TVM's own server under qemu), through
a real tracker, and the faults a user meets. Every server started here is stopped, and checked."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import threading
import time

import pytest

import lrdeploy
from conftest import decaying_mlp, run_cli
from lrdeploy.deploy import compile_model
from lrdeploy.errors import LrdeployWarning
from lrdeploy.profiling import profile
from lrdeploy.targets import emulated

pytestmark = pytest.mark.slow
KEY = "rpi4-emulated"
STARTED: list[emulated.Service] = []


def _start(service: emulated.Service) -> emulated.Service:
    STARTED.append(service)
    return service


@pytest.fixture(scope="module", autouse=True)
def no_server_left_behind():
    yield
    for service in STARTED:
        service.stop()
    for service in STARTED:
        with pytest.raises(ProcessLookupError):
            os.killpg(service.process.pid, 0)  # the whole group, workers included, is gone
        assert not service.log.exists()
    leftovers = subprocess.run(["pgrep", "-f", "tvm.exec.(rpc_server|rpc_tracker|popen_worker)"],
                               capture_output=True, text=True).stdout.split()
    assert leftovers == []


@pytest.fixture(scope="module")
def minilm_rpi4(tmp_path_factory, minilm_l3):
    work = tmp_path_factory.mktemp("profile")
    compressed = work / "minilm_lr.onnx"
    lrdeploy.compress(minilm_l3, compressed, rank="energy:0.9",
                      input_shapes={"input_ids": (1, 8), "attention_mask": (1, 8)})
    outdir = work / "rpi4"
    compile_model(compressed, "rpi4", outdir,
                  input_shapes={"input_ids": (1, 8), "attention_mask": (1, 8)})
    return outdir


@pytest.fixture(scope="module")
def tracker_with_device():
    tracker = _start(emulated.start_tracker())
    server = _start(emulated.start_server(tracker=tracker.address, key=KEY))
    return tracker, server


def test_profile_through_tracker_on_emulated_aarch64_device(tracker_with_device, minilm_rpi4,
                                                            tmp_path):
    tracker, _ = tracker_with_device
    report = tmp_path / "profile.json"
    page = tmp_path / "profile.html"
    proc = run_cli("profile", minilm_rpi4, "--tracker", tracker.address, "--key", KEY,
                   "--emulated", "--runs", "3", "--warmup", "1", "--per-layer",
                   "--json", report, "--html", page)
    assert proc.returncode == 0, proc.stderr
    assert "EMULATED" in proc.stdout
    html = page.read_text()
    assert "data:image/png;base64," in html and "EMULATED" in html
    assert f"timed tracker {tracker.address} key {KEY}" in html and "{" not in html.split(
        "<table")[0]  # a sentence, not a Python dict
    assert "<th>max rel. error</th>" in html
    data = json.loads(report.read_text())
    (timing,) = data["timings"]
    assert timing["emulated"] and data["device"]["emulated"]
    assert len(timing["samples_ms"]) == 3 and timing["median_ms"] > 0
    assert timing["min_ms"] <= timing["median_ms"] <= timing["p90_ms"] <= timing["max_ms"]
    assert timing["max_relative_error"] <= 1e-4  # outputs fetched over RPC match onnxruntime
    # per kernel, timed on the device; the factorized sites are named
    factorized = {site for layer in timing["layers"] if layer["kind"] == "factorized"
                  for site in layer["sites"]}
    assert any(site.endswith("attention/self/query/MatMul") for site in factorized)
    assert len(factorized) >= 12
    summary = timing["layer_summary"]
    assert 0 < summary["share_factorized"] <= 1 and summary["total_ms"] > 0
    print(f"emulated rpi4 via tracker: median {timing['median_ms']:.1f} ms (emulated)")


def test_plan_times_its_chains_on_the_device_through_the_tracker(tracker_with_device, tmp_path,
                                                                 monkeypatch):
    """plan --tracker: every candidate chain is compiled for the board and timed on it (the
    emulated aarch64 device), into the device's latency table, so a second plan times no chain
    again; the plan meets its budget as measured there. Each of the process's sessions is
    closed before the next connects (every other one used to wait for the server to kill the
    previous session at its timeout)."""
    monkeypatch.setenv("LRDEPLOY_CACHE", str(tmp_path / "cache"))
    tracker, server = tracker_with_device
    timeouts = server.log_text().count("timeout in RPC session")
    model = decaying_mlp(tmp_path / "mlp.onnx", rows=16, width=64, hidden=128)
    reports = []
    for run in range(2):
        report = tmp_path / f"report{run}.json"
        done = run_cli("plan", model, "--target", "rpi4", "--tracker", tracker.address, "--key",
                       KEY, "--budget-ms", "70%", "-o", tmp_path / f"plan{run}.json",
                       "--report", report)
        assert done.returncode == 0, done.stderr
        reports.append(json.loads(report.read_text()))
    first, second = reports
    assert first["engine"] == f"tvm on rpi4, key {KEY}" and not first["estimate"]
    assert first["chains_measured"] >= 4 and first["chains_cached"] == 0
    assert second["chains_measured"] == 0
    assert second["chains_cached"] == first["chains_measured"]
    # the emulator's figures are its key's own: a real rpi4 would not be planned with them
    assert [p.name for p in (tmp_path / "cache" / "latency").iterdir()] == [
        f"rpi4-tvm@key_{KEY}.json"]
    for report in reports:
        assert report["measured"] <= report["budget"]["value"]
        assert any(entry["method"] == "svd" for entry in report["plan"]["entries"])
    assert server.log_text().count("timeout in RPC session") == timeouts


def test_unknown_key_lists_the_registered_ones(tracker_with_device, minilm_rpi4):
    tracker, _ = tracker_with_device
    proc = run_cli("profile", minilm_rpi4, "--tracker", tracker.address, "--key", "pixel9",
                   "--runs", "1")
    assert proc.returncode != 0
    assert f"registered keys: {KEY}" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("place", [["--rpc"], ["--key", KEY, "--tracker"]])
def test_connection_refused_is_one_clear_line(minilm_rpi4, tmp_path, place):
    """Without a table of nothing measured; and a tracker that is not there is told at once
    (TVM's tracker client alone retries a refused connection for 60 s)."""
    port = emulated.free_port()
    report = tmp_path / "p.json"
    start = time.monotonic()
    proc = run_cli("profile", minilm_rpi4, *place, f"127.0.0.1:{port}", "--json", report)
    assert time.monotonic() - start < 45
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lrdeploy: error:") and "connection refused" in last
    assert "Traceback" not in proc.stderr
    assert "Latency, ms" not in proc.stdout
    assert json.loads(report.read_text())["timings"][0]["error"]


def test_device_lost_mid_run_keeps_the_samples_measured_before(minilm_rpi4):
    server = _start(emulated.start_server())
    samples_seen = threading.Event()

    def progress(message: str) -> None:
        if message.startswith("tvm run 3/"):
            samples_seen.set()

    def kill_when_running() -> None:
        samples_seen.wait(600)
        server.stop()

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    result = profile([minilm_rpi4], rpc=server.address, runs=50, warmup=1, emulated=True,
                     progress=progress)
    killer.join()
    (timing,) = result.timings
    assert timing.error and "failed after" in timing.error
    assert 2 <= len(timing.samples_ms) < 50
    assert result.to_dict()["timings"][0]["median_ms"] is not None


def test_tracker_request_times_out_when_the_only_device_is_busy(tracker_with_device,
                                                                 minilm_rpi4):
    from tvm import rpc

    tracker, _ = tracker_with_device
    busy = rpc.connect_tracker("127.0.0.1", tracker.port).request(KEY, session_timeout=60)
    start = time.monotonic()
    result = profile([minilm_rpi4], tracker=tracker.address, key=KEY, runs=1, timeout_s=5)
    assert time.monotonic() - start < 60
    assert "within 5 s" in result.timings[0].error
    del busy


def test_the_board_is_handed_back_as_soon_as_a_profile_returns(tracker_with_device,
                                                                minilm_rpi4):
    """A profile run in this process closes its session when it returns: another process
    gets the tracker's only board within a 20 s request timeout. With the automatic garbage
    collector off, nothing else would close it (the VM's reference cycle holds it)."""
    tracker, _ = tracker_with_device
    gc.disable()
    try:
        first = profile([minilm_rpi4], tracker=tracker.address, key=KEY, runs=1)
        assert not first.failed
        proc = run_cli("profile", minilm_rpi4, "--tracker", tracker.address, "--key", KEY,
                       "--runs", "1", "--timeout", "20")
    finally:
        gc.enable()
    assert proc.returncode == 0, proc.stderr


def test_host_profile_side_by_side_dense_and_compressed(tmp_path, minilm_l3):
    compressed = tmp_path / "lr.onnx"
    shapes = {"input_ids": (1, 8), "attention_mask": (1, 8)}
    lrdeploy.compress(minilm_l3, compressed, rank="energy:0.9", input_shapes=shapes)
    result = lrdeploy.profile([minilm_l3, compressed], runtimes=["ort", "tvm"], runs=2,
                              warmup=1, input_shapes=shapes, per_layer=True)
    rows = result.to_dict()["timings"]
    assert [(r["runtime"], r["model"] == str(compressed)) for r in rows] == [
        ("onnxruntime", False), ("tvm", False), ("onnxruntime", True), ("tvm", True)]
    assert rows[0]["ratio_to_first"] == 1.0 and all(r["median_ms"] > 0 for r in rows)
    assert all(r["max_relative_error"] <= 1e-4 for r in rows if r["runtime"] == "tvm")
    ort_low_rank = rows[2]["layer_summary"]
    assert ort_low_rank["share_factorized"] > 0 and rows[0]["layer_summary"][
        "share_factorized"] == 0  # the dense model has no factorized site


def test_an_onnx_beside_an_artifact_runs_at_the_artifact_shapes(tmp_path, minilm_l3):
    """Once the dense .onnx ran at the default sequence of 32 beside an artifact compiled at
    128, and 'vs first' said the compressed model was 2.56 times slower (it was 0.64)."""
    artifact = tmp_path / "host"
    compile_model(minilm_l3, "host", artifact, input_shapes={"input_ids": (1, 8)},
                  compress_options={"rank": "energy:0.9"})
    rows = lrdeploy.profile([minilm_l3, artifact], runtimes=["ort"], runs=2,
                            warmup=1).to_dict()["timings"]
    assert rows[0]["inputs"] == rows[1]["inputs"] == {"input_ids": [1, 8],
                                                      "attention_mask": [1, 8]}
    with pytest.warns(LrdeployWarning, match="different input shapes.*input_ids=1x16"):
        lrdeploy.profile([minilm_l3, artifact], runtimes=["ort"], runs=2, warmup=1,
                         input_shapes={"input_ids": (1, 16)})
    # With artifacts alone, --input-shape would size nothing.
    with pytest.raises(lrdeploy.LrdeployError, match="runs at the shapes it was compiled for"):
        lrdeploy.profile([artifact], runtimes=["ort"], input_shapes={"input_ids": (1, 16)})


@pytest.mark.parametrize("options, message", [
    ({"threads": 0}, "--threads 0: must be 1 or more"),
    ({"timeout_s": 0}, "--timeout 0: must be above 0"),
    ({"emulated": True}, "--emulated labels the device behind --rpc / --tracker"),
    ({"rpc": "127.0.0.1:9"}, "--rpc / --tracker reach a device for --runtime tvm"),
])
def test_profile_options_that_would_be_ignored_are_refused(minilm_l3, options, message):
    with pytest.raises(lrdeploy.LrdeployError, match=message):
        lrdeploy.profile([minilm_l3], runtimes=["ort"], **options)


def test_a_gpu_artifact_is_sent_to_the_device_and_needs_its_opencl_runtime(
        tracker_with_device, minilm_rpi4, tmp_path):
    """The emulated board's TVM runtime has no OpenCL, as the PyPI wheels: the Mali artifact
    travels over RPC and is refused there, with the way out."""
    tracker, _ = tracker_with_device
    compressed = minilm_rpi4.parent / "minilm_lr.onnx"
    outdir = tmp_path / "mali"
    compile_model(compressed, "mali-g610", outdir,
                  input_shapes={"input_ids": (1, 8), "attention_mask": (1, 8)})
    proc = run_cli("profile", outdir, "--tracker", tracker.address, "--key", KEY, "--emulated",
                   "--runs", "1")
    assert proc.returncode == 2
    assert "{opencl}" in proc.stderr and "USE_OPENCL ON" in proc.stderr
