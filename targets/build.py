"""What every family shares: ONNX -> Relax -> ``tvm.compile`` with the target's default pipeline.

The default pipeline fuses operators (without it nothing is fused and CPU code is ~1.5x slower).
It runs here, explicitly, so the constants that reach the artifact can be counted: that count is
how a test proves the factorized weights survive compilation (no pass folded ``U @ V`` back into
the dense W). TVM is imported by the functions, never at module import.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lrdeploy.errors import LrdeployError
from lrdeploy.passes.base import site_of_node
from lrdeploy.targets.devices import Device


def tvm_target(device: Device) -> Any:
    """TVM's Target for the row; ``"mcpu": "native"`` means the CPU this process runs on (LLVM
    itself refuses "native" and would fall back to a generic CPU without AVX)."""
    import tvm
    from tvm.target import codegen

    config = dict(device.tvm_target)
    if config.get("mcpu") == "native":
        config["mcpu"] = codegen.llvm_get_system_cpu()
    try:
        return tvm.target.Target(config)
    except Exception as exc:
        raise LrdeployError(f"target '{device.name}': TVM refuses its tvm_target "
                            f"{device.tvm_target}: {str(exc).splitlines()[0]}") from None


def import_onnx(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> Any:
    """The Relax module of ``model`` with the given static input shapes, weights embedded."""
    from tvm.relax.frontend.onnx import from_onnx

    try:
        return from_onnx(model, shape_dict={k: list(v) for k, v in shapes.items()},
                         keep_params_in_input=False)
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise LrdeployError(f"TVM cannot import the model: {lines[-1] if lines else exc}") \
            from None


def constant_bytes(mod: Any) -> int:
    """Bytes of the tensor constants of every Relax function in ``mod`` (the embedded weights)."""
    from tvm import relax

    total = 0

    def count(expr: Any) -> None:
        nonlocal total
        # 0.27's Relax tensor constants are ir.GenericConst holding a runtime tensor in
        # ``value``; scalars (IntImm and friends) share the base class but hold numbers.
        value = getattr(expr, "value", None)
        if value is not None and hasattr(value, "numpy"):
            total += value.numpy().nbytes

    for function in mod.functions.values():
        if isinstance(function, relax.Function):
            relax.analysis.post_order_visit(function, count)
    return total


def clip_kernels_as_ops(mod: Any) -> Any:
    """``mod`` with the importer's Clip kernels as the Relax operators they compute.

    TVM's ONNX importer writes Clip as TE kernels, ``call_tir(maximum|minimum, (x, bound))``,
    whose arguments its ToMixedPrecision cannot type (it fails on MobileNetV2's ReLU6). The
    same elementwise functions as ``relax.op.maximum`` / ``minimum`` convert."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    operators = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}

    @mutator
    class ClipKernels(PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if getattr(call.op, "name", "") == "relax.call_tir":
                operator = operators.get(call.args[0].name_hint.rstrip("0123456789"))
                if operator is not None and len(call.args[1].fields) == 2:
                    return operator(*call.args[1].fields)
            return call

    rewritten = mod.clone()
    rewritten["main"] = ClipKernels(mod).visit_expr(mod["main"])
    return relax.transform.DeadCodeElimination(["main"])(rewritten)


def to_half(mod: Any) -> Any:
    """Half precision where TVM's automatic mixed precision puts it: matmul and conv weights,
    inputs and accumulators in float16, and what follows them; ops it deems sensitive (softmax,
    normalizations' statistics) and integer-indexed tables (embeddings) stay float32, and the
    model's inputs and outputs too (cast at the edges)."""
    from tvm import relax

    try:
        # Folded first, so constant clip bounds are constants that follow their input's dtype.
        folded = relax.transform.FoldConstant()(clip_kernels_as_ops(mod))
        return relax.transform.ToMixedPrecision(out_dtype="float16")(folded)
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise LrdeployError(f"TVM cannot convert the model to float16: "
                            f"{lines[-1] if lines else exc}") from None


def fuse(mod: Any, device: Device) -> Any:
    """Legalized and fused, once per compile: the kernels of this module are the tuning tasks,
    the rows of the kernel table and, by name, the functions of the built library."""
    import tvm
    from tvm import relax

    with tvm_target(device):
        return tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.get_pipeline("zero"),
        ])(mod)


def lower(fused: Any, device: Device, tuning_database: Path | None = None) -> Any:
    """Apply tuned schedules (if any) to the fused module, then the target's default Relax
    pipeline (its legalization and fusion find nothing left to do)."""
    from tvm import relax

    target = tvm_target(device)
    with target:
        if tuning_database is not None:
            fused = relax.transform.MetaScheduleApplyDatabase(str(tuning_database))(fused)
        return relax.get_default_pipeline(target)(fused)


def build(lowered: Any, device: Device) -> Any:
    """The VM executable of an already lowered module."""
    import tvm

    try:
        return tvm.compile(lowered, target=tvm_target(device), relax_pipeline=None)
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise LrdeployError(f"TVM failed to build for '{device.name}': "
                            f"{lines[-1] if lines else exc}") from None


def kernel_table(fused: Any, model: onnx.ModelProto) -> list[dict]:
    """Every fused kernel ``main`` calls: its argument shapes (inputs, then outputs), how often
    it is called, and the ONNX sites whose weights it takes (matched by the weights' bytes,
    transposed too, since the frontend may fold a transpose into a weight)."""
    import hashlib

    from onnx import numpy_helper
    from tvm import relax

    def digest(array: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(array).tobytes() + str(array.shape).encode())\
            .hexdigest()

    owners = {}
    for node in model.graph.node:
        for name in node.input:
            owners.setdefault(name, node.name)
    weight_sites: dict[str, tuple[str, bool]] = {}
    for tensor in model.graph.initializer:
        if tensor.name in owners and len(tensor.dims) >= 2:
            array = numpy_helper.to_array(tensor)
            site = site_of_node(owners[tensor.name])
            weight_sites[digest(array)] = site
            if array.ndim == 2:
                weight_sites[digest(array.T)] = site

    kernels: dict[tuple, dict] = {}

    def visit(expr: Any) -> None:
        if getattr(getattr(expr, "op", None), "name", "") != "relax.call_tir":
            return
        inputs = list(expr.args[1].fields)
        types = [arg.ty for arg in inputs] + list(expr.ty_args)
        if not all(hasattr(t, "shape") and t.shape is not None for t in types):
            return
        args = [{"shape": [int(d) for d in t.shape], "dtype": str(t.dtype)} for t in types]
        entry = kernels.setdefault((expr.args[0].name_hint, json.dumps(args)), {
            "name": expr.args[0].name_hint, "args": args, "calls": 0, "sites": [],
            "factorized": False})
        entry["calls"] += 1
        for arg in inputs:
            value = getattr(arg, "value", None)
            if value is not None and hasattr(value, "numpy"):
                site = weight_sites.get(digest(value.numpy()))
                if site and site[0] not in entry["sites"]:
                    entry["sites"].append(site[0])
                    entry["factorized"] = entry["factorized"] or site[1]

    relax.analysis.post_order_visit(fused["main"], visit)
    return list(kernels.values())


GPU_KINDS = ("opencl", "cuda", "vulkan", "metal", "rocm")


def _modules(module: Any) -> list:
    return [module] + [m for child in module.imports for m in _modules(child)]


def device_kernels(executable: Any, device: Device) -> str:
    """The GPU source of a build (e.g. OpenCL C), refusing a build where it is missing.

    A Relax pipeline without GPU schedules (dlight) still builds for a GPU target: every kernel
    is then compiled for the host CPU and the artifact holds no device module at all."""
    kind = device.tvm_target["kind"]
    sources = [m.inspect_source() for m in _modules(executable.mod)
               if getattr(m, "kind", "") == kind]
    if not sources:
        raise LrdeployError(f"the build for '{device.name}' holds no {kind} module: every "
                            "kernel was compiled for the host CPU (a pipeline without GPU "
                            "schedules); refusing to write it")
    return "\n".join(sources)


def check_device_code(executable: Any, lowered: Any, device: Device) -> None:
    """For GPU targets: every kernel of ``lowered`` must have become a device kernel (TVM names
    them FUNCTION_kernel); one left out ran on the host CPU."""
    from tvm import tirx

    if device.tvm_target["kind"] not in GPU_KINDS:
        return
    source = device_kernels(executable, device)
    launched = set(re.findall(r"__kernel\s+void\s+(\w+?)_kernel\w*\s*\(", source))
    functions = [gv.name_hint for gv, f in lowered.functions.items()
                 if isinstance(f, tirx.PrimFunc)]
    on_host = sorted(set(functions) - launched)
    if on_host:
        raise LrdeployError(f"the build for '{device.name}' runs {len(on_host)} kernel(s) on "
                            f"the host CPU instead of the GPU: {', '.join(on_host[:5])}"
                            f"{' ...' if len(on_host) > 5 else ''}")
