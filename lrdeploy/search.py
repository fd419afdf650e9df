"""Multiple-choice knapsack: one option per group, least total error within a total cost.

The planner's search. Each site (group) offers options (dense, and each method and ranks) with
a cost (latency in ms, or parameters) and an error; the best plan for a budget B solves

    minimise  sum_s error[s, c_s]   subject to   sum_s cost[s, c_s] <= B

by dynamic programming over the cost discretised into bins of ``bin_size`` (each option's cost
rounded to the nearest bin): ``best[b]`` is the least error of a choice for the sites so far
whose cost is b bins. One table answers every budget, so the whole Pareto frontier (cost vs
error) comes from the same pass. Time and memory are O(groups x options x bins).

A budget is answered by the table's choices, least error first, at their *exact* costs: the
first that fits is returned. Rounding to the nearest bin (not up) keeps the plans whose costs
round up but fit, such as the dense model under a budget equal to its own cost, which rounding
every site up excluded; the exact check keeps out those whose costs round down but do not fit.
The table keeps one choice per bin, so with coarse bins a choice that fits can still be missed
(60 of 384,000 random cases at 4000 bins); with integer costs and ``bin_size=1`` the result is
exact.

No library offers a multiple-choice knapsack with the frontier (OR-Tools' knapsack solver is
0/1 only and is not a dependency here), hence this implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lrdeploy.errors import LrdeployError


@dataclass(frozen=True)
class Option:
    cost: float
    error: float


@dataclass(frozen=True)
class Choice:
    """One option index per group, with the total cost and error of that choice."""

    picks: tuple[int, ...]
    cost: float
    error: float


class Frontier:
    """The solved table; ``best(budget)`` and ``points()`` read it."""

    def __init__(self, groups: Sequence[Sequence[Option]], bin_size: float) -> None:
        if bin_size <= 0:
            raise ValueError("bin_size must be positive")
        if any(not options for options in groups):
            raise ValueError("every group needs at least one option")
        self.groups = [list(options) for options in groups]
        self.bin_size = bin_size
        self._bins = [[self._to_bins(o.cost) for o in options] for options in self.groups]
        width = sum(max(b) for b in self._bins) + 1
        best = np.full(width, np.inf)
        best[0] = 0.0
        self._picks = np.zeros((len(self.groups), width), dtype=np.int32)
        for index, options in enumerate(self.groups):
            table = np.full((len(options), width), np.inf)
            for pick, (option, bins) in enumerate(zip(options, self._bins[index], strict=True)):
                table[pick, bins:] = best[: width - bins] + option.error
            self._picks[index] = np.argmin(table, axis=0)
            best = table[self._picks[index], np.arange(width)]
        self._best = best

    def _to_bins(self, cost: float) -> int:
        if cost < 0:
            raise ValueError("option costs must be >= 0")
        return round(cost / self.bin_size)

    def _choice_at(self, bins: int) -> Choice:
        picks = []
        for index in range(len(self.groups) - 1, -1, -1):
            pick = int(self._picks[index, bins])
            picks.append(pick)
            bins -= self._bins[index][pick]
        picks.reverse()
        options = [g[p] for g, p in zip(self.groups, picks, strict=True)]
        return Choice(tuple(picks), sum(o.cost for o in options), sum(o.error for o in options))

    @property
    def least_cost(self) -> float:
        """The cost of the cheapest choice (every group at its cheapest option)."""
        return sum(min(o.cost for o in options) for options in self.groups)

    def best(self, budget: float) -> Choice:
        """The least-error choice of the table whose exact cost fits ``budget`` (the cheapest
        choice when none of the table's does)."""
        fits = budget * (1 + 1e-12) + 1e-12
        least = self.least_cost
        if least > fits:
            raise LrdeployError(f"budget {budget:g} is below the least reachable cost "
                                f"{least:g}")
        # A choice that fits can round up by half a bin per group.
        limit = min(len(self._best) - 1,
                    math.floor(budget / self.bin_size + len(self.groups) / 2))
        errors = self._best[: limit + 1]
        for bins in np.argsort(errors, kind="stable"):
            if not np.isfinite(errors[bins]):
                break
            choice = self._choice_at(int(bins))
            if choice.cost <= fits:
                return choice
        return self.cheapest()

    def cheapest(self) -> Choice:
        """Every group at its cheapest option (the least error among equally cheap ones)."""
        picks = tuple(min(range(len(options)), key=lambda i: (options[i].cost, options[i].error))
                      for options in self.groups)
        chosen = [g[p] for g, p in zip(self.groups, picks, strict=True)]
        return Choice(picks, sum(o.cost for o in chosen), sum(o.error for o in chosen))

    def points(self) -> list[Choice]:
        """The Pareto frontier: every choice that no cheaper choice matches in error."""
        out: list[Choice] = []
        best_error = np.inf
        for bins in np.flatnonzero(np.isfinite(self._best)):
            if self._best[bins] < best_error - 1e-15:
                best_error = self._best[bins]
                out.append(self._choice_at(int(bins)))
        return out
