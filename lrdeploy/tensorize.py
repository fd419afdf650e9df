"""Tensor-train matrices: the tensorized shape, the TT ranks, and the order in which the
activation absorbs the cores.

A weight W (K x N) applied as ``y = x @ W``, with K = k_1...k_d and N = n_1...n_d, is held as
TT cores G_i (r_{i-1}, k_i, n_i, r_i), r_0 = r_d = 1 (``decompositions.tt_matrix``):
``sum_i r_{i-1} k_i n_i r_i`` parameters instead of K N.

Contraction. The activation, reshaped to (batch..., k_1, ..., k_d), absorbs one core per step.
A step contracts the core's k_i and every bond the intermediate already holds (shared with an
absorbed neighbour), and brings in n_i and the bonds towards the cores not yet absorbed. It is
a Transpose (only when the contracted axes are not already the last ones), a Reshape to a
matrix and one MatMul with the core, which is constant and so permuted offline to match the
activation's axis order. Never an Einsum, never W itself.

Order. Which core goes first changes every intermediate's shape, so the cost depends on the
order, the batch and the device, not on FLOPs alone (t3f#222: 78% fewer FLOPs, no speedup). The
search is a dynamic programme over states, a state being the set of absorbed cores and the
intermediate's axis layout (the layout decides whether the next step needs a Transpose):

    best(state) = min over cores c not absorbed of  cost(step c from state) + best(state + c)

with ``cost`` the device latency of the step (``measured_step_cost``: its Transpose, Reshape
and MatMul timed by a latency model) or its FLOPs (``flop_cost``). The last state pays the
Transpose that puts n_1..n_d in place. With d <= 4 there are a few dozen states, so the
programme is exact over all d! orders; the contiguous ones (a growing interval of cores, as in
a matrix chain) are among them. opt_einsum's FLOP-optimal path, which may also multiply cores
together, is kept as a reference (``einsum_reference``).

Shape ("balance"). For d = 2..4 the splits of K and N into d factors (each >= 2) are
enumerated and the most balanced kept (least largest-to-smallest ratio); K's factors ascending
are paired with N's ascending and descending. TT ranks are uniform, the largest that fit the
parameter target. The naive split is TensorLy-Torch's (``prime_split``: the prime factors, the
two smallest merged until d remain). Survivors are the shapes at most as wrong as the naive
split or within ``ERROR_SLACK`` of the best; the chosen shape is the survivor with the least
latency at its best order, so it is never predicted slower than the naive split. Step sums miss
what happens between steps (copies, cache reuse), so when whole chains can be timed the
fastest few survivors and the naive split are timed whole, at their searched order and left to
right, and the fastest chain is kept.
"""

from __future__ import annotations

import functools
import math
from bisect import insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from lrdeploy.decompositions import tt_matrix, tt_matrix_dense

Axis = tuple[str, int]  # ("k", i) / ("n", i): core i's input / output mode; ("r", i): bond i|i+1
ERROR_SLACK = 0.10
FINALISTS = 3  # survivors timed as whole chains when a chain cost is given
TT_ORDERS = (2, 3, 4)


@dataclass(frozen=True)
class TTLayout:
    """A TT matrix's shape, inner ranks and contraction order (None: left to right)."""

    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    ranks: tuple[int, ...]
    order: tuple[int, ...] | None = None

    @property
    def d(self) -> int:
        return len(self.in_modes)

    @property
    def contraction_order(self) -> tuple[int, ...]:
        return self.order if self.order is not None else tuple(range(self.d))

    def bond(self, index: int) -> int:
        """Size of bond ``index`` (between cores index and index + 1); the ends are 1."""
        return self.ranks[index] if 0 <= index < self.d - 1 else 1

    @property
    def params(self) -> int:
        return sum(self.bond(i - 1) * k * n * self.bond(i)
                   for i, (k, n) in enumerate(zip(self.in_modes, self.out_modes, strict=True)))

    def size(self, axis: Axis) -> int:
        kind, index = axis
        return {"k": self.in_modes, "n": self.out_modes}[kind][index] if kind != "r" \
            else self.ranks[index]

    def problem(self, rows: int, cols: int) -> str | None:
        """Why this layout cannot hold a rows x cols matrix, or None."""
        d = self.d
        if d < 2 or len(self.out_modes) != d or len(self.ranks) != d - 1:
            return "needs d >= 2 input and output modes and d - 1 ranks"
        if math.prod(self.in_modes) != rows or math.prod(self.out_modes) != cols:
            return (f"modes {list(self.in_modes)} x {list(self.out_modes)} do not make "
                    f"{rows} x {cols}")
        full = max_tt_ranks(self.in_modes, self.out_modes)
        if not all(1 <= r <= f for r, f in zip(self.ranks, full, strict=True)):
            return f"ranks {list(self.ranks)} must be between 1 and {list(full)}"
        if self.order is not None and sorted(self.order) != list(range(d)):
            return f"order {list(self.order)} is not a permutation of 0..{d - 1}"
        return None

    def to_dict(self) -> dict:
        return {"in_modes": list(self.in_modes), "out_modes": list(self.out_modes),
                "order": list(self.contraction_order)}

    @classmethod
    def from_dict(cls, data: dict, ranks: Sequence[int]) -> TTLayout:
        return cls(tuple(int(m) for m in data["in_modes"]),
                   tuple(int(m) for m in data["out_modes"]), tuple(int(r) for r in ranks),
                   tuple(int(c) for c in data["order"]) if data.get("order") is not None
                   else None)


def max_tt_ranks(in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[int, ...]:
    """The rank of each bond at which the TT matrix is exact (the unfolding's size)."""
    sizes = [k * n for k, n in zip(in_modes, out_modes, strict=True)]
    return tuple(min(math.prod(sizes[: i + 1]), math.prod(sizes[i + 1:]))
                 for i in range(len(sizes) - 1))


# -- contraction steps ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One step of the contraction. ``axes`` is the intermediate's layout before it (batch axes
    excluded); ``perm`` the Transpose of those axes it needs first (None: none). A final step
    (``core`` None) only transposes the output modes into place."""

    core: int | None
    axes: tuple[Axis, ...]
    shape: tuple[int, ...]
    perm: tuple[int, ...] | None
    inner: int = 0
    cols: int = 0
    core_axes: tuple[Axis, ...] = ()  # the core's axes as the MatMul reads them
    after: tuple[Axis, ...] = ()
    after_shape: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return math.prod(self.shape) // max(self.inner, 1)


def _core_axes(layout: TTLayout, core: int) -> list[Axis]:
    axes = [("k", core), ("n", core)]
    if core > 0:
        axes.insert(0, ("r", core - 1))
    if core < layout.d - 1:
        axes.append(("r", core))
    return axes


def absorb(layout: TTLayout, axes: tuple[Axis, ...], core: int) -> Step:
    """The step that contracts the intermediate with layout ``axes`` with core ``core``."""
    own = _core_axes(layout, core)
    contracted = [a for a in axes if a in own]  # in the activation's order: no Transpose
    kept = [a for a in axes if a not in own]
    free = [a for a in own if a not in contracted]
    wanted = tuple(kept + contracted)
    perm = None if wanted == axes else tuple(axes.index(a) for a in wanted)
    after = tuple(kept + free)
    return Step(core, axes, tuple(layout.size(a) for a in axes), perm,
                inner=math.prod(layout.size(a) for a in contracted),
                cols=math.prod(layout.size(a) for a in free),
                core_axes=tuple(contracted + free), after=after,
                after_shape=tuple(layout.size(a) for a in after))


def finish(layout: TTLayout, axes: tuple[Axis, ...]) -> Step:
    """The final Transpose into n_1..n_d order (``perm`` None when they already are)."""
    wanted = tuple(("n", i) for i in range(layout.d))
    perm = None if wanted == axes else tuple(axes.index(a) for a in wanted)
    return Step(None, axes, tuple(layout.size(a) for a in axes), perm, after=wanted,
                after_shape=layout.out_modes)


def initial_axes(layout: TTLayout) -> tuple[Axis, ...]:
    return tuple(("k", i) for i in range(layout.d))


def contraction_steps(layout: TTLayout) -> list[Step]:
    """The steps of ``layout``'s contraction order, the final transpose last."""
    axes, steps = initial_axes(layout), []
    for core in layout.contraction_order:
        steps.append(absorb(layout, axes, core))
        axes = steps[-1].after
    steps.append(finish(layout, axes))
    return steps


StepCost = Callable[[Step], float]


def flop_cost(batch: int) -> StepCost:
    """FLOPs of a step's MatMul (2 per multiply-add) for ``batch`` activation vectors."""
    return lambda step: 0.0 if step.core is None else 2.0 * batch * step.rows * step.inner \
        * step.cols


def best_order(layout: TTLayout, cost: StepCost) -> tuple[tuple[int, ...], float]:
    """The contraction order of least total ``cost`` over all orders, and that cost (the
    dynamic programme of the module doc)."""
    d = layout.d

    @functools.cache
    def best(absorbed: frozenset[int], axes: tuple[Axis, ...]) -> tuple[float, tuple[int, ...]]:
        if len(absorbed) == d:
            return cost(finish(layout, axes)), ()
        options = []
        for core in range(d):
            if core not in absorbed:
                step = absorb(layout, axes, core)
                rest, order = best(absorbed | {core}, step.after)
                options.append((cost(step) + rest, (core, *order)))
        return min(options)

    total, order = best(frozenset(), initial_axes(layout))
    return order, total


def order_cost(layout: TTLayout, cost: StepCost) -> float:
    return sum(cost(step) for step in contraction_steps(layout))


def einsum_reference(layout: TTLayout, batch: int) -> tuple[list, float]:
    """opt_einsum's FLOP-optimal path for ``x @ TT`` and its FLOP count (2 per multiply-add,
    as ``flop_cost``), for comparison; the path may contract cores with each other."""
    import opt_einsum  # a reference only: not needed to compile

    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    symbol = {axis: next(letters) for i in range(layout.d) for axis in _core_axes(layout, i)}
    symbol[("b", 0)] = next(letters)
    x = symbol[("b", 0)] + "".join(symbol[("k", i)] for i in range(layout.d))
    cores = ["".join(symbol[a] for a in _core_axes(layout, i)) for i in range(layout.d)]
    out = symbol[("b", 0)] + "".join(symbol[("n", i)] for i in range(layout.d))
    shapes = [(batch, *layout.in_modes)] + [tuple(layout.size(a) for a in _core_axes(layout, i))
                                            for i in range(layout.d)]
    path, info = opt_einsum.contract_path(f"{x},{','.join(cores)}->{out}", *shapes,
                                          shapes=True, optimize="optimal")
    # opt_einsum counts a multiply-add as one operation when it reduces (its FLOP convention).
    return [list(step) for step in path], float(info.opt_cost)


# -- the chain as ONNX nodes ----------------------------------------------------------------------

class ChainBuilder:
    """Appends a TT contraction's nodes for an activation with ``batch_rank`` leading axes.
    Reshapes keep the leading axes with 0 (copy), so dynamic batch sizes keep working. When
    the activation's rank is unknown (``batch_rank`` None) its leading axes are flattened into
    one and restored at the end from its runtime shape."""

    def __init__(self, prefix: str, batch_rank: int | None,
                 add_constant: Callable[[str, np.ndarray], ir.Value]) -> None:
        self.prefix = prefix
        self.flattened = batch_rank is None
        self.batch_rank = 1 if batch_rank is None else batch_rank
        self.add_constant = add_constant
        self.nodes: list[ir.Node] = []
        self.constants = 0

    def add_node(self, op: str, inputs: list[ir.Value], **attributes) -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes,
                       name=f"{self.prefix}_{len(self.nodes)}")
        self.nodes.append(node)
        return node.outputs[0]

    def constant(self, array: Sequence[int]) -> ir.Value:
        self.constants += 1
        return self.add_constant(f"{self.prefix}_shape_{self.constants}",
                                 np.array(array, dtype=np.int64))

    def reshape(self, x: ir.Value, dims: Sequence[int], lead: Sequence[int] | None = None
                ) -> ir.Value:
        """Reshape to the leading axes (copied, or ``lead``) followed by ``dims``."""
        lead = [0] * self.batch_rank if lead is None else list(lead)
        return self.add_node("Reshape", [x, self.constant([*lead, *dims])])

    def unflatten(self, y: ir.Value, x: ir.Value, last: int) -> ir.Value:
        """``y`` (rows, last) reshaped to ``x``'s leading axes followed by ``last``."""
        leading = self.add_node("Slice", [self.add_node("Shape", [x]), self.constant([0]),
                                          self.constant([-1])])
        shape = self.add_node("Concat", [leading, self.constant([last])], axis=0)
        return self.add_node("Reshape", [y, shape])

    def transpose(self, x: ir.Value, perm: Sequence[int]) -> ir.Value:
        lead = list(range(self.batch_rank))
        return self.add_node("Transpose", [x], perm=lead + [self.batch_rank + p for p in perm])

    def step(self, x: ir.Value, step: Step, matrix: ir.Value | None, flat: bool) -> ir.Value:
        """``x`` is the intermediate, laid out as ``step.axes`` or, when ``flat``, as the
        previous MatMul's (rows, cols); the result is flat unless the step is the final one."""
        if step.perm is not None:
            if flat:
                x = self.reshape(x, step.shape)
            x = self.transpose(x, step.perm)
            flat = False
        if step.core is None:
            return x if not flat else self.reshape(x, step.after_shape)
        return self.add_node("MatMul", [self.reshape(x, [-1, step.inner]), matrix])


def core_matrix(layout: TTLayout, cores: Sequence[np.ndarray], step: Step) -> np.ndarray:
    """Core ``step.core`` permuted and reshaped to the (inner, cols) matrix the step reads."""
    core = cores[step.core]
    axes = [("r", step.core - 1), ("k", step.core), ("n", step.core), ("r", step.core)]
    if step.core == 0:
        core, axes = core[0], axes[1:]
    if step.core == layout.d - 1:
        core, axes = core[..., 0], axes[:-1]
    order = [axes.index(a) for a in step.core_axes]
    return np.transpose(core, order).reshape(step.inner, step.cols)


def build_chain(builder: ChainBuilder, x: ir.Value, layout: TTLayout,
                cores: Sequence[np.ndarray], scale: float = 1.0) -> ir.Value:
    """The nodes computing ``x @ W`` (x: (batch..., K)) from the cores, appended to
    ``builder``; ``scale`` multiplies the result (folded into the last core)."""
    steps = contraction_steps(layout)
    # ``flat``: the value has the right leading axes but not the labelled layout, which a
    # step reshapes to only when it must transpose.
    value, flat = x, True
    if builder.flattened:
        value, flat = builder.reshape(x, layout.in_modes, lead=[-1]), False
    for index, step in enumerate(steps):
        if step.core is None and step.perm is None:
            break
        matrix = None
        if step.core is not None:
            array = core_matrix(layout, cores, step)
            if index == len(steps) - 2:
                array = array * scale
            matrix = builder.add_constant(f"{builder.prefix}_core{step.core}", array)
        value = builder.step(value, step, matrix, flat)
        flat = step.core is not None
    if builder.flattened:
        return builder.unflatten(value, x, math.prod(layout.out_modes))
    return builder.reshape(value, [math.prod(layout.out_modes)])


def _timing_model(name: str, batch: Sequence[int], input_dims: Sequence[int],
                  emit: Callable[[ChainBuilder, ir.Value], ir.Value]) -> ir.Model:
    """A float32 model of the nodes ``emit`` appends for an input (batch..., input_dims)."""
    initializers: list[ir.Value] = []

    def add_constant(label: str, array: np.ndarray) -> ir.Value:
        array = array if array.dtype == np.int64 else array.astype(np.float32)
        tensor = ir.tensor(array, name=label)
        value = ir.Value(name=label, shape=ir.Shape(array.shape),
                         type=ir.TensorType(tensor.dtype), const_value=tensor)
        initializers.append(value)
        return value

    builder = ChainBuilder(name, len(batch), add_constant)
    x = ir.Value(name="x", shape=ir.Shape([*batch, *input_dims]),
                 type=ir.TensorType(ir.DataType.FLOAT))
    y = emit(builder, x)
    y.name = "y"
    graph = ir.Graph([x], [y], nodes=builder.nodes, initializers=initializers,
                     opset_imports={"": 17}, name=name)
    return ir.Model(graph, ir_version=9)


def step_model(step: Step, batch: Sequence[int]) -> ir.Model:
    """One step alone (its Transpose, Reshape and MatMul with a random core), to time it."""
    def emit(builder: ChainBuilder, x: ir.Value) -> ir.Value:
        matrix = None
        if step.core is not None:
            core = np.random.default_rng(0).standard_normal((step.inner, step.cols))
            matrix = builder.add_constant("core", core)
        return builder.step(x, step, matrix, flat=False)

    return _timing_model("tt_step", batch, step.shape, emit)


def chain_model(layout: TTLayout, batch: Sequence[int]) -> ir.Model:
    """The whole chain for an input (batch..., K), with random cores (values do not change
    its time), to time it."""
    rng = np.random.default_rng(0)
    cores = [rng.standard_normal((layout.bond(i - 1), k, n, layout.bond(i)))
             for i, (k, n) in enumerate(zip(layout.in_modes, layout.out_modes, strict=True))]
    return _timing_model("tt_chain", batch, [math.prod(layout.in_modes)],
                         lambda builder, x: build_chain(builder, x, layout, cores))


# Orders that contract a middle core first carry two rank axes at once: at 4096 x 4096, batch
# 32 and rank 79 such an intermediate is 3.3 GB. They are never the fast order, and timing them
# took minutes and 7 GB of memory, so a step whose input or output exceeds this is not timed.
MAX_TIMED_STEP_BYTES = 256 << 20


def measured_step_cost(latency, batch: Sequence[int]) -> StepCost:
    """Step cost = its latency (ms) from ``latency`` (a ``lrdeploy.latency.LatencyModel``,
    cached per device: a step shape is timed once). A final step with nothing to transpose
    costs nothing; a step over ``MAX_TIMED_STEP_BYTES`` costs infinity (float32)."""

    @functools.cache
    def cost(step: Step) -> float:
        if step.core is None and step.perm is None:
            return 0.0
        largest = max(math.prod(step.shape), math.prod(step.after_shape)) * math.prod(batch)
        if 4 * largest > MAX_TIMED_STEP_BYTES:
            return math.inf
        return latency.chain_ms([step_model(step, batch)])[0]

    return cost


ChainCost = Callable[[TTLayout], float]


def measured_chain_cost(latency, batch: Sequence[int]) -> ChainCost:
    """Chain cost = the whole chain's latency (ms) from ``latency``."""
    return lambda layout: latency.chain_ms([chain_model(layout, batch)])[0]


# -- shapes and ranks ----------------------------------------------------------------------------

def factorizations(n: int, d: int, least: int = 2) -> list[tuple[int, ...]]:
    """Every way to write ``n`` as a non-decreasing product of ``d`` factors >= ``least``."""
    if d == 1:
        return [(n,)] if n >= least else []
    out = []
    factor = least
    while factor ** d <= n:
        if n % factor == 0:
            out += [(factor, *rest) for rest in factorizations(n // factor, d - 1, factor)]
        factor += 1
    return out


def prime_split(n: int, d: int) -> tuple[int, ...] | None:
    """TensorLy-Torch's tensorized shape: the prime factors of ``n``, the two smallest merged
    until ``d`` remain (None when ``n`` has fewer than ``d`` prime factors)."""
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    if len(primes) < d:
        return None
    while len(primes) > d:
        a, b, *primes = primes
        insort(primes, a * b)
    return tuple(primes)


def balanced_splits(n: int, d: int, keep: int) -> list[tuple[int, ...]]:
    """The ``keep`` most balanced factorizations of ``n`` into ``d`` factors."""
    return sorted(factorizations(n, d), key=lambda f: (f[-1] / f[0], f))[:keep]


def shape_candidates(rows: int, cols: int, orders: Sequence[int] = TT_ORDERS, keep: int = 2
                     ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(in_modes, out_modes) pairs to try: the naive split first, then balanced ones."""
    out = []
    for d in orders:
        naive_in, naive_out = prime_split(rows, d), prime_split(cols, d)
        if naive_in and naive_out:
            out.append((naive_in, naive_out))
        for k in balanced_splits(rows, d, keep):
            for n in balanced_splits(cols, d, keep):
                out += [(k, n), (k, n[::-1])]
    return list(dict.fromkeys(out))


def fit_ranks(in_modes: tuple[int, ...], out_modes: tuple[int, ...], params: int
              ) -> tuple[int, ...] | None:
    """The largest uniform TT rank (capped per bond) whose cores fit in ``params``."""
    full = max_tt_ranks(in_modes, out_modes)

    def ranks(r: int) -> tuple[int, ...]:
        return tuple(min(r, f) for f in full)

    low, high = 0, max(full)
    while low < high:
        mid = (low + high + 1) // 2
        if TTLayout(in_modes, out_modes, ranks(mid)).params <= params:
            low = mid
        else:
            high = mid - 1
    return ranks(low) if low >= 1 else None


def tt_error(weight: np.ndarray, layout: TTLayout) -> float:
    """Relative Frobenius error of the TT-SVD of ``weight`` at ``layout``'s shape and ranks."""
    cores = tt_matrix(weight, layout.in_modes, layout.out_modes, layout.ranks)
    approx = tt_matrix_dense(cores)
    return float(np.linalg.norm(approx - weight) / max(np.linalg.norm(weight), 1e-300))


@dataclass
class ShapeOption:
    layout: TTLayout  # with its best order
    error: float
    latency: float
    naive_order_latency: float
    naive: bool = False


@dataclass
class ShapeChoice:
    chosen: ShapeOption
    naive: ShapeOption | None
    options: list[ShapeOption] = field(default_factory=list)


def choose_shape(weight: np.ndarray, params: int, cost: StepCost,
                 orders: Sequence[int] = TT_ORDERS, keep: int = 2,
                 chain_cost: ChainCost | None = None) -> ShapeChoice | None:
    """The TT shape, ranks and order for ``weight`` within ``params`` (see the module doc);
    None when no shape fits.

    With ``chain_cost`` the step sums only rank the survivors: the ``FINALISTS`` fastest and
    the naive split are then timed as whole chains, each at its searched order and left to
    right (a chain loses or gains more than its steps: copies between them, cache reuse), and
    the fastest chain wins."""
    rows, cols = weight.shape
    naive_shapes = {(prime_split(rows, d), prime_split(cols, d)) for d in orders}
    scored = []
    for in_modes, out_modes in shape_candidates(rows, cols, orders, keep):
        ranks = fit_ranks(in_modes, out_modes, params)
        if ranks is None:
            continue
        layout = TTLayout(in_modes, out_modes, ranks)
        scored.append((layout, tt_error(weight, layout), (in_modes, out_modes) in naive_shapes))
    if not scored:
        return None
    best_error = min(error for _, error, _ in scored)
    naive_errors = [error for _, error, naive in scored if naive]
    bar = max([best_error * (1 + ERROR_SLACK), *naive_errors])
    options = []
    for layout, error, naive in scored:
        if error > bar:
            continue
        order, latency = best_order(layout, cost)
        options.append(ShapeOption(replace(layout, order=order), error, latency,
                                   order_cost(layout, cost), naive))
    if chain_cost is not None:
        ranked = sorted(options, key=lambda o: o.latency)
        options = ranked[:FINALISTS] + [o for o in ranked[FINALISTS:] if o.naive]
        for option in options:
            timed = {order: chain_cost(replace(option.layout, order=order))
                     for order in {option.layout.order, tuple(range(option.layout.d))}}
            order = min(timed, key=timed.get)
            option.layout = replace(option.layout, order=order)
            option.latency = timed[order]
            option.naive_order_latency = timed[tuple(range(option.layout.d))]
    chosen = min(options, key=lambda o: (o.latency, o.error))
    naive = [o for o in options if o.naive]
    return ShapeChoice(chosen, min(naive, key=lambda o: o.error) if naive else None, options)
