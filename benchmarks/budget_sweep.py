"""Fidelity across plans of nearly equal latency: how far a column moves between neighbouring
plans of one way of choosing ranks, beside how far apart the ways are.

    .venv/bin/python benchmarks/budget_sweep.py [--model minilm] [--budget 0.9] [--window 0.06]
                                                [--plans 6] [--threads 1]

``benchmarks/budget.py`` compares one plan of each way per budget: a baseline's knob is bisected
to the largest value that fits, a planner keeps its least-error plan that fits. A column none of
them aims at can move between two plans of one way a knob step apart by more than the ways
differ: WordSim-353 against human scores (every way aims at the dense model's outputs; no plan
is chosen on human judgements). This script scores, for one budget B (a fraction of the dense
model's latency), ``--plans`` plans of each way with latencies spread over [B - window, B]:

    uniform energy, greedy MACs  knobs spread evenly between the knobs bisected (as budget.py
                                 bisects them) at B - window and at B
    planner svd, planner wsvd    the plan the planner returns at B, and frontier plans whose
                                 predicted latency is spread evenly over the window (biases
                                 corrected where the planner's own plan has them corrected)

Each plan is timed beside the dense model and scored as budget.py scores it. Printed: every plan
(knob or predicted latency, measured latency vs dense, the fidelity columns); then, for each way,
each column's mean and standard deviation over its plans measured within the window, and each
planner's mean less each baseline's, ± (sd1^2/n1 + sd2^2/n2)^(1/2) (plans of one way are not
independent draws: that spread is a guide to scale, not a test); then each column at the
window's middle on a least-squares line in measured latency through each way's plans, and the
planners less the baselines there: the ways at one latency, where their plans bunch at
different ends of the window.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics

import numpy as np
import onnx_ir as ir
from budget import (
    Task,
    baselines,
    beside_dense,
    bisect,
    make_planners,
    minilm_task,
    mobilenet_task,
)

from lrdeploy.latency import OnnxruntimeLatency
from lrdeploy.plan import Plan, apply_plan
from lrdeploy.targets.devices import get_device


def sweep(task: Task, budget: float, window: float, count: int, threads: int | None,
          error_feeds: int) -> list[dict]:
    """Every scored plan as a row: ``how``, ``knob``, ``vs_dense`` and the fidelity columns."""
    device = get_device("host")
    plain = task.analysis
    latency = OnnxruntimeLatency(device, threads=threads)
    dense_ms, measure = beside_dense(latency, plain.model, task.calib[0])
    print(f"\n== {task.name}: budget {budget:.0%}, window {budget - window:.0%} to "
          f"{budget:.0%}; dense onnxruntime {dense_ms:.3f} ms", flush=True)
    rows: list[dict] = []

    def score(how: str, knob: float, model: ir.Model) -> None:
        row = {"how": how, "knob": knob, "vs_dense": measure(model) / dense_ms,
               **task.fidelity(model).metrics}
        rows.append(row)
        print_row(row)

    for how, baseline in baselines(plain, device.simd_lanes).items():
        make, low, high = baseline.make, baseline.low, baseline.high
        _, least = bisect(make, plain, (budget - window) * dense_ms, measure, low, high)
        _, most = bisect(make, plain, budget * dense_ms, measure, low, high)
        for knob in np.linspace(least, most, count):
            score(how, float(knob), apply_plan(plain.model, make(float(knob)), plain.sites))
    for how, planner in make_planners(task, latency, error_feeds).items():
        outcome = planner.solve("ms", budget, relative=True)
        score(f"{how} (its plan)", outcome.predicted / outcome.dense, outcome.model)
        frontier, rest = planner.frontier("ms"), planner.rest("ms")
        picked = {_entries(outcome.plan)}
        for target in np.linspace(budget - window, budget, count):
            choice = frontier.best(target * outcome.dense - rest)
            plan = dataclasses.replace(planner.plan_of(choice.picks, "frontier"),
                                       bias_correction=outcome.plan.bias_correction)
            if _entries(plan) not in picked:
                picked.add(_entries(plan))
                score(how, (rest + choice.cost) / outcome.dense, planner.apply(plan))
    return rows


def _entries(plan: Plan) -> tuple:
    return tuple((e.site, e.method, tuple(e.ranks)) for e in plan.entries)


def _columns(row: dict) -> list[str]:
    return [k for k in row if k not in ("how", "knob", "vs_dense")]


def print_row(row: dict) -> None:
    columns = _columns(row)
    print(f"{row['how']:<24} knob {row['knob']:7.4f} vs dense {row['vs_dense']:6.3f}  "
          + "  ".join(f"{c} {row[c]:.4f}" for c in columns), flush=True)


def summarise(rows: list[dict], budget: float, window: float) -> None:
    columns = _columns(rows[0])
    inside: dict[str, list[dict]] = {}
    for row in rows:
        if budget - window <= row["vs_dense"] <= budget:
            inside.setdefault(row["how"].removesuffix(" (its plan)"), []).append(row)
    spread = {how: {c: (statistics.mean(r[c] for r in rs),
                        statistics.stdev(r[c] for r in rs) if len(rs) > 1 else math.nan,
                        len(rs))
                    for c in columns}
              for how, rs in inside.items()}
    print(f"\nplans measured within {budget - window:.0%} to {budget:.0%} of the dense latency: "
          "each column's mean ± standard deviation (n plans)")
    for how, cells in spread.items():
        print(f"{how:<16} " + "   ".join(f"{c} {m:.4f} ± {s:.4f} ({n})"
                                         for c, (m, s, n) in cells.items()))
    print("\nplanner mean - baseline mean, ± (sd1^2/n1 + sd2^2/n2)^(1/2)")
    for how, baseline in _planner_baseline_pairs(spread):
        cells = []
        for column in columns:
            (m1, s1, n1), (m2, s2, n2) = spread[how][column], spread[baseline][column]
            cells.append(f"{column} {m1 - m2:+.4f} ± {(s1**2 / n1 + s2**2 / n2) ** 0.5:.4f}")
        print(f"{how:<13} vs {baseline:<15} " + "   ".join(cells))
    # The ways' plans spread differently over the window (a baseline's bisected knobs can bunch
    # at one end), so means compare plans of different latencies; a line in latency through
    # each way's plans compares them at one latency.
    # A line through plans bunched in latency extrapolates their noise: such a way's mean is
    # used instead.
    middle = budget - window / 2
    spans = {how: max(r["vs_dense"] for r in rs) - min(r["vs_dense"] for r in rs) >= window / 2
             for how, rs in inside.items()}
    matched = {how: {c: _line_at([r["vs_dense"] for r in rs], [r[c] for r in rs], middle)
                        if spans[how] else statistics.mean(r[c] for r in rs)
                     for c in columns}
               for how, rs in inside.items()}
    print(f"\neach column at {middle:.0%} of the dense latency, on a least-squares line in "
          "measured latency through each way's plans within the window; where they span less "
          "than half of it, their mean (marked *); planner - baseline there")
    for how, cells in matched.items():
        print(f"{how + ('' if spans[how] else ' *'):<16} "
              + "   ".join(f"{c} {v:.4f}" for c, v in cells.items()))
    for how, baseline in _planner_baseline_pairs(matched):
        print(f"{how:<13} vs {baseline:<15} " + "   ".join(
            f"{c} {matched[how][c] - matched[baseline][c]:+.4f}" for c in columns))


def _planner_baseline_pairs(ways: dict[str, dict]) -> list[tuple[str, str]]:
    """Each planner way with each baseline way, in the order the ways were scored."""
    planners = [h for h in ways if h.startswith("planner")]
    return [(how, baseline) for how in planners for baseline in ways if baseline not in planners]


def _line_at(xs: list[float], ys: list[float], x: float) -> float:
    """The least-squares line through (xs, ys) at x."""
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(slope * x + intercept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=["minilm", "mobilenet"])
    parser.add_argument("--budget", type=float, default=0.9,
                        help="the budget, a fraction of the dense latency (default 0.9)")
    parser.add_argument("--window", type=float, default=0.06,
                        help="the plans' latencies spread over [budget - window, budget] "
                             "(default 0.06)")
    parser.add_argument("--plans", type=int, default=6, help="plans of each way (default 6)")
    parser.add_argument("--calib", type=int, default=64, help="calibration samples (default 64)")
    parser.add_argument("--error-feeds", type=int, default=32,
                        help="held-out samples the planners measure model errors on "
                             "(default 32; as benchmarks/budget.py)")
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime threads for every timing (0: its default)")
    args = parser.parse_args()
    if not 0 < args.window < args.budget <= 1 or args.plans < 2:
        parser.error("need 0 < --window < --budget <= 1 and --plans >= 2")
    task = {"minilm": minilm_task, "mobilenet": mobilenet_task}[args.model](args.calib)
    rows = sweep(task, args.budget, args.window, args.plans, args.threads or None,
                 args.error_feeds)
    summarise(rows, args.budget, args.window)


if __name__ == "__main__":
    main()
