"""onnxruntime as the reference executor: input specs, sample and calibration inputs, probes.

onnxruntime runs the original and the compressed model for verification, and once, with extra
outputs, to learn the concrete shapes of the sites' activations at the analysed input shape.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from lrdeploy.errors import LrdeployError

# Dynamic axes without a user-given size: batch (axis 0) is 1, any other axis this many, which
# keeps a transformer's sequence or an image side short but not degenerate.
DEFAULT_DYNAMIC_DIM = 32

Feeds = dict[str, np.ndarray]

# onnxruntime logs kernel failures to stderr on its own; lrdeploy reports them as one line.
_QUIET_RUN = ort.RunOptions()
_QUIET_RUN.log_severity_level = 4


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    assumed: tuple[int, ...] = ()  # axes whose size was not in the model nor given by the user
    static: tuple[int, ...] = ()  # axes whose size the model fixes
    given: bool = False  # the shape was given for this input (--input-shape)

    def model_shape(self) -> str:
        """The shape the model takes, ``?`` on the axes it leaves free."""
        return _shape_text(d if axis in self.static else None for axis, d in enumerate(self.shape))


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """The real inputs (old models also list their initializers as inputs)."""
    return [v for v in model.graph.inputs if v.const_value is None]


def input_specs(
    model: ir.Model, shapes: Mapping[str, Sequence[int]] | None = None
) -> list[InputSpec]:
    """Concrete input shapes: the model's static dims, then ``shapes``, then the defaults."""
    shapes = dict(shapes or {})
    inputs = graph_inputs(model)
    for key in [k for k in shapes if k.startswith("#")]:  # a shape given without a name
        position = int(key[1:])
        if position >= len(inputs):
            raise LrdeployError(f"--input-shape: the model has only {len(inputs)} input(s)")
        shapes[inputs[position].name] = shapes.pop(key)
    known = {v.name for v in inputs}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise LrdeployError(
            f"--input-shape names {', '.join(unknown)}, but the model's inputs are "
            f"{', '.join(sorted(known))}"
        )
    sizes = _named_axis_sizes(inputs, shapes)
    defaulted: set[str] = set()  # named axes sized by the defaults, not by the user
    specs = []
    for value in inputs:
        if value.dtype is None:
            raise LrdeployError(f"model input '{value.name}' has no element type")
        dims = list(value.shape.dims) if value.shape is not None else None
        static = tuple(axis for axis, dim in enumerate(dims or []) if _is_static(dim))
        given = shapes.get(value.name)
        if given is not None:
            given = tuple(int(d) for d in given)
            if dims is not None and (
                len(dims) != len(given)
                or any(_is_static(d) and d != g for d, g in zip(dims, given, strict=False))
            ):
                raise LrdeployError(
                    f"--input-shape {value.name}={','.join(map(str, given))} does not fit the "
                    f"model's shape {_shape_text(dims)}"
                )
            specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), given,
                                   static=static, given=True))
            continue
        if dims is None:
            raise LrdeployError(
                f"model input '{value.name}' has no shape: give it with --input-shape"
            )
        concrete, assumed = [], []
        for axis, dim in enumerate(dims):
            name = _axis_name(dim)
            if _is_static(dim):
                concrete.append(dim)
            elif name in sizes:
                concrete.append(sizes[name])
                if name in defaulted:
                    assumed.append(axis)
            else:
                concrete.append(1 if axis == 0 else DEFAULT_DYNAMIC_DIM)
                assumed.append(axis)
                if name:  # every input's axis of this name gets the same size
                    sizes[name] = concrete[-1]
                    defaulted.add(name)
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), tuple(concrete),
                               tuple(assumed), static))
    return specs


def _axis_name(dim: object) -> str | None:
    return dim.value if isinstance(dim, ir.SymbolicDim) and dim.value else None


def _named_axis_sizes(inputs: Sequence[ir.Value], shapes: Mapping[str, Sequence[int]]
                      ) -> dict[str, int]:
    """The sizes ``shapes`` gives the model's named dynamic axes: an axis of that name in an
    input not given takes the same size, as the model declares (``input_ids`` given as 1,128
    sets ``attention_mask``'s ``sequence_length`` to 128 too)."""
    sizes: dict[str, int] = {}
    for value in inputs:
        given = shapes.get(value.name)
        if given is None or value.shape is None or len(value.shape.dims) != len(given):
            continue
        for dim, size in zip(value.shape.dims, given, strict=True):
            name = _axis_name(dim)
            if name is None:
                continue
            if sizes.setdefault(name, int(size)) != int(size):
                raise LrdeployError(f"--input-shape gives the model's axis '{name}' two sizes, "
                                    f"{sizes[name]} and {int(size)} ({value.name})")
    return sizes


def _is_static(dim: object) -> bool:
    # Old exporters write -1 (or 0) for a dynamic axis instead of a dim_param.
    return isinstance(dim, int) and dim > 0


def _shape_text(dims: Iterable[object]) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) else str(d or "?") for d in dims) + "]"


# Inputs that mark padded positions with 0 and text with 1, shape (batch, sequence): Hugging
# Face's name, which its exporters (torch.onnx, optimum) keep, and Google BERT's, which
# tf2onnx exports of it keep.
PADDING_MASK_INPUTS = ("attention_mask", "input_mask")


def random_inputs(model: ir.Model, specs: Sequence[InputSpec], seed: int = 0) -> Feeds:
    """Seeded inputs of the given specs: normal floats; integers valid as embedding indices;
    padding masks all ones (a text filling every position: random zeros would be holes in
    the middle of it, which no tokenizer makes)."""
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for spec in specs:
        if spec.name in PADDING_MASK_INPUTS:
            feeds[spec.name] = np.ones(spec.shape, spec.dtype)
        elif spec.dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            high = _index_bound(model, spec.name)
            feeds[spec.name] = rng.integers(0, high, size=spec.shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=spec.shape).astype(bool)
        else:
            raise LrdeployError(f"model input '{spec.name}' of type {spec.dtype} cannot be sampled")
    return feeds


def _index_bound(model: ir.Model, input_name: str) -> int:
    """Rows of the smallest constant table the input indexes with Gather (2 if none: masks)."""
    value = next(v for v in model.graph.inputs if v.name == input_name)
    bounds = []
    for usage in value.uses():
        node = usage.node
        table = node.inputs[0]
        if node.op_type == "Gather" and usage.idx == 1 and table.const_value is not None:
            axis = node.attributes.get_int("axis", 0)
            bounds.append(table.const_value.shape[axis])
    return int(min(bounds)) if bounds else 2


def load_calibration(path: str | os.PathLike[str], specs: Sequence[InputSpec]) -> list[Feeds]:
    """Feeds from an ``.npz`` keyed by input name.

    An array with the input's rank is one feed; one with an extra leading axis is a stack of
    samples, fed one at a time.
    """
    path = Path(path)
    if not path.is_file():
        raise LrdeployError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):  # numpy would call it "pickled data" it refuses to load
        raise LrdeployError(f"{path}: not an .npz archive (numpy.savez writes one, keyed by "
                            "input name)")
    try:
        archive = np.load(path, allow_pickle=False)
        arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:
        raise LrdeployError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise LrdeployError(f"{path}: no array for model input(s) {', '.join(missing)}")
    counts = set()
    for spec in specs:
        extra = arrays[spec.name].ndim - len(spec.shape)
        if extra not in (0, 1):
            raise LrdeployError(
                f"{path}: array '{spec.name}' has shape {arrays[spec.name].shape}, expected "
                f"rank {len(spec.shape)} (one sample) or {len(spec.shape) + 1} (a stack)"
            )
        sample = arrays[spec.name].shape[extra:]
        if any(sample[axis] != spec.shape[axis] for axis in spec.static):
            raise LrdeployError(f"{path}: array '{spec.name}' holds samples of shape "
                                f"{list(sample)}; the model's input is {spec.model_shape()}")
        counts.add(arrays[spec.name].shape[0] if extra else None)
    if len(counts) != 1:
        raise LrdeployError(f"{path}: arrays mix single samples and stacks of different sizes")
    (count,) = counts
    if count == 0:
        raise LrdeployError(f"{path}: the stacks hold no samples")
    for spec in specs:
        array = arrays[spec.name]
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise LrdeployError(f"{path}: array '{spec.name}' holds NaN or infinite values")
    cast = {s.name: arrays[s.name].astype(s.dtype, copy=False) for s in specs}
    if count is None:
        return [cast]
    return [{name: np.asarray(array[i]) for name, array in cast.items()} for i in range(count)]


def session(
    model: ir.Model, extra_outputs: Sequence[str] = (), optimize: bool = True,
    threads: int | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model``, optionally exposing intermediate values;
    ``optimize=False`` turns off onnxruntime's graph rewrites (fusions, constant folding);
    ``threads`` sets its intra-op threads (default: onnxruntime's, one per core)."""
    if extra_outputs:
        model = model.clone()
        values = {out.name: out for node in model.graph for out in node.outputs}
        for name in extra_outputs:
            value = values.get(name)
            if value is not None and value.type is not None and not value.is_graph_output():
                model.graph.outputs.append(value)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    proto = ir.serde.serialize_model(model)
    try:
        return ort.InferenceSession(proto.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise LrdeployError(f"onnxruntime cannot load the model: {exc}") from None


def run(sess: ort.InferenceSession, feeds: Feeds) -> dict[str, np.ndarray]:
    """Run one feed; returns every output by name."""
    names = [o.name for o in sess.get_outputs()]
    try:
        return dict(zip(names, sess.run(names, feeds, _QUIET_RUN), strict=False))
    except Exception as exc:
        shapes = ", ".join(f"{k}={list(v.shape)}" for k, v in feeds.items())
        message = str(exc).replace("\n", " ")
        raise LrdeployError(
            f"onnxruntime failed to run the model on inputs {shapes} (give real inputs with "
            f"--calib or sizes with --input-shape): {message}"
        ) from None


def probe_shapes(model: ir.Model, feeds: Feeds, value_names: Iterable[str]) -> dict[str, tuple]:
    """Concrete shapes of the named intermediate values for one feed."""
    outputs = run(session(model, list(value_names)), feeds)
    return {name: tuple(array.shape) for name, array in outputs.items()}
