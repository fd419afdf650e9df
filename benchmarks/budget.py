"""The latency-budget planner against the usual baselines, on this machine (``--target host``,
latency measured with onnxruntime), side by side in one run.

    .venv/bin/python benchmarks/budget.py [--models minilm mobilenet] [--budgets 0.9 0.75 0.6]
                                          [--threads 1]

Timings use one onnxruntime thread by default (``--threads``): on this 2-core shared VM, two
fresh-session timings of the same model with two threads differ by 5% and at times by 70%, with
one thread far less, and the budget check is only as good as the timing.

For each model and each budget (a fraction of the dense model's onnxruntime latency, measured
first), four ways of choosing ranks each meet the budget (each aiming the planner's 2% margin
under it), then all are timed again beside the dense model (as the planner checks a plan:
fresh sessions, single runs alternating, the median ratio within a pair) and scored for
fidelity on held-out data:

    uniform energy  one energy:E for every site (MNN-style), E bisected on measured latency
    greedy MACs     per-layer ranks by a greedy error-per-MAC rule (AIMET-style), the MAC
                    target bisected on measured latency
    planner svd     lrdeploy's planner, plain SVD factors
    planner wsvd    lrdeploy's planner, data-aware: whitened or plain SVD factors at each site,
                    whichever errs less

Both planners fit their statistics on the first three quarters of the calibration samples and
measure every error on the last quarter (``lrdeploy.calibration.split_calibration``), as
``lrdeploy plan --calib`` does. The planners correct their plan's biases by the calibration
input means where that measures closer to the dense model on those samples; the baselines
(plain SVD on the weights) are offered the same correction by the same rule, so that the rows
differ in the choice of ranks alone. A row whose biases are corrected is marked "+bias".

At the tightest budget, the data-aware plan's ranks are also given plain and whitened SVD
factors, each without and with the bias correction, to separate what whitening and the
correction each bring. Models and data (all from PyPI packages,
see benchmarks/requirements.txt):
    MiniLM-L6 (all-MiniLM-L6-v2, seq 128, traced from torch): calibration texts from gensim's
    lee_background.cor at three lengths (passages, sentences, single words: half of them);
    fidelity:
    embedding cosine vs dense, Lee document-similarity Pearson and WordSim-353 Spearman
    against the human scores, and (wordsim_vs_dense) the Spearman correlation of the WordSim
    pairs' cosine similarities with the dense model's: how well the dense model's ranking of
    word similarities is kept, apart from how well it agrees with people; (dictionary_vs_dense)
    the same over every pair of 400 other single-token dictionary words (from gensim's
    SimLex-999 and word-analogy files), 79,800 pairs against WordSim's 353: a column that
    sampling noise moves far less, to tell a systematic loss of word-similarity structure
    from the luck of WordSim's pairs (not resampled below: its pairs share words);
    (dictionary_error, lower is better) the relative L2 error of those 400 words' embeddings
    against the dense model's, pooled: the planners' own objective (``Planner.model_error``),
    on single words none of them was calibrated or measured on. It tells a plan that keeps
    the words' embeddings close but not their similarity ranking (dictionary_vs_dense) from
    one that keeps neither.
    MobileNetV2 (ImageNet weights, traced from torch): calibration images from scikit-image's
    photos; fidelity: top-1 agreement and KL(dense || low-rank) on foolbox's 20 ImageNet images.

After each table, each planner row is set against each baseline row of its budget on every
column whose items can be resampled (cosine and the two WordSim columns on MiniLM, all three on
MobileNetV2): the difference and its standard deviation over paired bootstrap resamplings of
the items (documents, WordSim's 353 pairs, the 20 images), a cell where the planner is worse
marked "<", and "<<" where by more than two standard deviations. A WordSim difference has a
standard deviation of 0.01 to 0.03, and one image of 20 is a top-1 difference of 0.05 with a
standard deviation of about 0.05: the block says which differences the data can tell apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

import lrdeploy  # noqa: E402
from lrdeploy import runtime  # noqa: E402
from lrdeploy.analysis import ModelAnalysis, analyze_model  # noqa: E402
from lrdeploy.calibration import site_statistics, split_calibration  # noqa: E402
from lrdeploy.latency import OnnxruntimeLatency  # noqa: E402
from lrdeploy.methods import DENSE, PLAIN  # noqa: E402
from lrdeploy.plan import Plan, PlanEntry, apply_plan, make_plan  # noqa: E402
from lrdeploy.planner import NOISE_MARGIN, Planner, rank_grid  # noqa: E402
from lrdeploy.ranks import RankRule  # noqa: E402
from lrdeploy.sites import model_params  # noqa: E402
from lrdeploy.targets.devices import get_device  # noqa: E402

BISECTION_STEPS = 7
BOOTSTRAP_DRAWS = 1000
DICTIONARY_WORDS = 400  # 79,800 pairs for dictionary_vs_dense
RESAMPLED = "resampled"  # a row's key for its Fidelity.resampled
BIAS_MARK = " +bias"  # in a row's name: its biases are corrected by the calibration means
LOWER_IS_BETTER = {"kl", "dictionary_error"}


@dataclasses.dataclass
class Task:
    name: str
    analysis: ModelAnalysis
    calib: list[runtime.Feeds]
    fidelity: Callable[[ir.Model], Fidelity]
    headline: str  # the fidelity column the table sorts attention on


class Resampled(NamedTuple):
    """A fidelity column as ``statistic(*arrays)``, each array holding one entry per item (a
    WordSim pair, a document, an image), the same items in every row: what
    ``bootstrap_spread`` resamples to say how far apart two rows really are."""

    arrays: tuple[np.ndarray, ...]
    statistic: Callable[..., float]

    @property
    def value(self) -> float:
        return self.statistic(*self.arrays)

    def at(self, chosen: np.ndarray) -> float:
        return self.statistic(*(a[chosen] for a in self.arrays))


class Fidelity(NamedTuple):
    """A row's fidelity columns, and those of them whose items can be resampled (not Lee's
    Pearson nor dictionary_vs_dense: their pairs share documents and words)."""

    metrics: dict[str, float]
    resampled: dict[str, Resampled]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _relative_error(a: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(a - reference) / np.linalg.norm(reference))


def _mean(a: np.ndarray) -> float:
    return float(np.mean(a))


def _session_outputs(model: ir.Model, feeds: list[runtime.Feeds]) -> np.ndarray:
    session = runtime.session(model)
    return np.stack([next(iter(runtime.run(session, f).values()))[0] for f in feeds])


def minilm_task(calib_count: int) -> Task:
    import minilm_l6 as m

    ids, mask = m.tokenize(["calibration"], 128)
    loaded = lrdeploy.load(m.minilm_l6(), example_inputs=_torch(ids, mask))
    names = [v.name for v in runtime.graph_inputs(loaded.canonical)]

    def feeds_of(sentences: list[str]) -> list[runtime.Feeds]:
        ids, mask = m.tokenize(sentences, 128)
        return [{names[0]: ids[i:i + 1], names[1]: mask[i:i + 1]} for i in range(len(ids))]

    calib = feeds_of(minilm_calibration_texts(calib_count))
    documents = feeds_of(m.lee_documents())
    first, second, human = m.wordsim_pairs()
    words = sorted(set(first) | set(second))
    word_feeds = feeds_of(words)
    dictionary_feeds = feeds_of(m.dictionary_words(DICTIONARY_WORDS, set(words)))
    index = {w: i for i, w in enumerate(words)}
    analysis = analyze_model(loaded.canonical, probe_feed=calib[0])
    dense_docs = _session_outputs(loaded.canonical, documents)
    dense_words = _session_outputs(loaded.canonical, word_feeds)
    dense_pairs = m.wordsim_cosines(lambda ws: dense_words[[index[w] for w in ws]])
    dense_dictionary_vectors = _session_outputs(loaded.canonical, dictionary_feeds)
    dense_dictionary = m.pair_cosines(dense_dictionary_vectors)

    def fidelity(model: ir.Model) -> Fidelity:
        docs = _session_outputs(model, documents)
        vectors = _session_outputs(model, word_feeds)
        pairs = m.wordsim_cosines(lambda ws: vectors[[index[w] for w in ws]])
        cosines = np.array([_cosine(a, b) for a, b in zip(docs, dense_docs, strict=True)])
        dictionary_vectors = _session_outputs(model, dictionary_feeds)
        dictionary = m.pair_cosines(dictionary_vectors)
        # wordsim_spearman is m.wordsim_spearman, from the pair cosines already at hand
        resampled = {"cosine": Resampled((cosines,), _mean),
                     "wordsim_spearman": Resampled((pairs, human), _spearman),
                     "wordsim_vs_dense": Resampled((pairs, dense_pairs), _spearman)}
        return Fidelity({"cosine": resampled["cosine"].value,
                         "lee_pearson": m.lee_pearson(docs),
                         "wordsim_spearman": resampled["wordsim_spearman"].value,
                         "wordsim_vs_dense": resampled["wordsim_vs_dense"].value,
                         "dictionary_vs_dense": _spearman(dictionary, dense_dictionary),
                         "dictionary_error": _relative_error(dictionary_vectors,
                                                             dense_dictionary_vectors)},
                        resampled)

    return Task("MiniLM-L6 (seq 128)", analysis, calib, fidelity, "lee_pearson")


def minilm_calibration_texts(count: int) -> list[str]:
    """Calibration texts at the lengths the model is used at, from Lee's background corpus (not
    from the evaluation data): of every four, a passage of five sentences (most of the 128
    positions hold text, as in a Lee document), a sentence, and two single words of a sentence
    (short queries, as WordSim's): the model is judged on long texts and on single words
    alike, so each is half of the data. Every four hold every kind, so the held-out last
    quarter (the planner's error feeds) sees them all. A word is a content word of its
    sentence (not one of the corpus's 200 most frequent), as a query is."""
    import minilm_l6 as m

    sentences = iter(m.calibration_sentences(3 * count + 12, seed=0))
    common = m.common_words(200)
    rng = random.Random(0)
    texts = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            texts.append(" ".join(next(sentences) for _ in range(5)))
        elif kind == 2:
            texts.append(next(sentences))
        else:
            words = []
            while not words:
                words = [w for w in re.findall(r"[a-z]{4,}", next(sentences).lower())
                         if w not in common]
            texts.append(rng.choice(words))
    return texts


def mobilenet_task(calib_count: int) -> Task:
    import mobilenet_v2 as m

    images, labels = m.imagenet_samples()
    loaded = lrdeploy.load(m.mobilenet_v2(), example_inputs=_torch(images[:1]))
    name = runtime.graph_inputs(loaded.canonical)[0].name
    # At most 32 of the 36 photos: the held-out last quarter of 32 holds whole photo / mirror
    # pairs (of 36 it would split one, its mirror image left in the fitting samples).
    calib = [{name: x[None]} for x in skimage_photos(min(calib_count, 32))]
    evaluation = [{name: x[None]} for x in images]
    analysis = analyze_model(loaded.canonical, probe_feed=calib[0])
    dense = _session_outputs(loaded.canonical, evaluation)

    def fidelity(model: ir.Model) -> Fidelity:
        logits = _session_outputs(model, evaluation)
        p, q = _softmax(dense), _softmax(logits)
        kl = np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)
        resampled = {"top1_agreement": Resampled((dense.argmax(1) == logits.argmax(1),), _mean),
                     "kl": Resampled((kl,), _mean),
                     "top1_accuracy": Resampled((logits.argmax(1) == labels,), _mean)}
        return Fidelity({name: column.value for name, column in resampled.items()}, resampled)

    return Task("MobileNetV2 (224)", analysis, calib, fidelity, "top1_agreement")


def skimage_photos(count: int) -> list[np.ndarray]:
    """Colour photos bundled with scikit-image, centre-cropped and flipped, ImageNet-normalised."""
    from mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD
    from PIL import Image

    # The 13th to 16th photos are the held-out quarter of 32 images (``split_calibration``
    # holds out the last quarter), where the planners measure every model error: an animal,
    # an object, a vehicle and a texture, like the photos the model is judged on. Before,
    # they were brick, grass, gravel and the moon: textures alone.
    names = ("astronaut", "motorcycle_left", "motorcycle_right", "hubble_deep_field", "retina",
             "color", "horse", "camera", "coins", "brick", "gravel", "moon", "chelsea", "coffee",
             "rocket", "grass", "page", "text")
    files = {Path(str(e)).stem: e.locate() for e in importlib.metadata.files("scikit-image")
             if re.match(r"skimage/data/\w+\.(png|jpg)$", str(e))}
    out = []
    for name in names:
        image = Image.open(files[name]).convert("RGB")
        side = min(image.size)
        left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((224, 224))
        pixels = (np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        out += [pixels.transpose(2, 0, 1), pixels[:, ::-1].transpose(2, 0, 1)]
    return [np.ascontiguousarray(x) for x in out[:count]]


def _torch(*arrays):
    import torch

    return [torch.from_numpy(a) for a in arrays]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# -- baselines ---------------------------------------------------------------------------------

def uniform_plan(analysis: ModelAnalysis, energy: float) -> Plan:
    return make_plan(analysis, RankRule("energy", energy))


def greedy_plan(analysis: ModelAnalysis, mac_fraction: float, lanes: int) -> Plan:
    """AIMET-style greedy: starting dense, repeatedly lower the rank of the site whose next
    grid step costs the least weight error per MAC saved, until the sites' MACs are at most
    ``mac_fraction`` of the dense ones."""
    menus, position = {}, {}
    for site in analysis.sites:
        spectra = analysis.spectra(site, "svd" if not site.is_conv or site.kernel == (1, 1)
                                   else "tucker2")
        if spectra is None:
            continue
        energy = [np.asarray(s, np.float64) ** 2 for s in spectra.spectra]
        steps = [(DENSE, (), site.flops or 0, 0.0)]
        fractions = sorted({r / spectra.full_ranks[0] for r in
                            rank_grid(spectra.full_ranks[0], lanes)}, reverse=True)
        for fraction in fractions:
            ranks = tuple(max(1, round(fraction * f)) for f in spectra.full_ranks)
            if not spectra.is_profitable(ranks):
                continue
            error = sum(e[r:].sum() / e.sum() for e, r in zip(energy, ranks, strict=True))
            flops = spectra.rule.cost(site, ranks).flops or 0
            steps.append((spectra.rule.method, ranks, flops, error))
        menus[site.name], position[site.name] = steps, 0
    total = sum(m[0][2] for m in menus.values())
    current = total
    while current > mac_fraction * total:
        best, best_score = None, np.inf
        for name, steps in menus.items():
            here = position[name]
            if here + 1 < len(steps):
                saved = steps[here][2] - steps[here + 1][2]
                score = (steps[here + 1][3] - steps[here][3]) / max(saved, 1)
                if saved > 0 and score < best_score:
                    best, best_score = name, score
        if best is None:
            break
        position[best] += 1
        current -= menus[best][position[best] - 1][2] - menus[best][position[best]][2]
    entries = []
    for site in analysis.sites:
        method, ranks, _, _ = menus.get(site.name, [(DENSE, (), 0, 0)])[position.get(site.name, 0)]
        entries.append(PlanEntry(site.name, method, list(ranks), "greedy MACs"))
    return Plan(entries)


class Baseline(NamedTuple):
    """A baseline way of choosing ranks: its plan at a knob value, the knob's range, and its
    rows' name with the knob (a ``str.format`` pattern)."""

    make: Callable[[float], Plan]
    low: float
    high: float
    label: str


def baselines(analysis: ModelAnalysis, lanes: int) -> dict[str, Baseline]:
    return {"uniform energy": Baseline(lambda e: uniform_plan(analysis, e), 0.3, 0.999,
                                       "uniform energy:{:.3f}"),
            "greedy MACs": Baseline(lambda f: greedy_plan(analysis, f, lanes), 0.05, 1.0,
                                    "greedy MACs {:.2f}")}


def bisect(make: Callable[[float], Plan], analysis: ModelAnalysis, budget: float,
           measure: Callable[[ir.Model], float], low: float, high: float
           ) -> tuple[Plan, float, bool]:
    """The plan at the largest knob value in [low, high] whose measured latency is within the
    budget less the planner's ``NOISE_MARGIN``: measured as the planner measures (beside the
    dense model; a fit is timed again and the slower timing counts) and aimed as it aims, so
    that every way of choosing ranks gets the same latency. Also whether it fitted: when no
    knob value did, the plan at ``low`` (the cheapest), which missed."""
    budget *= 1 - NOISE_MARGIN
    best = None
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        plan = make(middle)
        model = apply_plan(analysis.model, plan, analysis.sites)
        ms = measure(model)
        if ms <= budget:
            ms = max(ms, measure(model))
        if ms <= budget:
            best, low = (plan, middle, True), middle
        else:
            high = middle
    return best or (make(low), low, False)


# -- the run -----------------------------------------------------------------------------------

def beside_dense(latency: OnnxruntimeLatency, dense: ir.Model, feed: runtime.Feeds
                 ) -> tuple[float, Callable[[ir.Model], float]]:
    """The dense model's time, and a timing of any model as the planner times a plan: beside
    the dense model, the ratio scaled to that time."""
    dense_ms = latency.side_by_side_ms([dense], feed)[0]

    def measure(model: ir.Model) -> float:
        model_ms, reference_ms = latency.pair_ms(model, dense, feed)
        return model_ms / reference_ms * dense_ms

    return dense_ms, measure


def make_planners(task: Task, latency: OnnxruntimeLatency, error_feeds: int
                  ) -> dict[str, Planner]:
    """The plain-SVD and the data-aware planner on ``--target host``, both with the calibration
    statistics of the first three quarters of the samples and measuring model errors on (at
    most ``error_feeds`` of) the last quarter."""
    plain = task.analysis
    aware = dataclasses.replace(plain, _spectra={})
    split = split_calibration(task.calib)
    aware.grams, aware.means = site_statistics(plain.model, plain.sites, split.fit)
    probe = split.held_out[:error_feeds]
    return {how: Planner(aware, latency.device, latency, probe, data_aware=data_aware,
                         error_feeds=len(probe))
            for how, data_aware in (("planner svd", False), ("planner wsvd", True))}


def run_task(task: Task, fractions: list[float], threads: int | None, error_feeds: int
             ) -> list[dict]:
    device = get_device("host")
    feed = task.calib[0]
    started = time.time()
    print(f"\n== {task.name}: {len(task.analysis.sites)} sites", flush=True)
    plain = task.analysis
    latency = OnnxruntimeLatency(device, threads=threads)
    dense_ms, measure = beside_dense(latency, plain.model, feed)
    print(f"dense onnxruntime {dense_ms:.3f} ms", flush=True)
    planners = make_planners(task, latency, error_feeds)
    aware = planners["planner wsvd"].analysis
    print(f"candidates and sensitivities ready ({time.time() - started:.0f} s)", flush=True)
    configs: list[dict] = [{"budget": None, "how": "dense ONNX", "model": plain.model}]
    for fraction in fractions:
        budget = fraction * dense_ms
        for baseline in baselines(plain, device.simd_lanes).values():
            plan, knob, fitted = bisect(baseline.make, plain, budget, measure, baseline.low,
                                        baseline.high)
            # The planners keep the bias correction where it measures closer to the dense
            # model on their feeds; the baselines are offered the same, so that the rows
            # compare the choice of ranks alone.
            plan, model, _ = planners["planner svd"].bias_correction_if_better(
                plan, apply_plan(plain.model, plan, plain.sites))
            how = baseline.label.format(knob) + BIAS_MARK * plan.bias_correction
            if not fitted:
                print(f"{how} at {fraction:.0%}: no knob value met the budget; the cheapest "
                      "plan is shown", flush=True)
                how += " MISSED"
            configs.append({"budget": fraction, "how": how, "model": model})
        for how, planner in planners.items():
            try:
                outcome = planner.solve("ms", fraction, relative=True)
            except lrdeploy.LrdeployError as exc:
                print(f"{how} at {fraction:.0%}: {exc}", flush=True)
                configs.append({"budget": fraction, "how": f"{how}: refused", "model": None})
                continue
            print(f"{how} at {fraction:.0%}: predicted {outcome.predicted:.3f} ms, measured "
                  f"{outcome.measured:.3f} ms in {len(outcome.attempts)} attempt(s); relative "
                  f"output error predicted {outcome.predicted_error:.4f}, measured "
                  f"{outcome.measured_error:.4f}"
                  f"{' (biases corrected)' if outcome.plan.bias_correction else ''}", flush=True)
            configs.append({"budget": fraction, "planner": how, "model": outcome.model,
                            "how": how + BIAS_MARK * outcome.plan.bias_correction,
                            "plan": outcome.plan})
        print(f"budget {fraction:.0%} planned ({time.time() - started:.0f} s)", flush=True)
    # Equal ranks, plain vs whitened factors, each without and with the bias correction: the
    # data-aware plan at the tightest budget.
    aware_plans = [c for c in configs if c.get("planner") == "planner wsvd"]
    if aware_plans:
        tightest = min(aware_plans, key=lambda c: c["budget"])["plan"]
        plain_entries = [PlanEntry(e.site, PLAIN.get(e.method, e.method), e.ranks)
                         for e in tightest.entries]
        for how, entries in (("plain SVD", plain_entries), ("whitened SVD", tightest.entries)):
            for corrected in (False, True):
                configs.append({"budget": None,
                                "how": f"same ranks, {how}{' + bias' * corrected}",
                                "model": apply_plan(plain.model, Plan(entries, bias_correction=
                                                                      corrected),
                                                    aware.sites, aware.grams, aware.means)})
    # Each configuration is timed again beside the dense model (fresh sessions, alternating
    # runs), exactly as the planner checks a plan; ratios to dense are then what a shared
    # machine's changing load does not move.
    ratios: dict[int, float] = {}
    for config in configs[1:]:
        if config["model"] is not None:
            model_ms, reference_ms = latency.pair_ms(config["model"], plain.model, feed)
            ratios[id(config)] = model_ms / reference_ms
    rows = []
    for config in configs:
        row = {"model": task.name, "budget": config["budget"], "how": config["how"]}
        if config["model"] is None:
            rows.append(row)
            continue
        ratio = ratios.get(id(config), 1.0)
        fidelity = task.fidelity(config["model"])
        row.update(ms=ratio * dense_ms, vs_dense=ratio,
                   vs_budget=ratio / config["budget"] if config["budget"] else None,
                   params=model_params(config["model"]), **fidelity.metrics)
        row[RESAMPLED] = fidelity.resampled
        rows.append(row)
    print(f"{task.name} done in {time.time() - started:.0f} s", flush=True)
    return rows


def print_rows(rows: list[dict]) -> None:
    metrics = [k for k in rows[0] if k not in ("model", "budget", "how", "ms", "vs_dense",
                                              "vs_budget", "params", RESAMPLED)]
    header = f"{'budget':>7} {'configuration':<30} {'ms':>8} {'vs dense':>8} {'vs budget':>9} " \
        f"{'params':>11} " + " ".join(f"{m:>16}" for m in metrics)
    print("(vs dense: timed beside the dense model; vs budget = vs dense / budget fraction; "
          "ms = vs dense x the dense ms)")
    print(f"\n{rows[0]['model']}\n{header}")
    for row in rows:
        budget = f"{row['budget']:.0%}" if row["budget"] else "-"
        if "ms" not in row:
            print(f"{budget:>7} {row['how']:<30} (below the least reachable latency)")
            continue
        ratio = f"{row['vs_budget']:.3f}" if row["vs_budget"] else "-"
        print(f"{budget:>7} {row['how']:<30} {row['ms']:8.3f} {row['vs_dense']:8.3f} {ratio:>9} "
              f"{row['params']:>11,} " + " ".join(f"{row[m]:16.4f}" for m in metrics))


def bootstrap_spread(first: Resampled, second: Resampled, draws: int = BOOTSTRAP_DRAWS,
                     seed: int = 0) -> float:
    """The standard deviation of the difference of two rows' values of one column (first -
    second), over ``draws`` resamplings of the items with replacement, the same resampled items
    for both rows (a paired bootstrap)."""
    count = len(first.arrays[0])
    rng = np.random.default_rng(seed)
    return float(np.std([first.at(chosen) - second.at(chosen)
                         for chosen in (rng.integers(0, count, count) for _ in range(draws))]))


def print_differences(rows: list[dict]) -> None:
    """Each planner row against each baseline row of its budget, on every column that can be
    resampled: the difference and its paired-bootstrap standard deviation, so a reader can tell
    a difference the data can resolve from one they cannot. A cell where the planner is worse
    is marked ``<``, and ``<<`` where by more than two standard deviations."""
    metrics = list(rows[0].get(RESAMPLED, {}))
    if not metrics:
        return
    items = {m: len(rows[0][RESAMPLED][m].arrays[0]) for m in metrics}
    lower = sorted(LOWER_IS_BETTER & set(metrics))
    print(f"\nplanner - baseline (± the standard deviation over {BOOTSTRAP_DRAWS} paired "
          "bootstrap resamplings of the items: "
          + ", ".join(f"{m} {n}" for m, n in items.items())
          + (f"; {', '.join(lower)} lower is better" if lower else "") + ")")
    for row in rows:
        if row["budget"] is None or not row["how"].startswith("planner") or "ms" not in row:
            continue
        for baseline in rows:
            if (baseline["budget"] != row["budget"] or "ms" not in baseline
                    or baseline["how"].startswith("planner")):
                continue
            cells = []
            for metric in metrics:
                difference = row[metric] - baseline[metric]
                spread = bootstrap_spread(row[RESAMPLED][metric], baseline[RESAMPLED][metric])
                worse = -difference if metric in LOWER_IS_BETTER else difference
                mark = "<<" if worse < -2 * spread else "<" if worse < 0 else ""
                cells.append(f"{metric} {difference:+.4f} ± {spread:.4f} {mark:<2}")
            print(f"{row['budget']:>7.0%} {row['how']:<18} vs {baseline['how']:<26} "
                  + "   ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "mobilenet"],
                        choices=["minilm", "mobilenet"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.9, 0.75, 0.6])
    parser.add_argument("--calib", type=int, default=64,
                        help="calibration samples (default 64; MobileNetV2 takes at most 32 of "
                             "its 36: 18 photos and their mirror images)")
    parser.add_argument("--error-feeds", type=int, default=32,
                        help="held-out calibration samples the planners measure model errors "
                             "on (at most the last quarter of --calib, which the statistics are "
                             "not fitted on; default 32: all of them): more make the measured "
                             "errors steadier and the planning slower")
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime threads for every timing (0: its default). On a "
                             "2-core shared VM two 2-thread timings of one model differ by 5%% "
                             "and more, 1-thread ones far less")
    args = parser.parse_args()
    if args.error_feeds < 1 or args.calib < 1:
        parser.error("--calib and --error-feeds must be at least 1")
    tasks = {"minilm": minilm_task, "mobilenet": mobilenet_task}
    for name in args.models:
        rows = run_task(tasks[name](args.calib), args.budgets, args.threads or None,
                        args.error_feeds)
        print_rows(rows)
        print_differences(rows)


if __name__ == "__main__":
    main()
