"""The plan: which site gets which method and ranks. Plain data, saved as JSON and re-applied.

``make_plan`` derives a plan from a rank rule; ``apply_plan`` runs the passes it names. A plan
saved with ``--save-plan`` can be edited by hand and given back with ``--plan``.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import onnx_ir as ir

from lrdeploy.analysis import ModelAnalysis
from lrdeploy.errors import LrdeployError, warn
from lrdeploy.methods import DENSE, PLAIN, Grams, Means, method_for, rule_for, rules
from lrdeploy.ranks import RankRule, resolve_ranks
from lrdeploy.sites import Site
from lrdeploy.tensorize import TTLayout

PLAN_FORMAT = "lrdeploy-plan/1"


@dataclass
class PlanEntry:
    site: str
    method: str
    ranks: list[int] = field(default_factory=list)
    note: str = ""
    # Tensor-train entries only: {"in_modes", "out_modes", "order"} (``ranks`` are the TT ranks).
    tt: dict | None = None

    def rule_ranks(self) -> list[int] | TTLayout:
        """What the entry's rule takes as ranks: the ranks, or the TT layout they belong to."""
        return TTLayout.from_dict(self.tt, self.ranks) if self.method == "tt" else self.ranks


@dataclass
class Plan:
    entries: list[PlanEntry]
    tucker_sweeps: int = 0
    # SVD, spatial SVD and Tucker-2 sites' biases corrected by the calibration input means
    # (``passes.base.BiasCorrection``)
    bias_correction: bool = False
    # where the plan was read from, named by the errors of a plan that does not fit the model
    source: str = field(default="plan", compare=False, repr=False)

    def to_dict(self) -> dict:
        entries = [{k: v for k, v in asdict(e).items() if k != "tt" or v is not None}
                   for e in self.entries]
        return {"format": PLAN_FORMAT, "tucker_sweeps": self.tucker_sweeps,
                "bias_correction": self.bias_correction, "entries": entries}

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> Plan:
        """A plan from its JSON form, refusing what would otherwise be applied as something
        else: a field this format does not have (a misspelt one would be ignored), ranks that
        are not whole numbers (3.7 would become 3, "12" the ranks 1 and 2), an unknown
        method, a negative sweep count, a site named twice."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise LrdeployError(f"{source}: not an lrdeploy plan (expected format {PLAN_FORMAT})")
        try:
            _check_fields("the plan", data, PLAN_FIELDS, {"format", "entries"})
            if not isinstance(data["entries"], list):
                raise ValueError("entries must be a list")
            entries = [_entry(e) for e in data["entries"]]
            sites = [e.site for e in entries]
            twice = sorted({site for site in sites if sites.count(site) > 1})
            if twice:
                raise ValueError(f"site(s) {', '.join(twice)} appear more than once")
            bias_correction = data.get("bias_correction", False)
            if not isinstance(bias_correction, bool):
                raise ValueError(f"bias_correction must be true or false, not {bias_correction!r}")
            sweeps = data.get("tucker_sweeps", 0)
            if not _is_whole(sweeps) or sweeps < 0:
                raise ValueError(f"tucker_sweeps must be a whole number, 0 or more, not "
                                 f"{sweeps!r}")
            return cls(entries, sweeps, bias_correction, source)
        except (KeyError, TypeError, ValueError) as exc:
            raise LrdeployError(f"{source}: malformed plan entry ({exc})") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise LrdeployError(f"{path}: no such file")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise LrdeployError(f"{path}: not JSON ({exc})") from None
        return cls.from_dict(data, str(path))

    def as_applied(self, grams_given: bool, means_given: bool) -> Plan:
        """The plan as it can be applied without the calibration statistics it lacks: plain
        methods for data-aware ones without ``grams``, no bias correction without ``means``
        (with a warning each), so that what is reported and saved is what the model got."""
        asked = sorted({e.method for e in self.entries} & set(PLAIN))
        plan = self
        if not grams_given and asked:
            warn(f"the plan asks for data-aware factors ({', '.join(asked)}) but no calibration "
                 "data was given (--calib): those sites get plain factors")
            plan = replace(plan, entries=[replace(e, method=PLAIN.get(e.method, e.method))
                                          for e in plan.entries])
        if not means_given and plan.bias_correction:
            warn("the plan asks for bias correction but no calibration data was given "
                 "(--calib): biases are left as they are")
            plan = replace(plan, bias_correction=False)
        return plan

    def factorized(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.method != DENSE]


PLAN_FIELDS = ("format", "tucker_sweeps", "bias_correction", "entries")
ENTRY_FIELDS = tuple(f.name for f in fields(PlanEntry))


def _check_fields(what: str, data: object, known: Sequence[str], required: set[str]) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be an object, not {data!r}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{what} has unknown field(s) {', '.join(unknown)}; the fields are "
                         f"{', '.join(known)}")
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"{what} lacks {', '.join(missing)}")


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(data: object) -> PlanEntry:
    """One entry of a plan's JSON form, checked (see ``Plan.from_dict``)."""
    _check_fields(f"entry {data!r}", data, ENTRY_FIELDS, {"site", "method"})
    site, method = data["site"], data["method"]
    if not isinstance(site, str):
        raise ValueError(f"site must be a name, not {site!r}")
    known = sorted({rule.method for rule in rules()} | {DENSE})
    if method not in known:
        raise ValueError(f"site '{site}': method {method!r} is not one of {', '.join(known)}")
    ranks = data.get("ranks", [])
    if not isinstance(ranks, list) or not all(_is_whole(r) for r in ranks):
        raise ValueError(f"site '{site}': ranks must be a list of whole numbers, not {ranks!r}")
    note = data.get("note", "")
    if not isinstance(note, str):
        raise ValueError(f"site '{site}': note must be text, not {note!r}")
    entry = PlanEntry(site, method, ranks, note, data.get("tt"))
    if method == "tt":
        if not isinstance(entry.tt, dict):
            raise ValueError(f"site '{site}': method 'tt' needs a \"tt\" layout (in_modes, "
                             "out_modes, order)")
        entry.rule_ranks()  # a malformed layout fails here
    return entry


def matches(name: str, pattern: str) -> bool:
    """A shell-style pattern matches the whole site name or its tail after any '/': tables
    show names without their common prefix ("c2/Conv" for "/c2/Conv"), and those must work."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*/{pattern}")


def selected(name: str, only: Sequence[str], skip: Sequence[str]) -> bool:
    """Site name filter: ``--only`` first, then ``--skip``."""
    if only and not any(matches(name, p) for p in only):
        return False
    return not any(matches(name, p) for p in skip)


def make_plan(
    analysis: ModelAnalysis,
    rule: RankRule,
    method: str = "auto",
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
    guard: bool = True,
    tucker_sweeps: int = 0,
) -> Plan:
    """Ranks for every site from ``rule``; with ``guard``, unprofitable sites stay dense."""
    names = [site.name for site in analysis.sites]
    for flag, patterns in (("--only", only), ("--skip", skip)):
        for pattern in patterns:
            if not any(matches(name, pattern) for name in names):
                warn(f"{flag} {pattern!r} matches no site: patterns are shell-style and match "
                     "the whole name or its end after a '/' (e.g. 'fc*' or '*attention*'); "
                     "lrdeploy analyze lists the names")
    entries = []
    for site in analysis.sites:
        entries.append(_plan_site(analysis, site, rule, method, only, skip, guard))
    return Plan(entries, tucker_sweeps)


def _plan_site(analysis, site, rule, method, only, skip, guard) -> PlanEntry:
    if not selected(site.name, only, skip):
        return PlanEntry(site.name, DENSE, note="not selected by --only/--skip")
    chosen = method_for(method, site, analysis.grams is not None)
    if chosen is None:
        return PlanEntry(site.name, DENSE,
                         note=f"--method {method} does not apply to a k x k convolution")
    spectra = analysis.spectra(site, chosen)
    ranks = resolve_ranks(
        rule,
        spectra.spectra,
        spectra.rule.unfoldings(site),
        lambda r: spectra.rule.cost(site, r).params,
        site.params,
    )
    if guard and not spectra.is_profitable(ranks):
        return PlanEntry(site.name, DENSE, list(ranks),
                         note=f"break-even: ranks {list(ranks)} would not reduce params and FLOPs")
    return PlanEntry(site.name, chosen, list(ranks), note=str(rule))


def apply_plan(model: ir.Model, plan: Plan, sites: Sequence[Site],
               grams: Grams | None = None, means: Means | None = None) -> ir.Model:
    """Run the passes the plan names, one pass per method; ``model`` is not modified.
    Data-aware entries (``wsvd``, ``wspatial``) use ``grams``; without them they get plain
    factors.
    With ``plan.bias_correction``, ``means`` (calibration input means) correct the biases of
    SVD, spatial SVD and Tucker-2 entries, whitened or not."""
    by_name = {site.name: site for site in sites}
    groups: dict[type, tuple] = {}
    plan = plan.as_applied(grams is not None, means is not None)
    means = means if plan.bias_correction else None
    absent = [e.site for e in plan.entries if e.site not in by_name]
    if absent:
        raise LrdeployError(f"{plan.source}: names site(s) {', '.join(absent)}, which this "
                            "model does not have as factorizable sites (lrdeploy analyze "
                            "lists them)")
    for entry in plan.factorized():
        site = by_name[entry.site]
        rule = rule_for(entry.method, site, plan.tucker_sweeps, grams, means)
        if rule is None:
            raise LrdeployError(f"{plan.source}: method '{entry.method}' does not apply to site "
                                f"'{entry.site}' ({site.op} {list(site.weight.shape)})")
        ranks = entry.rule_ranks()
        if isinstance(ranks, TTLayout):
            problem = ranks.problem(*site.weight.shape)
            if problem:
                raise LrdeployError(f"{plan.source}: site '{entry.site}': TT layout {problem}")
        else:
            full = rule.full_ranks(site)
            if len(ranks) != len(full) or not all(1 <= r <= f for r, f in
                                                  zip(ranks, full, strict=False)):
                raise LrdeployError(f"{plan.source}: ranks {entry.ranks} for site '{entry.site}' "
                                    f"must be {len(full)} number(s) between 1 and {list(full)}")
        groups.setdefault(type(rule), (rule, {}))[1][entry.site] = ranks
    for rule, ranks_by_site in groups.values():
        model = rule(model, ranks_by_site)
    return model
