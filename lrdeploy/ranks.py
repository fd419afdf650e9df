"""Rank rules (``--rank``): how many singular directions each site keeps.

A rule is resolved per site against the spectra of the matrices its method factorizes (one
matrix per rank, see ``Factorization.unfoldings``):

    full        every rank at its maximum (exact rewrite; used to prove the passes exact)
    rank:R      min(R, full) for every rank
    ratio:F     the largest ranks, scaled uniformly, whose parameters are <= F x the dense ones
    energy:E    the smallest rank keeping a fraction E of sum(s_i^2)
    erank[:K]   K x the effective rank (Roy & Vetterli 2007), rounded; K defaults to 1
    vbmf        the rank chosen by empirical variational Bayesian MF (Nakajima et al.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lrdeploy.decompositions import effective_rank, energy_rank, evbmf_rank
from lrdeploy.errors import LrdeployError

RULE_SYNTAX = "full, rank:R, ratio:F, energy:E, erank, erank:K or vbmf"


@dataclass(frozen=True)
class RankRule:
    kind: str
    value: float | None = None

    def __str__(self) -> str:
        if self.value is None:
            return self.kind
        value = int(self.value) if self.kind == "rank" else self.value
        return f"{self.kind}:{value}"


def parse_rank_rule(text: str) -> RankRule:
    """Parse a ``--rank`` rule; a malformed one raises a one-line ``LrdeployError``."""
    match = re.fullmatch(r"\s*([a-z]+)\s*(?::\s*([^\s]+))?\s*", text or "")
    if not match:
        raise LrdeployError(f"--rank {text!r}: expected one of {RULE_SYNTAX}")
    kind, arg = match.group(1), match.group(2)
    if kind in ("full", "vbmf") and arg is None:
        return RankRule(kind)
    if kind == "erank" and arg is None:
        return RankRule(kind, 1.0)
    try:
        value = float(arg) if arg is not None else None
    except ValueError:
        value = None
    checks: dict[str, tuple[Callable[[float], bool], str]] = {
        "rank": (lambda v: v >= 1 and v == int(v), "a whole number >= 1"),
        "ratio": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
        "energy": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
        "erank": (lambda v: v > 0, "a positive factor"),
    }
    if kind not in checks or value is None or not math.isfinite(value):
        raise LrdeployError(f"--rank {text!r}: expected one of {RULE_SYNTAX}")
    accept, meaning = checks[kind]
    if not accept(value):
        raise LrdeployError(f"--rank {text!r}: the value of {kind} must be {meaning}")
    return RankRule(kind, value)


def scaled_ranks(full: Sequence[int], fraction: float) -> tuple[int, ...]:
    """Each rank at ``fraction`` of its maximum, rounded up, at least 1."""
    return tuple(max(1, min(f, math.ceil(fraction * f - 1e-9))) for f in full)


def largest_scaled_ranks(
    full: Sequence[int], accept: Callable[[tuple[int, ...]], bool]
) -> tuple[int, ...] | None:
    """The largest ranks, scaled uniformly from 1 / max(full) up, that ``accept`` takes (the
    cost of a choice grows with the scale, so the search stops at the first refusal); None if
    even the smallest is refused."""
    steps = max(full)
    best = None
    for step in range(1, steps + 1):
        ranks = scaled_ranks(full, step / steps)
        if not accept(ranks):
            break
        best = ranks
    return best


def resolve_ranks(
    rule: RankRule,
    spectra: Sequence[np.ndarray],
    unfoldings: Sequence[np.ndarray],
    params_of: Callable[[Sequence[int]], int],
    dense_params: int,
) -> tuple[int, ...]:
    """The ranks ``rule`` gives one site (``params_of`` prices a choice of ranks)."""
    full = [len(s) for s in spectra]
    if rule.kind == "full":
        return tuple(full)
    if rule.kind == "rank":
        return tuple(min(int(rule.value), f) for f in full)
    if rule.kind == "energy":
        return tuple(energy_rank(s, rule.value) for s in spectra)
    if rule.kind == "erank":
        return tuple(max(1, min(f, round(rule.value * effective_rank(s))))
                     for s, f in zip(spectra, full, strict=False))
    if rule.kind == "vbmf":
        return tuple(min(f, evbmf_rank(s, m.shape))
                     for s, m, f in zip(spectra, unfoldings, full, strict=False))
    if rule.kind == "ratio":
        budget = rule.value * dense_params
        best = largest_scaled_ranks(full, lambda ranks: params_of(ranks) <= budget)
        return best or scaled_ranks(full, 1 / max(full))
    raise LrdeployError(f"unknown rank rule {rule.kind!r}")
