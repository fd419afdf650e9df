"""The budget planner: per-site candidates, their error and latency, a knapsack search, and a
measured check of the chosen plan.

1. Candidates: for every site, dense plus each applicable method over a rank grid aligned to
   the device's SIMD width, seeded by the spectral hints (energy ranks, effective rank, the
   EVBMF rank).
2. Error model: every error is measured on the planner's feeds, which should be calibration
   samples held out of the statistics the factors are fitted to (``split_calibration``):
   whitened factors fit their own samples far better than others. A candidate's *site* error
   is the relative squared output error of that site on the feeds' activations (exact from
   the factors' spectra, ``decompositions.svd_output_errors``, for plain and for whitened SVD;
   for spatial SVD, on the vertical input patches, see ``passes.whitened_svd``; the weight
   error for Tucker-2 and when no data is given; the bias correction by the calibration means,
   which can only lower it, is left out). A data-aware planner offers plain and whitened
   factors (SVD, spatial SVD) at every rank and keeps whichever errs less there. Site errors
   compare only within one *measure* (output errors, or one method's weight errors): per
   measure, candidates another candidate of the same site beats in both cost and site error
   are dropped (the search would never keep them), and for up to ``PROBES`` of the kept ones
   the *model* error is measured: the squared relative model-output error on the feeds with
   only that site changed (the rule's ``approximation`` fed in place of the site's weight,
   which computes what the candidate's chain does: ``WeightSubstitution``); the others are
   interpolated linearly in site error between that measure's measurements (activations
   such as ReLU6 make the response far from proportional). Model errors share one measure,
   so across measures what is beaten in cost and model error is dropped. Predicted model
   error: ``e^2 = sum_s e_s^2`` (additivity, checked on the real model at the end).
3. Latency model: every candidate chain (and each site's dense operator) timed on the device
   (``lrdeploy.latency``, cached per device and board) or estimated by its roofline, plus the
   untouched rest of the model measured once: ``rest = max(0, T(dense model) - sum_s T(dense
   site s))``.
4. Search: a multiple-choice knapsack (``lrdeploy.search``) minimising the predicted error with
   predicted latency (or parameters) within the budget. The chosen plan is applied and measured
   on the device (side by side with the dense model, scaled to the dense model's reference
   time), aiming ``NOISE_MARGIN`` under the budget; a plan that fits is timed twice and the
   slower timing counts (so is the plan nearest the budget when none fitted under the aim but
   it measured within the budget), and its model error is measured, also with the SVD,
   spatial SVD and Tucker-2 sites' biases corrected by the calibration means (same latency;
   see ``passes.base``), the better of the two kept; of the plans that fit, the one with the
   least measured model error is kept.
   While it misses, the budget the search sees is tightened by the miss, and while it leaves
   much slack, loosened (at most ``MAX_ATTEMPTS`` measured plans). A roofline estimate of the
   whole plan is searched the same way, without the noise margin (it does not vary); a
   parameter count adds up exactly, so its first plan is the answer.
   A plan is accepted only when measured within the budget (not merely near it).
   A measured budget is refused only once the cheapest plan has been measured over it: the
   predicted least (rest plus the cheapest chains) mixes timings taken at other moments. The
   cheapest plan's timing is the median of three (one timing decides nothing alone).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from lrdeploy import runtime
from lrdeploy.analysis import ModelAnalysis, pays_off
from lrdeploy.calibration import padding_mask, site_statistics
from lrdeploy.decompositions import svd_output_errors, tail_sums
from lrdeploy.errors import LrdeployError, warn
from lrdeploy.latency import LatencyModel, RooflineLatency
from lrdeploy.methods import DATA_AWARE, DENSE, PLAIN, rule_for
from lrdeploy.plan import Plan, PlanEntry, apply_plan
from lrdeploy.search import Choice, Frontier, Option
from lrdeploy.sites import Site, as_operand, following_bias, model_params, weight_operand
from lrdeploy.targets.devices import Device
from lrdeploy.tensorize import StepCost, TTLayout, choose_shape, measured_step_cost
from lrdeploy.verify import compare_outputs, reference_outputs

MAX_ATTEMPTS = 5
NOISE_MARGIN = 0.02  # aim this far under a measured budget (plan timings vary by ~1%)
LOOSEN_ABOVE = 0.01  # loosen the search budget while a fitting plan leaves more slack
PROBES = 3  # candidates per site whose model error is measured, not interpolated
# A relative output error at or above this means the outputs are no closer than zeros.
USELESS_ERROR = 1.0
# At or above this, half the outputs' size or more: MobileNetV2 plans measured at 0.87 and 0.91
# agreed with the dense model's top class on none of 20 ImageNet images.
LARGE_ERROR = 0.5
# Fractions of each full rank in the grid (finer where compression is strongest).
RANK_FRACTIONS = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 7 / 16, 1 / 2, 5 / 8, 3 / 4)
SEED_ENERGIES = (0.8, 0.9, 0.95, 0.99)
KINDS = ("ms", "params")
# Tensor-train candidates: parameter levels (fractions of the dense weight) and orders d. A
# TT chain must cut FLOPs too (the break-even guard), and a 256 x 256 layer as 16 x 16 by
# 16 x 16 matches the dense FLOPs at 1/16 of the parameters (rank 8): the lowest level keeps
# the ranks small enough to pay off.
TT_PARAM_FRACTIONS = (1 / 64, 1 / 16, 1 / 8, 1 / 4)
TT_PLANNER_ORDERS = (2, 3)
Progress = Callable[[str], None]


@dataclass
class Candidate:
    """One option for a site. Errors are squared and relative (to the site's / model's output
    energy); ``latency_ms`` is the chain's time on the device."""

    method: str
    ranks: tuple[int, ...]
    params: int
    site_error: float
    latency_ms: float = 0.0
    model_error: float = 0.0
    tt: TTLayout | None = None  # the shape and order of a tensor-train candidate
    # What ``site_error`` measures: "output" (the site's output error on the feeds'
    # activations) or, for a weight error, the method's name. Site errors are compared only
    # within one measure: a Tucker-2 weight error (a sum of two modes' tails, above 1 at low
    # ranks) says nothing against a spatial SVD output error.
    measure: str = "output"

    def cost(self, kind: str) -> float:
        return self.latency_ms if kind == "ms" else float(self.params)

    def entry(self, site: str, note: str = "") -> PlanEntry:
        return PlanEntry(site, self.method, list(self.ranks), note,
                         None if self.tt is None else self.tt.to_dict())

    def rule_ranks(self) -> tuple[int, ...] | TTLayout:
        return self.ranks if self.tt is None else self.tt


@dataclass
class SiteOptions:
    site: Site
    menu: list[Candidate]  # every candidate; menu[0] is the dense operator
    # The menu pruned for the search by one cost kind (``Planner._measure_model_errors``);
    # candidates[0] is the dense operator.
    candidates: list[Candidate] = field(default_factory=list)
    # Per measure of site error: model error over site error at the last probe.
    sensitivity: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.candidates = self.candidates or list(self.menu)


@dataclass
class PlanOutcome:
    """What the planner chose, what it predicted and what it measured."""

    plan: Plan
    model: ir.Model
    kind: str
    budget: float
    dense: float
    predicted: float
    measured: float
    predicted_error: float
    measured_error: float
    cosine: float
    engine: str
    estimate: bool
    frontier: list[dict]
    attempts: list[dict]
    sites: list[dict]
    chains_measured: int
    chains_cached: int
    notes: list[str] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return "ms" if self.kind == "ms" else "params"

    def amount(self, value: float) -> str:
        """A latency or a parameter count as the tables print it."""
        return f"{value:.4g}" if self.kind == "ms" else f"{value:,.0f}"

    def budget_line(self) -> str:
        """The budget against the dense model, the prediction and the check of the plan."""
        if self.kind == "params":  # a count adds up exactly: nothing to measure or retry
            return (f"budget {self.amount(self.budget)} params: dense "
                    f"{self.amount(self.dense)}, planned {self.amount(self.measured)}")
        checked = "estimated" if self.estimate else "measured"
        return (f"budget {self.budget:.4g} {self.unit} ({self.engine}): dense {self.dense:.4g}, "
                f"predicted {self.predicted:.4g}, {checked} {self.measured:.4g} "
                f"({len(self.attempts)} attempt(s))")

    def to_dict(self) -> dict:
        return {
            "budget": {"kind": self.kind, "value": self.budget, "unit": self.unit,
                       "of_dense": self.budget / self.dense if self.dense else None},
            "engine": self.engine, "estimate": self.estimate,
            "dense": self.dense, "predicted": self.predicted, "measured": self.measured,
            "predicted_relative_error": self.predicted_error,
            "measured_relative_error": self.measured_error, "min_cosine": self.cosine,
            "chains_measured": self.chains_measured, "chains_cached": self.chains_cached,
            "attempts": self.attempts, "frontier": self.frontier, "sites": self.sites,
            "notes": self.notes, "plan": self.plan.to_dict(),
        }


def rank_grid(full: int, lanes: int, hints: Sequence[float] = ()) -> list[int]:
    """Ranks below ``full`` on the grid: fractions of ``full`` and the hints, rounded to a
    multiple of the SIMD width ``lanes``, deduplicated and sorted.

    A rank off the width costs more in the model than its chain shows when timed alone:
    onnxruntime's blocked (NCHWc) convolutions hold channels in blocks of the width, and a
    factor with a partial block leaves that layout, adding two reorders of the activation
    around it, where the chain timed alone has those reorders at its ends whatever its ranks.
    On MobileNetV2 (AVX-512, width 16) a 144 -> 24 projection at rank 18 timed 100 us faster
    than dense alone, and made the model 177 us slower. Only a site no wider than the width
    steps by a quarter of its rank, so that it has candidates at all."""
    step = lanes if full > lanes else max(1, full // 4)
    raw = [f * full for f in RANK_FRACTIONS] + list(hints)
    ranks = {max(step, int(round(r / step)) * step) for r in raw}
    return sorted(r for r in ranks if r < full)


class Planner:
    """Builds the candidates for an analysed model and answers budgets; see the module doc."""

    def __init__(
        self,
        analysis: ModelAnalysis,
        device: Device,
        latency: LatencyModel,
        feeds: Sequence[runtime.Feeds],
        methods: Sequence[str] = ("svd", "tucker2", "spatial"),
        data_aware: bool = True,
        error_feeds: int = 4,
        progress: Progress = lambda message: None,
    ) -> None:
        self.analysis = analysis
        self.device = device
        self.latency = latency
        self.feeds = list(feeds)
        self.progress = progress
        # With calibration statistics, errors are output errors even for plain SVD factors;
        # ``data_aware`` offers whitened factors beside the plain ones.
        self.data_aware = data_aware and analysis.grams is not None
        self._tt_costs: dict[int, StepCost] = {}
        # The feeds' own X^T X (not shrunk: it measures, it fits nothing) for the site errors.
        self.error_grams = None if analysis.grams is None else site_statistics(
            analysis.model, analysis.sites, self.feeds, progress, shrink=False).grams
        self.options = [SiteOptions(site, self._candidates(site, methods))
                        for site in analysis.sites]
        self.options = [o for o in self.options if len(o.menu) > 1]
        self.dense_outputs = reference_outputs(analysis.model, self.feeds)
        self.error_feeds = error_feeds
        self._dense_ms: list[float] = []  # every timing of the dense model, for its median
        self._errors_for: str | None = None  # the cost kind the model errors were pruned by

    # -- candidates and their site errors ------------------------------------------------------

    def _candidates(self, site: Site, methods: Sequence[str]) -> list[Candidate]:
        out = [Candidate(DENSE, (), site.params, 0.0)]
        menu = [m for method in methods for m in (
            (method, DATA_AWARE[method]) if method in DATA_AWARE and self.data_aware
            else (method,))]
        for method in menu:
            if method == "tt":
                continue  # below: its ranks come with a shape, not from one spectrum
            spectra = self.analysis.spectra(site, method)
            if spectra is None:
                continue
            errors, measure = self._site_errors(site, method, spectra.spectra)
            hints = [spectra.energy_ranks(e) for e in SEED_ENERGIES]
            hints.append(tuple(round(e) for e in spectra.effective_ranks()))
            hints.append(spectra.vbmf_ranks())
            grids = [rank_grid(f, self.device.simd_lanes, [h[i] for h in hints])
                     for i, f in enumerate(spectra.full_ranks)]
            for ranks in _rank_tuples(grids, spectra.full_ranks):
                if not spectra.is_profitable(ranks):
                    continue
                cost = spectra.rule.cost(site, ranks)
                error = sum(e[r] for e, r in zip(errors, ranks, strict=True))
                out.append(Candidate(method, ranks, cost.params, float(error),
                                     measure=measure))
        if "tt" in methods and rule_for("tt", site) is not None:
            out += self._tt_candidates(site)
        return out

    def _tt_candidates(self, site: Site) -> list[Candidate]:
        """Tensor-train candidates at a few parameter levels, each with the shape and order
        ``tensorize.choose_shape`` picks on the device's roofline (an estimate: scoring every
        shape's steps by measurement would take minutes per site); the chosen chain is then
        measured like every other candidate."""
        gram = (self.error_grams or {}).get(site.name)
        rule = rule_for("tt", site)
        rows, cols = site.weight.shape
        out = []
        for fraction in TT_PARAM_FRACTIONS:
            choice = choose_shape(site.weight, int(fraction * rows * cols),
                                  self._tt_step_cost(site), TT_PLANNER_ORDERS, keep=1)
            if choice is None:
                continue
            layout = choice.chosen.layout
            cost = rule.cost(site, layout)
            if not pays_off(cost, site):
                continue  # the break-even guard, as for every other method
            error = _squared_output_error(site.weight, rule.approximation(site, layout), gram)
            out.append(Candidate("tt", layout.ranks, cost.params, error, tt=layout,
                                 measure="tt" if gram is None else "output"))
        return out

    def _tt_step_cost(self, site: Site) -> StepCost:
        """One cost function per batch size, so that sites of the same shape share steps."""
        batch = site.vectors or 1
        if batch not in self._tt_costs:
            self._tt_costs[batch] = measured_step_cost(RooflineLatency(self.device), (batch,))
        return self._tt_costs[batch]

    def _site_errors(self, site: Site, method: str, spectra: list[np.ndarray]
                     ) -> tuple[list[np.ndarray], str]:
        """Per unfolding, the relative squared error at each rank (index r = rank r) on the
        planner's feeds, and its measure ("output", or the method's name for a weight
        error)."""
        grams = self.error_grams
        plain = PLAIN.get(method, method)
        if plain in DATA_AWARE and grams is not None and site.name in grams:
            rule = rule_for(plain, site)
            (matrix,) = rule.unfoldings(site)
            matrix = matrix if rule.inputs_on_rows(site) else matrix.T
            fit = self.analysis.grams.get(site.name) if method != plain else None
            tails, measure = [svd_output_errors(matrix, grams[site.name], fit)], "output"
        else:
            tails = [tail_sums(np.asarray(s, dtype=np.float64) ** 2) for s in spectra]
            measure = method
        return [tail / max(tail[0], 1e-300) for tail in tails], measure

    # -- model errors: the model's response to one site's error ------------------------------

    def _measure_model_errors(self, kind: str) -> None:
        """Prune dominated candidates by ``kind`` cost, then measure / interpolate each kept
        candidate's model error (see the module doc), per measure of site error: one curve
        per measure, since site errors of different measures do not compare. Once every
        candidate has a model error (one measure for all), what another candidate beats in
        both cost and model error is dropped too."""
        if self._errors_for == kind:
            return
        probe = self.feeds[: self.error_feeds]
        substitution = WeightSubstitution(self.analysis.model, [o.site for o in self.options])
        for index, options in enumerate(self.options):
            self.progress(f"model error of site {index + 1}/{len(self.options)}")
            dense, *factorized = options.menu
            measures = sorted({c.measure for c in factorized})
            kept = [c for measure in measures for c in _undominated(
                [c for c in factorized if c.measure == measure], kind, dense.cost(kind))]
            for measure in measures:
                curve = sorted((c for c in kept if c.measure == measure),
                               key=lambda c: c.site_error)
                points = [(0.0, 0.0)]
                for candidate in _spread(curve, PROBES):
                    error = self._single_site_error(substitution, options.site, candidate, probe)
                    points.append((candidate.site_error, error ** 2))
                points.sort()
                xs, ys = zip(*points, strict=True)
                for candidate in curve:
                    candidate.model_error = _interpolate(candidate.site_error, xs, ys)
                if xs[-1] > 0:
                    options.sensitivity[measure] = ys[-1] / xs[-1]
            options.candidates = [dense, *_undominated(kept, kind, dense.cost(kind),
                                                       lambda c: c.model_error)]
        self._errors_for = kind

    def _single_site_error(self, substitution: WeightSubstitution, site: Site,
                           candidate: Candidate, feeds: Sequence[runtime.Feeds]) -> float:
        """The model error with only ``site`` changed to ``candidate``: the rule's
        ``approximation`` fed in place of the site's weight (the outputs of the rewritten
        model, up to rounding)."""
        rule = rule_for(candidate.method, site, grams=self.analysis.grams)
        weight = rule.approximation(site, candidate.rule_ranks())
        return self._output_error(substitution.outputs(site, weight, feeds), feeds)[0]

    def apply(self, plan: Plan) -> ir.Model:
        return apply_plan(self.analysis.model, plan, self.analysis.sites, self.analysis.grams,
                          self.analysis.means)

    def model_error(self, model: ir.Model, feeds: Sequence[runtime.Feeds] | None = None
                    ) -> tuple[float, float]:
        """Root mean over outputs of each output's squared relative L2 error against the dense
        model (outputs of very different scales count alike), and the least output cosine.

        Each output's error pools the values (at data positions) of every feed, so a feed
        weighs by its output's energy: a per-token output of a 128-token passage holds forty
        times the rows of a one-word query's, while MiniLM's mean-pooled embedding of a one-word
        query is 3 to 4 times as long as a passage's (norms 5.5 to 8.3 against 1.9 on the
        benchmark's calibration texts), so there the query weighs 8 to 20 times as much.
        Averaging each sample's relative error instead, so that samples count alike as in the
        statistics, was tried on the MiniLM benchmark (one run): the plain-SVD planner's plans
        at 90 / 75 / 60% of the latency came out with WordSim-353 Spearman 0.7159 / 0.6380 /
        0.6314, below both runs with feeds pooled (at least 0.7187 / 0.6545 / 0.6392), so it
        was not kept."""
        feeds = self.feeds if feeds is None else feeds
        session = runtime.session(model)
        return self._output_error([list(runtime.run(session, feed).values()) for feed in feeds],
                                  feeds)

    def _output_error(self, produced: list[list[np.ndarray]], feeds: Sequence[runtime.Feeds]
                      ) -> tuple[float, float]:
        """``model_error`` of outputs already computed, one list of outputs per feed."""
        names, reference, unoptimized = self.dense_outputs
        fidelity = compare_outputs(names, reference[: len(feeds)], produced,
                                   unoptimized[: len(feeds)], [padding_mask(f) for f in feeds])
        error = math.sqrt(float(np.mean([f.relative_l2_error**2 for f in fidelity])))
        return error, min(f.cosine for f in fidelity)

    # -- latency --------------------------------------------------------------------------------

    def measure_latency(self) -> None:
        """Time every candidate chain (cached) and the dense model once."""
        models, where = [], []
        for options in self.options:
            site_model = standalone(self.analysis.model, options.site)
            for candidate in options.menu:
                chain = site_model
                if candidate.method != DENSE:
                    # A chain's time depends on its operators and shapes, not its values (the
                    # latency cache keys on those alone): without the calibration statistics a
                    # whitened SVD rule builds the same graph from plain SVD factors, sparing
                    # every candidate its whitening.
                    rule = rule_for(candidate.method, options.site)
                    chain = rule(site_model, {options.site.name: candidate.rule_ranks()})
                models.append(chain)
                where.append(candidate)
        figures = self.latency.chain_ms(models, self.progress)
        for candidate, ms in zip(where, figures, strict=True):
            candidate.latency_ms = ms
        self.progress("timing the dense model")
        self._dense_ms.append(self.latency.side_by_side_ms([self.analysis.model],
                                                           self.feeds[0])[0])

    @property
    def dense_model_ms(self) -> float | None:
        """The dense model's reference time: the median of every timing of it so far (each
        measured plan is timed beside it again), so one unlucky timing does not set it."""
        return statistics.median(self._dense_ms) if self._dense_ms else None

    def dense_cost(self, kind: str) -> float:
        """The dense model's latency reference (ms) or parameter count."""
        return self.dense_model_ms if kind == "ms" else float(model_params(self.analysis.model))

    def rest(self, kind: str) -> float:
        """The cost of everything the plan does not touch, never below zero: each chain is
        timed alone with its own call overhead, so on a small model (or a loaded machine) the
        dense chains can sum to more than the whole model, and a negative rest would make a
        negative latency look reachable."""
        return max(0.0, self.dense_cost(kind) - sum(o.candidates[0].cost(kind)
                                                     for o in self.options))

    def frontier(self, kind: str) -> Frontier:
        groups = [[Option(c.cost(kind), c.model_error) for c in o.candidates]
                  for o in self.options]
        widest = sum(max(option.cost for option in g) for g in groups)
        return Frontier(groups, bin_size=max(widest, 1e-9) / 4000)

    def plan_of(self, picks: Sequence[int], note: str) -> Plan:
        entries = []
        chosen = dict(zip((o.site.name for o in self.options), picks, strict=True))
        for site in self.analysis.sites:
            index = chosen.get(site.name)
            if index is None:
                entries.append(PlanEntry(site.name, DENSE, note="no profitable candidate"))
                continue
            candidate = next(o for o in self.options if o.site is site).candidates[index]
            entries.append(candidate.entry(site.name, note))
        return Plan(entries)

    # -- the search with its measured check -----------------------------------------------------

    def solve(self, kind: str, budget: float, relative: bool = False) -> PlanOutcome:
        """The least-error plan whose measured cost meets ``budget``; see the module doc.

        ``relative``: the budget is a fraction of the dense model's cost. Every plan is timed
        beside the dense model, so a relative budget is checked on that ratio alone and holds
        however fast the device happens to be at the time (a shared host, thermal throttling).
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        if kind == "ms" and self.dense_model_ms is None:
            self.measure_latency()
        reference = self.dense_cost(kind) if relative else None
        if relative:
            budget = budget * reference
        unit = "ms" if kind == "ms" else "params"
        self._measure_model_errors(kind)
        frontier = self.frontier(kind)
        rest = self.rest(kind)
        least = rest + frontier.least_cost
        # A measured plan aims a little under the budget: two timings of one model on a shared
        # host differ by a few percent, and a plan that only just fits one may miss the next.
        measured_kind = kind == "ms" and not self.latency.estimate
        # A measured budget under the predicted least is not refused on the prediction: the
        # rest of the model comes from timings taken at other moments (cached chains, one
        # dense timing), so the cheapest plan is measured first and decides.
        if budget < least and not measured_kind:
            raise self._unreachable(budget, unit, least, "")
        aim = budget * (1 - NOISE_MARGIN) if measured_kind else budget
        attempts: list[dict] = []
        met: _Trial | None = None  # the fit with the least measured error
        missed: _Trial | None = None  # the miss with the least predicted cost
        nearest: _Trial | None = None  # the miss with the least measured cost
        target = aim
        for _ in range(3 * MAX_ATTEMPTS):  # bounded: repeated choices are not measured again
            if len(attempts) == MAX_ATTEMPTS:
                break
            choice = frontier.best(max(target, least) - rest)
            predicted = rest + choice.cost
            if any(a["picks"] == choice.picks for a in attempts):
                # Loosened (or interpolated) back onto the plan that fits: nothing with less
                # predicted error is on offer up to this budget. Stepping down past it would
                # only reach cheaper plans; with a budget far above the dense model's time it
                # measured the cheapest plan for nothing.
                if target <= least or (met is not None and choice.picks == met.choice.picks):
                    break
                target = min(target, predicted) - 0.02 * budget  # step past the repeat
                continue
            plan = self.plan_of(choice.picks, f"{unit} budget {budget:g}")
            model = self.apply(plan)
            self.progress(f"measuring the plan (attempt {len(attempts) + 1})")
            measured = (self._measure(model, reference) if kind == "ms"
                        else float(model_params(model)))
            cheapest = target <= least
            if measured_kind and cheapest:
                # The cheapest plan decides whether the budget is refused, so one timing
                # does not: one timing of MobileNetV2's cheapest plan on this shared host
                # read 0.63 of the dense model, where repeated timings read 0.55.
                measured = statistics.median(
                    [measured, *(self._measure(model, reference) for _ in range(2))])
            elif measured_kind and measured <= aim:
                # A fit is timed again and the slower timing counts: of several plans timed
                # near the budget, the one that fits is often the one timed luckily.
                measured = max(measured, self._measure(model, reference))
            attempt = {"search_budget": target, "predicted": predicted,
                       "measured": measured, "cheapest": cheapest, "picks": choice.picks}
            attempts.append(attempt)
            if measured <= aim:
                # Of the plans that fit, the real model decides: the predicted error assumes
                # the sites' errors add up, which the measured one does not need.
                trial = self._corrected_if_better(
                    _Trial(predicted, measured, plan, model, choice, self.model_error(model)))
                attempt["measured_relative_error"] = trial.fidelity[0]
                attempt["bias_correction"] = trial.plan.bias_correction
                if met is None or trial.fidelity[0] < met.fidelity[0]:
                    met = trial
            else:
                trial = _Trial(predicted, measured, plan, model, choice)
                if missed is None or predicted < missed.predicted:
                    missed = trial
                if nearest is None or measured < nearest.measured:
                    nearest = trial
            if kind != "ms":
                break  # a parameter count adds up exactly: the first plan is the answer
            # An estimate (the roofline) of the whole plan differs a little from its chains'
            # sum (nodes between the sites, shapes that differ in place), so it is searched
            # again like a measurement, without the noise margin: it does not vary.
            target = _next_search_budget(aim, met, missed)
            if target is None:
                break
        if met is None and nearest.measured <= budget:
            # Within the budget but not under the aim: it is held to what a fit is, timed
            # again with the slower timing counting (the cheapest plan's timing is already
            # the median of three), and offered the bias correction.
            attempt = next(a for a in attempts if a["picks"] == nearest.choice.picks)
            if not attempt["cheapest"]:
                attempt["measured"] = max(nearest.measured,
                                          self._measure(nearest.model, reference))
                nearest = nearest._replace(measured=attempt["measured"])
            if nearest.measured <= budget:
                nearest = self._corrected_if_better(
                    nearest._replace(fidelity=self.model_error(nearest.model)))
                attempt["measured_relative_error"] = nearest.fidelity[0]
                attempt["bias_correction"] = nearest.plan.bias_correction
        for attempt in attempts:
            attempt["picks"] = list(attempt["picks"])
        # The first attempt is always measured, so one of the two is set.
        kept = met or nearest
        predicted, measured, plan, model, choice = kept[:5]
        if measured > budget and any(a["cheapest"] for a in attempts):
            # The cheapest plan was measured, and missed.
            raise self._unreachable(budget, unit, min(a["measured"] for a in attempts),
                                    f" as measured (predicted {least:.4g})")
        if measured > budget:
            raise LrdeployError(
                f"budget {budget:g} {unit} missed after {len(attempts)} attempt(s): the best "
                f"plan measured {measured:.4g} {unit} on {self.device.name} (predicted "
                f"{predicted:.4g}); the least reachable is about {least:.4g}")
        error, cosine = kept.fidelity or self.model_error(model)
        notes = error_notes(error)
        if not plan.factorized():
            notes.append(f"the dense model meets the budget ({measured:.4g} {unit} against "
                         f"{budget:g} on {self.device.name}): every site stays dense")
        for note in notes:
            warn(note)
        return PlanOutcome(
            # A relative budget's plans were scaled to the reference it is a share of: the
            # dense figure beside them is that one, not the median of later timings.
            plan=plan, model=model, kind=kind, budget=budget,
            dense=reference or self.dense_cost(kind),
            predicted=predicted, measured=measured,
            predicted_error=math.sqrt(choice.error), measured_error=error, cosine=cosine,
            engine=self.latency.label if kind == "ms" else "parameter count",
            estimate=kind == "ms" and self.latency.estimate,
            frontier=[{"cost": rest + p.cost, "predicted_relative_error": math.sqrt(p.error)}
                      for p in frontier.points()],
            attempts=attempts, sites=self._site_rows(choice.picks, kind),
            chains_measured=self.latency.measured, chains_cached=self.latency.reused,
            notes=notes,
        )

    def _corrected_if_better(self, trial: _Trial) -> _Trial:
        """The fit, or the same plan with its biases corrected (``bias_correction_if_better``).
        Its operators and shapes are the fit's, so its latency is too."""
        plan, model, fidelity = self.bias_correction_if_better(trial.plan, trial.model,
                                                               trial.fidelity)
        return trial._replace(plan=plan, model=model, fidelity=fidelity)

    def bias_correction_if_better(self, plan: Plan, model: ir.Model,
                                  fidelity: tuple[float, float] | None = None
                                  ) -> tuple[Plan, ir.Model, tuple[float, float]]:
        """``plan`` (applied as ``model``, measuring ``fidelity``), or the same plan with its
        SVD, spatial SVD and Tucker-2 biases corrected by the calibration means where that
        measures closer to the dense model on the planner's feeds: the correction lowers
        every site's error on the calibration activations, not always the model's."""
        fidelity = fidelity or self.model_error(model)
        if not self.analysis.means or plan.bias_correction:
            return plan, model, fidelity
        corrected = dataclasses.replace(plan, bias_correction=True)
        corrected_model = self.apply(corrected)
        corrected_fidelity = self.model_error(corrected_model)
        if corrected_fidelity[0] < fidelity[0]:
            return corrected, corrected_model, corrected_fidelity
        return plan, model, fidelity

    def _unreachable(self, budget: float, unit: str, least: float, how: str) -> LrdeployError:
        engine = self.latency.label if unit == "ms" else "parameters"
        return LrdeployError(f"budget {budget:g} {unit} is below the least reachable {least:.4g} "
                             f"{unit}{how} on {self.device.name} ({engine}; every site at its "
                             "cheapest option)")

    def _measure(self, model: ir.Model, reference: float | None = None) -> float:
        """The plan's latency: timed side by side with the dense model and scaled to the
        dense model's reference time (``reference``, else the running median), so that a
        shared machine's changing load does not decide whether the budget is met (an
        estimate is taken as is)."""
        if self.latency.estimate:
            return self.latency.model_ms(model, self.feeds[0])
        plan_ms, dense_ms = self.latency.pair_ms(model, self.analysis.model, self.feeds[0])
        self._dense_ms.append(dense_ms)
        return plan_ms / dense_ms * (reference or self.dense_model_ms)

    def _site_rows(self, picks: Sequence[int], kind: str) -> list[dict]:
        """Per site: the choice, its cost and error; latencies are null under a parameter
        budget, which times nothing (0 would read as free)."""
        timed = kind == "ms"
        rows = []
        for options, pick in zip(self.options, picks, strict=True):
            dense, chosen = options.candidates[0], options.candidates[pick]
            rows.append({
                "site": options.site.name, "method": chosen.method, "ranks": list(chosen.ranks),
                **({"tt": chosen.tt.to_dict()} if chosen.tt else {}),
                "candidates": len(options.candidates),
                "dense_ms": dense.latency_ms if timed else None,
                "chosen_ms": chosen.latency_ms if timed else None, "params_before": dense.params,
                "params_after": chosen.params, "site_error": math.sqrt(chosen.site_error),
                "sensitivity": (None if chosen.method == DENSE
                                else options.sensitivity.get(chosen.measure)),
            })
        return rows


class WeightSubstitution:
    """One onnxruntime session of the dense model in which every site's weight is an
    overridable input (an initializer that is also a graph input, which a run may feed), so
    that a candidate's model error is measured by feeding its ``approximation`` instead of
    rewriting the model and opening a session for it. On MiniLM-L6 (108 measurements on 16
    feeds) that took the measurements from 67 s to 45 s: runs are slower (a weight that may
    be fed is not pre-packed, 23 against 16 ms), but no model is serialised and no session
    set up per candidate (0.35 s each). One session per site was slower still (53 s)."""

    def __init__(self, model: ir.Model, sites: Sequence[Site]) -> None:
        model = model.clone()
        nodes = {node.name: node for node in model.graph}
        self.operands: dict[str, tuple[ir.Node, str, np.dtype]] = {}
        for site in sites:
            node = nodes[site.name]
            # A site's weight is a constant that is not a graph input (``sites.constant_array``)
            # and the frontend lifts Constant nodes to initializers, so it is an initializer.
            value = weight_operand(node)
            model.graph.inputs.append(value)
            self.operands[site.name] = (node, value.name, value.const_value.dtype.numpy())
        self.session = runtime.session(model)

    def outputs(self, site: Site, weight: np.ndarray, feeds: Sequence[runtime.Feeds]
                ) -> list[list[np.ndarray]]:
        """The model's outputs on each feed with ``weight`` (oriented as ``site.weight``) in
        place of the site's."""
        node, name, dtype = self.operands[site.name]
        fed = np.ascontiguousarray(as_operand(node, weight), dtype=dtype)
        return [list(runtime.run(self.session, {**feed, name: fed}).values()) for feed in feeds]


def error_notes(error: float) -> list[str]:
    """What a user should be told about a plan whose measured relative output error is
    ``error``: nothing, that it is large, or that the outputs are lost."""
    remedy = "(a looser budget, or fine-tuning after compression)"
    if error >= USELESS_ERROR:
        return [f"the plan's measured relative output error is {error:.3g}: its outputs are no "
                "closer to the dense model's than zeros are; the budget is too tight for "
                f"factorization alone {remedy}"]
    if error >= LARGE_ERROR:
        return [f"the plan's measured relative output error is {error:.3g}: its outputs differ "
                f"from the dense model's by {error:.0%} of their size; measure its accuracy on "
                f"your own data before shipping it, it may be far below the dense model's "
                f"{remedy}"]
    return []


def _squared_output_error(weight: np.ndarray, approx: np.ndarray, gram: np.ndarray | None
                          ) -> float:
    """``||X (W - A)||^2 / ||X W||^2`` with ``X^T X = gram`` (the weight error without one)."""
    diff = approx - weight
    if gram is None:
        return float(np.sum(diff**2) / max(np.sum(weight**2), 1e-300))
    return float(np.einsum("ij,ik,kj->", diff, gram, diff)
                 / max(np.einsum("ij,ik,kj->", weight, gram, weight), 1e-300))


def _undominated(candidates: Sequence[Candidate], kind: str, dense_cost: float,
                 error: Callable[[Candidate], float] = lambda c: c.site_error
                 ) -> list[Candidate]:
    """The candidates cheaper than the dense operator that no other beats in both cost and
    ``error``, cheapest first."""
    kept: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (c.cost(kind), error(c))):
        if candidate.cost(kind) < dense_cost and all(error(candidate) < error(k) for k in kept):
            kept.append(candidate)
    return kept


def _spread(items: list, count: int) -> list:
    """Up to ``count`` items evenly spread over ``items``, both ends included."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _interpolate(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear through the points; beyond the last, proportional to its ratio."""
    if x >= xs[-1]:
        return ys[-1] * x / xs[-1] if xs[-1] > 0 else 0.0
    return float(np.interp(x, xs, ys))


class _Trial(NamedTuple):
    """One measured plan: its predicted and measured cost, and, for a plan that fits, the
    model's (relative error, least cosine) on the planner's feeds."""

    predicted: float
    measured: float
    plan: Plan
    model: ir.Model
    choice: Choice
    fidelity: tuple[float, float] | None = None


def _next_search_budget(budget: float, met: _Trial | None, missed: _Trial | None
                        ) -> float | None:
    """The next budget to give the search after a measured attempt, or None to stop; ``met``
    and ``missed`` are the kept plans within / over the budget.

    Only a miss: the prediction that missed, lowered by the miss (plus 1%). Only a fit: raised
    by the slack when that is above ``LOOSEN_ABOVE``. Both: interpolate linearly (measured
    against predicted) between them, stopping once they are within 1% of the budget.
    """
    if missed is not None and met is None:
        return missed.predicted - (missed.measured - budget) - 0.01 * budget
    if met is not None and missed is None:
        slack = budget - met.measured
        return met.predicted + slack if slack > LOOSEN_ABOVE * budget else None
    (low, low_ms), (high, high_ms) = met[:2], missed[:2]
    if abs(high - low) < 0.01 * budget or high_ms <= low_ms:
        return None
    return low + (budget - low_ms) * (high - low) / (high_ms - low_ms)


def _rank_tuples(grids: list[list[int]], full: Sequence[int]) -> list[tuple[int, ...]]:
    """Single-rank methods: the grid. Two ranks (Tucker-2): one pair per rank of the longest
    grid, each mode at the rank of its own grid nearest the same fraction of its size, so the
    menu grows linearly, not quadratically, and every rank stays on its mode's (SIMD-aligned)
    grid."""
    if len(grids) == 1:
        return [(r,) for r in grids[0]]
    longest = max(range(len(grids)), key=lambda i: len(grids[i]))
    out = set()
    for rank in grids[longest]:
        fraction = rank / full[longest]
        out.add(tuple(min(grid or [f], key=lambda r, f=f: abs(r - fraction * f))
                      for grid, f in zip(grids, full, strict=True)))
    return sorted(out)


def standalone(model: ir.Model, site: Site) -> ir.Model:
    """A model holding just ``site``'s operator (and the Add of its bias, where one follows),
    its weights and its input shape: the unit the latency model times (and the factorization
    passes rewrite into a chain)."""
    node = next(n for n in model.graph if n.name == site.name)
    initializers = []

    def copy_inputs(of: ir.Node, activation: ir.Value) -> list[ir.Value | None]:
        """``of``'s inputs: constants copied, the one computed input replaced by ``activation``."""
        inputs: list[ir.Value | None] = []
        for value in of.inputs:
            if value is None:
                inputs.append(None)
            elif value.const_value is None:
                inputs.append(activation)
            else:
                copy = ir.Value(name=value.name, shape=value.shape, type=value.type,
                                const_value=value.const_value)
                initializers.append(copy)
                inputs.append(copy)
        return inputs

    def clone(of: ir.Node, activation: ir.Value) -> ir.Node:
        return ir.Node(of.domain, of.op_type, copy_inputs(of, activation), name=of.name,
                       attributes=[ir.Attr(a.name, a.type, a.value)
                                   for a in of.attributes.values()])

    x = ir.Value(name="x", shape=ir.Shape(site.input_shape),
                 type=next(v for v in node.inputs if v.const_value is None).type)
    nodes = [clone(node, x)]
    after = following_bias(node, site.weight.shape[1]) if site.bias_follows else None
    if after is not None:
        nodes.append(clone(after[0], nodes[0].outputs[0]))
    output = nodes[-1].outputs[0]
    output.name, output.type = "y", node.outputs[0].type
    graph = ir.Graph([x], [output], nodes=nodes, initializers=initializers,
                     opset_imports=dict(model.opset_imports), name="site")
    alone = ir.Model(graph, ir_version=model.ir_version)
    # A saved model needs its output's shape (TVM's importer and the checker read it).
    feed = runtime.random_inputs(alone, runtime.input_specs(alone))
    output.shape = ir.Shape(runtime.run(runtime.session(alone), feed)["y"].shape)
    return alone
