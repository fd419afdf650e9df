"""Microcontrollers (Cortex-M): a self-contained C project with one statically planned arena.

TVM 0.27 has no microTVM, no AOT executor and no C runtime, but its C codegen still writes
kernels as plain C. This family takes the fused Relax module and writes:

- ``kernels.c``: every kernel that ``main`` calls, by TVM's C codegen with its argument checks
  off, including only ``lrd_backend.h`` (the DLTensor / TVMFFIAny layouts) instead of TVM's
  headers;
- ``model.c`` / ``model.h``: ``int lrd_run(const float *in, float *out)``, which calls the kernels
  in graph order. Weights are ``const`` arrays (flash). Activations live in one static arena whose
  offsets come from ``arena.plan_arena`` over the buffers' lifetimes; a kernel's own scratch
  (``TVMBackendAllocWorkspace``, sized from the literal in its C) is one more buffer, alive for
  that kernel's step only, and the two workspace functions are a stack over that slot;
- ``main.c``, ``qemu/`` and a ``Makefile`` for the host compiler, ``arm-none-eabi-gcc`` and
  qemu-system-arm's MPS2 boards.

Flash is text + data and RAM is data + bss of the model's objects for the device (from
``arm-none-eabi-size``), plus the deepest stack frame chain (from ``-fstack-usage``); both are
checked against the device row before anything is written.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from lrdeploy import __version__
from lrdeploy.errors import LrdeployError
from lrdeploy.runtime import Feeds
from lrdeploy.targets.arena import ArenaPlan, Buffer, aligned, plan_arena
from lrdeploy.targets.devices import Device
from lrdeploy.targets.runner import require_tool

ARTIFACT = "model.c"
ALIGNMENT = 16
TEMPLATES = ("lrd_backend.h", "main.c")
QEMU_FILES = ("startup.c", "mps2.ld")
# What the project's Makefile builds in it (its clean target removes them): compile may
# replace a project holding them.
BUILD_OUTPUTS = ("build", "lrd_host", "lrd_qemu.elf", "liblrd_model.a")
KERNEL_PREFIX = "__tvm_ffi_"
# C types of the tensors a model can hold; the kernels see them through DLPack dtype codes.
C_TYPES = {"float32": ("float", 2, 32), "float64": ("double", 2, 64),
           "int8": ("int8_t", 0, 8), "int16": ("int16_t", 0, 16), "int32": ("int32_t", 0, 32),
           "int64": ("int64_t", 0, 64), "uint8": ("uint8_t", 1, 8), "bool": ("uint8_t", 1, 8)}


@dataclass
class Tensor:
    """One tensor ``main`` names: where its bytes are (``storage``) and how kernels see it."""

    name: str
    shape: list[int]
    dtype: str
    storage: str  # the tensor owning the bytes: itself, or the one it is a view of

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class Step:
    kernel: str
    args: list[str]
    scratch: int = 0  # bytes of workspace the kernel allocates while it runs


@dataclass
class Program:
    """``main`` of a fused Relax module as straight-line kernel calls over named tensors."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    input: str = ""
    output: str = ""

    def storage(self, name: str) -> str:
        return self.tensors[name].storage


def check_io_counts(inputs: int, outputs: int, model_name: str) -> None:
    """The C entry point takes one input tensor and writes one output (``lrd_run(in, out)``):
    checked by ``lrdeploy.deploy`` before TVM's import, so ``extract_program`` assumes it."""
    for count, what in ((inputs, "input"), (outputs, "output")):
        if count != 1:
            raise LrdeployError(f"{model_name}: microcontroller deployment takes a model with "
                                f"one {what}; this one has {count}")


def extract_program(fused: Any) -> Program:
    """The kernel calls of ``fused["main"]`` (one input and one output, see
    ``check_io_counts``), views as aliases."""
    from tvm import relax

    main = fused["main"]
    program = Program()
    names: dict[Any, str] = {}
    constant_names: dict[str, str] = {}

    def new_tensor(var: Any, storage: str | None = None) -> str:
        ty = var.ty
        shape = getattr(getattr(ty, "shape", None), "values", None)
        if not isinstance(ty, relax.TensorType) or shape is None:
            raise LrdeployError(f"'{var.name}' is not a tensor of static shape")
        name = f"t{len(program.tensors)}"
        dtype = str(ty.dtype)
        if dtype not in C_TYPES:
            raise LrdeployError(f"tensor '{var.name}' has dtype {dtype}, which the C "
                                f"deployment does not support ({', '.join(C_TYPES)})")
        program.tensors[name] = Tensor(name, [int(d) for d in shape], dtype, storage or name)
        names[var] = name
        return name

    def argument(expr: Any) -> str:
        # 0.27's tensor constants are ir.GenericConst holding a runtime tensor in ``value``.
        value = getattr(expr, "value", None)
        if value is not None and hasattr(value, "numpy"):
            array = value.numpy()
            if str(array.dtype) not in C_TYPES:
                raise LrdeployError(f"a weight has dtype {array.dtype}, which the C "
                                    f"deployment does not support ({', '.join(C_TYPES)})")
            key = hashlib.sha1(array.tobytes() + str(array.shape).encode()
                               + str(array.dtype).encode()).hexdigest()
            if key not in constant_names:
                name = f"w{len(program.constants)}"
                program.constants[name] = array
                program.tensors[name] = Tensor(name, list(array.shape), str(array.dtype), name)
                constant_names[key] = name
            return constant_names[key]
        if expr in names:
            return names[expr]
        raise LrdeployError(f"a kernel argument of kind {type(expr).__name__} is not "
                            "supported by the C deployment")

    program.input = new_tensor(main.params[0])
    for block in main.body.blocks:
        for binding in block.bindings:
            var, value = binding.var, binding.value
            op = getattr(getattr(value, "op", None), "name", None)
            if op == "relax.call_tir":
                if isinstance(var.ty, relax.TupleType):
                    raise LrdeployError("kernels with several outputs are not supported by the "
                                        "C deployment")
                args = [argument(a) for a in value.args[1].fields]
                program.steps.append(Step(value.args[0].name_hint, args + [new_tensor(var)]))
            elif op == "relax.reshape" or isinstance(value, relax.Var):
                source = argument(value.args[0] if op else value)
                new_tensor(var, storage=program.storage(source))
            else:
                what = op or type(value).__name__
                raise LrdeployError(f"operation {what} has no kernel in the C deployment")
    result = main.body.body
    if not isinstance(result, relax.Var) or result not in names:
        raise LrdeployError("microcontroller deployment takes a model with one output tensor")
    program.output = names[result]
    for tensor in (program.tensors[program.input], program.tensors[program.output]):
        if tensor.dtype != "float32":
            raise LrdeployError(f"lrd_run takes and returns float32; the model's "
                                f"{'input' if tensor.name == program.input else 'output'} "
                                f"is {tensor.dtype}")
    if program.storage(program.output) in (program.input, *program.constants):
        raise LrdeployError("the model's output is its input or a weight: nothing to compute")
    return program


def kernel_source(fused: Any, program: Program, device: Device) -> str:
    """TVM's C for the kernels ``program`` calls, without argument checks, and with
    ``lrd_backend.h`` in place of TVM's headers."""
    import tvm
    from tvm import relax, tirx

    from lrdeploy.targets.build import tvm_target

    called = {step.kernel for step in program.steps}
    named = relax.transform.AttachGlobalSymbol()(fused)
    kernels = {gv: f for gv, f in named.functions.items()
               if isinstance(f, tirx.PrimFunc) and gv.name_hint in called}
    # Shapes are static and checked here, so the per-call checks would only cost flash.
    with tvm.transform.PassContext(config={"tirx.disable_assert": True}):
        library = tvm.tirx.build(tvm.IRModule(kernels), target=tvm_target(device))
    source = library.inspect_source()
    lines = [line for line in source.splitlines()
             if not line.startswith(("#include \"tvm/", "#define TVM_EXPORTS"))]
    unknown = sorted(set(re.findall(r"\b(TVM\w+)\s*\(", "\n".join(lines)))
                     - {"TVMBackendAllocWorkspace", "TVMBackendFreeWorkspace"})
    if unknown:
        raise LrdeployError(f"the kernels call TVM runtime function(s) {', '.join(unknown)}, "
                            "which the C deployment does not provide")
    return "#include \"lrd_backend.h\"\n" + "\n".join(lines) + "\n"


def scratch_bytes(source: str, kernel: str) -> int:
    """Workspace bytes ``kernel`` allocates at most (all of its allocations at once: they are
    freed last-in first-out, so their sum bounds the peak)."""
    match = re.search(rf"int32_t {KERNEL_PREFIX}{re.escape(kernel)}\([^)]*\) {{\n.*?\n}}\n",
                      source, re.DOTALL)
    if match is None:
        raise LrdeployError(f"kernel {kernel} is missing from TVM's C output")
    calls = re.findall(r"TVMBackendAllocWorkspace\(([^;]*)\);", match.group(0))
    total = 0
    for call in calls:
        size = re.search(r"\(uint64_t\)(\d+)ULL", call)
        if size is None:
            raise LrdeployError(f"kernel {kernel} allocates a workspace of dynamic size")
        total += aligned(int(size.group(1)), ALIGNMENT)
    return total


def plan_memory(program: Program) -> ArenaPlan:
    """The arena plan: offsets of every activation and of every step's scratch."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    outside = {program.input, program.storage(program.output), *program.constants}
    for index, step in enumerate(program.steps):
        for name in step.args:
            storage = program.storage(name)
            if storage in outside:
                continue
            first.setdefault(storage, index)  # SSA: a buffer's first mention is its write
            last[storage] = index
    buffers = [Buffer(name, program.tensors[name].nbytes, first[name], last[name])
               for name in first]
    buffers += [Buffer(f"scratch{index}", step.scratch, index, index)
                for index, step in enumerate(program.steps) if step.scratch]
    return plan_arena(buffers, ALIGNMENT)


def _c_array(array: np.ndarray) -> str:
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.kind == "f":
        if not np.all(np.isfinite(flat)):
            raise LrdeployError("a weight holds inf or NaN; it cannot be written as C")
        # 9 significant digits round-trip a float32 exactly (17 for float64); the exponent form
        # keeps every literal a floating one ("1f" would not be C).
        digits, suffix = (8, "f") if flat.dtype == np.float32 else (16, "")
        items = np.char.add(np.char.mod(f"%.{digits}e", flat), suffix)
    elif flat.dtype == np.bool_:
        items = flat.astype(np.uint8).astype(str)
    else:
        items = flat.astype(str)
        if flat.dtype == np.int64:
            items = np.char.add(items, "LL")
    rows = [", ".join(items[i:i + 8]) for i in range(0, len(items), 8)]
    return "{\n  " + ",\n  ".join(rows) + "\n}" if rows else "{0}"


def model_source(program: Program, offsets: dict[str, int], arena_size: int) -> str:
    """``model.c``: the weights, the arena, one DLTensor per tensor, and ``lrd_run``."""
    out = ["/* Generated by lrdeploy: the model as kernel calls over one static arena. */",
           "#include \"model.h\"", "", "#include <stddef.h>", "#include <stdint.h>", "",
           "#include \"lrd_backend.h\"", ""]
    for step_kernel in sorted({step.kernel for step in program.steps}):
        out.append(f"int32_t {KERNEL_PREFIX}{step_kernel}(void *self, void *args, "
                   "int32_t num_args, void *result);")
    out += ["", "/* Weights: const, so the linker keeps them in flash. */"]
    for name, array in program.constants.items():
        ctype = C_TYPES[str(array.dtype)][0]
        out.append(f"static const {ctype} {name}_data[{max(array.size, 1)}] "
                   f"__attribute__((aligned({ALIGNMENT}))) = {_c_array(array)};")
    out += ["", f"static uint8_t lrd_arena[{max(arena_size, ALIGNMENT)}] "
                f"__attribute__((aligned({ALIGNMENT})));", ""]

    def data_pointer(name: str) -> str:
        storage = program.storage(name)
        if storage in program.constants:
            return f"(void *){storage}_data"
        if storage in (program.input, program.storage(program.output)):
            return "NULL"  # set by lrd_run
        return f"lrd_arena + {offsets[storage]}"

    used = {name for step in program.steps for name in step.args}
    for tensor in program.tensors.values():
        if tensor.name not in used:
            continue
        name = tensor.name
        _, code, bits = C_TYPES[tensor.dtype]
        shape = ", ".join(f"{d}" for d in tensor.shape) or "1"
        mutable = program.storage(name) in (program.input, program.storage(program.output))
        # Kernels only read a DLTensor, so all but the input's and output's sit in flash.
        out.append(f"static const int64_t {name}_shape[] = {{{shape}}};")
        out.append(f"static {'' if mutable else 'const '}DLTensor {name} = "
                   f"{{{data_pointer(name)}, {{1, 0}}, {len(tensor.shape)}, "
                   f"{{{code}, {bits}, 1}}, (int64_t *){name}_shape, NULL, 0}};")
    out.append("")
    for index, step in enumerate(program.steps):
        pointers = ", ".join(f"(void *)&{name}" for name in step.args)
        out.append(f"static void *const step{index}_args[] = {{{pointers}}};")
    out += ["",
            "/* The workspace of the running step: a stack in its slot of the arena. */",
            "static uint8_t *scratch_top, *scratch_end;", "",
            "void *TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes,",
            "                               int dtype_code_hint, int dtype_bits_hint) {",
            "  (void)device_type; (void)device_id; (void)dtype_code_hint; (void)dtype_bits_hint;",
            f"  uint64_t size = (nbytes + {ALIGNMENT - 1}u) & ~(uint64_t){ALIGNMENT - 1}u;",
            "  if (size > (uint64_t)(scratch_end - scratch_top)) return NULL;",
            "  void *block = scratch_top;", "  scratch_top += size;", "  return block;", "}", "",
            "int TVMBackendFreeWorkspace(int device_type, int device_id, void *ptr) {",
            "  (void)device_type; (void)device_id;",
            "  scratch_top = (uint8_t *)ptr;", "  return 0;", "}", "",
            "typedef int32_t (*lrd_kernel)(void *, void *, int32_t, void *);", "",
            "static int lrd_call(lrd_kernel kernel, void *const *tensors, int count,",
            "                    uint8_t *scratch, uint32_t scratch_size) {",
            f"  TVMFFIAny args[{max(len(s.args) for s in program.steps)}];",
            "  for (int i = 0; i < count; ++i) {",
            "    args[i].type_index = kTVMFFIDLTensorPtr;",
            "    args[i].zero_padding = 0;",
            "    args[i].v_ptr = tensors[i];",
            "  }",
            "  scratch_top = scratch;", "  scratch_end = scratch + scratch_size;",
            "  return kernel(NULL, args, count, NULL);", "}", "",
            "int lrd_run(const float *in, float *out) {"]
    for name in sorted(n for n in used if program.tensors[n].storage == program.input):
        out.append(f"  {name}.data = (void *)in;")
    for name in sorted(n for n in used
                       if program.tensors[n].storage == program.storage(program.output)):
        out.append(f"  {name}.data = out;")
    for index, step in enumerate(program.steps):
        scratch = f"lrd_arena + {offsets[f'scratch{index}']}, {step.scratch}" \
            if step.scratch else "NULL, 0"
        out.append(f"  if (lrd_call({KERNEL_PREFIX}{step.kernel}, step{index}_args, "
                   f"{len(step.args)}, {scratch}) != 0) return {index + 1};")
    out += ["  return 0;", "}", ""]
    return "\n".join(out)


def model_header(program: Program, arena_size: int, model_name: str) -> str:
    inputs = program.tensors[program.input]
    output = program.tensors[program.output]
    guard = "LRD_MODEL_H_"
    return "\n".join([
        f"/* {model_name}, generated by lrdeploy {__version__}. */",
        f"#ifndef {guard}", f"#define {guard}", "",
        f"/* input float32{inputs.shape}, output float32{output.shape} */",
        f"#define LRD_INPUT_COUNT {int(np.prod(inputs.shape))}",
        f"#define LRD_OUTPUT_COUNT {int(np.prod(output.shape))}",
        f"#define LRD_ARENA_BYTES {arena_size}", "",
        "#ifdef __cplusplus", "extern \"C\" {", "#endif", "",
        "/* Runs the model once: reads LRD_INPUT_COUNT floats from in, writes LRD_OUTPUT_COUNT",
        " * floats to out. Returns 0, or the 1-based step whose kernel failed. Not reentrant:",
        " * the activations live in one static arena. */",
        "int lrd_run(const float *in, float *out);", "",
        "#ifdef __cplusplus", "}", "#endif", "#endif", ""])


@dataclass(frozen=True)
class Footprint:
    """Bytes the model takes on the device (its objects only: no startup code or libc)."""

    flash: int
    ram: int
    weights: int
    arena: int
    stack: int

    @property
    def code(self) -> int:
        return self.flash - self.weights

    def to_dict(self) -> dict[str, int]:
        return {"flash_bytes": self.flash, "ram_bytes": self.ram, "weight_bytes": self.weights,
                "code_bytes": self.code, "arena_bytes": self.arena, "stack_bytes": self.stack}


def _make(project: Path, *targets: str, timeout: float = 600) -> str:
    proc = subprocess.run(["make", "-s", "-C", str(project), *targets], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        errors = [line for line in lines if "error" in line.lower()] or lines
        raise LrdeployError(f"make {' '.join(targets)} failed in {project}: "
                            f"{errors[0] if errors else proc.returncode}")
    return proc.stdout


def footprint(project: Path, weights: int, arena: int) -> Footprint:
    """Flash and RAM of the project's objects built for the device, in a scratch copy."""
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp) / "build"
        shutil.copytree(project, build)
        sizes = _make(build, "size")
        flash = ram = 0
        for line in sizes.splitlines()[1:]:
            text, data, bss = (int(v) for v in line.split()[:3])
            flash += text + data
            ram += data + bss
        frames: dict[str, int] = {}
        for usage in (build / "build").glob("*.su"):
            for line in usage.read_text().splitlines():
                parts = line.split("\t")
                frames[parts[0].rsplit(":", 1)[-1]] = int(parts[1])
    # The deepest call chain: lrd_run -> lrd_call -> a kernel -> TVMBackendAllocWorkspace.
    kernels = [v for k, v in frames.items() if k.startswith(KERNEL_PREFIX)]
    stack = sum(frames.get(f, 0) for f in ("lrd_run", "lrd_call", "TVMBackendAllocWorkspace")) \
        + max(kernels, default=0)
    return Footprint(flash=flash, ram=ram + stack, weights=weights, arena=arena, stack=stack)


def check_fits(fit: Footprint, device: Device, model_name: str) -> None:
    """Refuse a model that overflows the device's flash or RAM, saying by how much."""
    problems = []
    if device.flash_kib and fit.flash > device.flash_kib * 1024:
        over = (fit.flash - device.flash_kib * 1024) / 1024
        # Weights are 4 bytes a parameter; the code stays about the same after factorization.
        params = max(0, (device.flash_kib * 1024 - fit.code) * 95 // 100 // 4)
        problems.append(f"flash {fit.flash / 1024:.1f} KiB exceeds {device.flash_kib} KiB by "
                        f"{over:.1f} KiB (weights {fit.weights / 1024:.1f} KiB, code "
                        f"{fit.code / 1024:.1f} KiB); try --budget-params {params}")
    if device.ram_kib and fit.ram > device.ram_kib * 1024:
        over = (fit.ram - device.ram_kib * 1024) / 1024
        problems.append(f"RAM {fit.ram / 1024:.1f} KiB exceeds {device.ram_kib} KiB by "
                        f"{over:.1f} KiB (activation arena {fit.arena / 1024:.1f} KiB, stack "
                        f"{fit.stack / 1024:.1f} KiB)")
    if problems:
        raise LrdeployError(f"{model_name} does not fit '{device.name}': {'; '.join(problems)}")


def _template(name: str) -> str:
    return resources.files("lrdeploy.targets").joinpath("mcu_c", name).read_text()


def compile_fused(fused: Any, staged: Path, device: Device, model_name: str
                  ) -> tuple[str, list[str], dict]:
    """Write the C project into ``staged``; returns the artifact, notes and its figures."""
    require_tool(device.cross_compiler, device.cross_compiler_package,
                 f"building for '{device.name}'")
    require_tool("make", "make", f"building for '{device.name}'")
    from tvm import relax

    # Reshapes become views of their input (no copy kernel, no second buffer).
    fused = relax.transform.RewriteDataflowReshape()(fused)
    program = extract_program(fused)
    kernels = kernel_source(fused, program, device)
    for step in program.steps:
        step.scratch = scratch_bytes(kernels, step.kernel)
    plan = plan_memory(program)
    (staged / "kernels.c").write_text(kernels)
    (staged / "model.c").write_text(model_source(program, plan.offsets, plan.size))
    (staged / "model.h").write_text(model_header(program, plan.size, model_name))
    for name in TEMPLATES:
        (staged / name).write_text(_template(name))
    (staged / "qemu").mkdir()
    for name in QEMU_FILES:
        (staged / "qemu" / name).write_text(_template(name))
    makefile = _template("Makefile.in")
    for key, value in {"MODEL": model_name, "DEVICE": device.name, "VERSION": __version__,
                       "CFLAGS": " ".join(device.cflags),
                       "EMULATOR": device.emulator or "qemu-system-arm",
                       "MACHINE": device.emulator_machine or "none"}.items():
        makefile = makefile.replace(f"@{key}@", value)
    (staged / "Makefile").write_text(makefile)
    weights = sum(array.nbytes for array in program.constants.values())
    fit = footprint(staged, weights, plan.size)
    check_fits(fit, device, model_name)
    details = {**fit.to_dict(), "arena_lower_bound": plan.lower_bound,
               "arena_without_reuse": plan.total, "steps": len(program.steps),
               "flash_limit_bytes": (device.flash_kib or 0) * 1024,
               "ram_limit_bytes": (device.ram_kib or 0) * 1024,
               "output_shape": program.tensors[program.output].shape}
    return ARTIFACT, [], details


def run(outdir: Path, manifest: dict, feeds: list[Feeds], emulate: bool) -> list[list[np.ndarray]]:
    """Outputs for each feed: the project built with the host compiler, or (``emulate``) for the
    device and run on qemu-system-arm's board with semihosting."""
    device = Device(**manifest["device"])
    name = manifest["inputs"][0]["name"]
    if emulate:
        require_tool(device.emulator, device.emulator_package, f"emulating '{device.name}'")
        if not device.emulator_machine:
            raise LrdeployError(f"target '{device.name}' names no emulator_machine")
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp) / "build"
        shutil.copytree(outdir, build, ignore=shutil.ignore_patterns("*.onnx", "*.json"))
        _make(build, "lrd_qemu.elf" if emulate else "lrd_host")
        # The Makefile's run-qemu is the one place that knows how to start the board.
        command = ["make", "-s", "run-qemu"] if emulate else ["./lrd_host"]
        results = []
        for feed in feeds:
            np.ascontiguousarray(feed[name], dtype=np.float32).tofile(build / "input.bin")
            (build / "output.bin").unlink(missing_ok=True)
            proc = subprocess.run(command, cwd=build, capture_output=True, text=True,
                                  timeout=600)
            if proc.returncode != 0 or not (build / "output.bin").is_file():
                message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
                where = f" under {device.emulator}" if emulate else ""
                # The first line is the harness's own (make adds its summary after it).
                raise LrdeployError(f"the C model failed{where}: "
                                    f"{message[0] if message else f'exit {proc.returncode}'}")
            output = np.fromfile(build / "output.bin", dtype=np.float32)
            results.append([output.reshape(manifest["mcu"]["output_shape"])])
    return results
