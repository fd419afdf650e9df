"""Per-site spectra and the figures a user needs to pick ranks (``lrdeploy analyze``).

For each site, under the method ``--method auto`` would give it: parameters, FLOPs at the
analysed input shape, the effective rank, the ranks keeping 90/95/99% of the spectral energy, the
rank EVBMF keeps (the singular values it tells from noise), and the break-even ranks above
which factorizing no longer reduces both parameters and FLOPs.
Methods with two ranks (Tucker-2: output, input channels) report a pair for each figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lrdeploy import runtime
from lrdeploy.decompositions import effective_rank, energy_rank, evbmf_rank, singular_values
from lrdeploy.methods import Grams, Means, method_for, rule_for
from lrdeploy.passes.base import Cost, Factorization
from lrdeploy.ranks import largest_scaled_ranks
from lrdeploy.sites import Site, SkippedSite, find_sites, model_params

ENERGY_LEVELS = (0.90, 0.95, 0.99)


def pays_off(cost: Cost, site: Site) -> bool:
    """True when a chain of ``cost`` has fewer parameters than the dense ``site``, and fewer
    FLOPs where both are known (the break-even guard)."""
    flops_ok = cost.flops is None or site.flops is None or cost.flops < site.flops
    return cost.params < site.params and flops_ok


@dataclass
class SiteSpectra:
    """A site's factorization rule and the singular values and shape of each of its
    unfoldings."""

    site: Site
    rule: Factorization
    spectra: list[np.ndarray]
    shapes: list[tuple[int, int]]

    @property
    def full_ranks(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.spectra)

    def effective_ranks(self) -> tuple[float, ...]:
        return tuple(effective_rank(s) for s in self.spectra)

    def energy_ranks(self, energy: float) -> tuple[int, ...]:
        return tuple(energy_rank(s, energy) for s in self.spectra)

    def vbmf_ranks(self) -> tuple[int, ...]:
        return tuple(evbmf_rank(s, shape) for s, shape in zip(self.spectra, self.shapes,
                                                               strict=True))

    def is_profitable(self, ranks: Sequence[int]) -> bool:
        """True when ``ranks`` reduce parameters, and FLOPs where they are known."""
        return pays_off(self.rule.cost(self.site, ranks), self.site)

    def break_even_ranks(self) -> tuple[int, ...] | None:
        """The largest uniformly scaled ranks that still pay off (None: not even rank 1 does)."""
        return largest_scaled_ranks(self.full_ranks, self.is_profitable)


def site_spectra(site: Site, method: str, tucker_sweeps: int = 0,
                 grams: Grams | None = None) -> SiteSpectra | None:
    rule = rule_for(method, site, tucker_sweeps, grams)
    if rule is None:
        return None
    unfoldings = rule.unfoldings(site)
    return SiteSpectra(site, rule, [singular_values(m) for m in unfoldings],
                       [m.shape for m in unfoldings])


@dataclass
class ModelAnalysis:
    """A canonical model, its input specs, and its sites with shapes at those inputs;
    ``grams`` and ``means`` (calibration statistics, ``lrdeploy.calibration``) make SVD
    data-aware and correct its biases."""

    model: ir.Model
    specs: list[runtime.InputSpec]
    sites: list[Site]
    skipped: list[SkippedSite]
    grams: Grams | None = None
    means: Means | None = None
    _spectra: dict[tuple[str, str], SiteSpectra | None] = field(default_factory=dict)

    def spectra(self, site: Site, method: str) -> SiteSpectra | None:
        key = (site.name, method)
        if key not in self._spectra:
            self._spectra[key] = site_spectra(site, method, grams=self.grams)
        return self._spectra[key]

    @property
    def total_params(self) -> int:
        return model_params(self.model)

    def input_rows(self) -> list[dict]:
        """The inputs analysed, JSON-ready (``assumed_axes``: sizes taken by default)."""
        return [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape),
                 "assumed_axes": list(s.assumed)} for s in self.specs]

    def skipped_rows(self) -> list[dict]:
        return [{"site": s.name, "op": s.op, "reason": s.reason} for s in self.skipped]

    def rows(self) -> list[dict]:
        """One JSON-ready record per site (the ``analyze`` table)."""
        out = []
        for site in self.sites:
            method = method_for("auto", site, self.grams is not None)
            spectra = self.spectra(site, method)
            out.append({
                "site": site.name,
                "op": site.op,
                "weight_shape": list(site.weight.shape),
                "method": method,
                "params": site.params,
                "flops": site.flops,
                "full_ranks": list(spectra.full_ranks),
                "effective_rank": [round(e, 2) for e in spectra.effective_ranks()],
                **{f"energy_{round(level * 100)}": list(spectra.energy_ranks(level))
                   for level in ENERGY_LEVELS},
                "vbmf": list(spectra.vbmf_ranks()),
                "break_even_ranks": _list_or_none(spectra.break_even_ranks()),
            })
        return out


def _list_or_none(ranks: tuple[int, ...] | None) -> list[int] | None:
    return None if ranks is None else list(ranks)


def analyze_model(
    model: ir.Model,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    probe_feed: runtime.Feeds | None = None,
) -> ModelAnalysis:
    """Find the sites of a canonical model and their concrete shapes at the given inputs.

    Shapes come from one onnxruntime run on ``probe_feed`` (default: seeded random inputs).
    """
    specs = runtime.input_specs(model, input_shapes)
    if probe_feed is not None:
        specs = [runtime.InputSpec(s.name, s.dtype, tuple(probe_feed[s.name].shape))
                 for s in specs]
    provisional = find_sites(model)
    if not provisional.sites:
        return ModelAnalysis(model, specs, [], provisional.skipped)
    wanted = set()
    nodes = {node.name: node for node in model.graph}
    for site in provisional.sites:
        node = nodes[site.name]
        wanted.update(v.name for v in (*node.inputs[:2], node.outputs[0]) if v is not None)
    feed = probe_feed if probe_feed is not None else runtime.random_inputs(model, specs, seed)
    shapes = runtime.probe_shapes(model, feed, wanted)
    shapes.update({spec.name: spec.shape for spec in specs})
    scan = find_sites(model, shapes)
    return ModelAnalysis(model, specs, scan.sites, scan.skipped)
