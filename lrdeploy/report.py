"""Reports: the JSON record of a compression and the terminal tables (rich).

JSON fields are documented in the README ("Report fields"); keep the two in step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from lrdeploy import __version__
from lrdeploy.analysis import ModelAnalysis
from lrdeploy.errors import LrdeployError
from lrdeploy.methods import DENSE, rule_for
from lrdeploy.plan import Plan
from lrdeploy.sites import model_params
from lrdeploy.verify import OutputFidelity


def build_report(
    *,
    source: str,
    output: str | os.PathLike[str] | None,
    plan_source: str,
    analysis: ModelAnalysis,
    plan: Plan,
    compressed: ir.Model,
    fidelity: Sequence[OutputFidelity],
    feed_source: str,
    feeds: int,
) -> dict:
    entries = {e.site: e for e in plan.entries}
    sites = []
    for site in analysis.sites:
        entry = entries.get(site.name)
        method = entry.method if entry else DENSE
        after_params, after_flops = site.params, site.flops
        if method != DENSE:
            cost = rule_for(method, site).cost(site, entry.rule_ranks())
            after_params, after_flops = cost.params, cost.flops
        sites.append({
            "site": site.name,
            "op": site.op,
            "weight_shape": list(site.weight.shape),
            "method": method,
            "ranks": list(entry.ranks) if entry and method != DENSE else [],
            "params_before": site.params,
            "params_after": after_params,
            "flops_before": site.flops,
            "flops_after": after_flops,
            "note": entry.note if entry else "not in the plan",
            **({"tt": entry.tt} if entry and entry.tt else {}),
        })
    flops_known = all(s["flops_before"] is not None for s in sites)
    totals = {
        "sites": len(sites),
        "sites_factorized": sum(s["method"] != DENSE for s in sites),
        "sites_skipped": len(analysis.skipped),
        "site_params_before": sum(s["params_before"] for s in sites),
        "site_params_after": sum(s["params_after"] for s in sites),
        "site_flops_before": sum(s["flops_before"] for s in sites) if flops_known else None,
        "site_flops_after": sum(s["flops_after"] for s in sites) if flops_known else None,
        "model_params_before": model_params(analysis.model),
        "model_params_after": model_params(compressed),
    }
    return {
        "lrdeploy_version": __version__,
        "source": source,
        "output": None if output is None else str(output),
        "plan_source": plan_source,
        # As applied: without calibration means a plan's bias correction is dropped.
        "bias_correction": plan.bias_correction,
        "tucker_sweeps": plan.tucker_sweeps,
        "inputs": analysis.input_rows(),
        "sites": sites,
        "skipped": analysis.skipped_rows(),
        "totals": totals,
        "verification": {
            "onnx_checker": "passed (full_check)",
            "feeds": feeds,
            "feed_source": feed_source,
            "outputs": [f.to_dict() for f in fidelity],
            "min_cosine": min((f.cosine for f in fidelity), default=1.0),
        },
    }


def _num(value: int | None) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _ranks(values: Sequence | None) -> str:
    if values is None:
        return "none"
    return "/".join(str(v) for v in values)


def _name_prefix(names: Sequence[str]) -> str:
    """The common path-like prefix of site names (up to a '/'), dropped in tables."""
    prefix = os.path.commonprefix(list(names)) if len(names) > 1 else ""
    return prefix[: prefix.rfind("/") + 1]


def _titled(title: str, prefix: str) -> str:
    return f"{title}, names under {prefix}" if prefix else title


def print_skipped(console: Console, skipped: Sequence[dict]) -> None:
    if not skipped:
        return
    prefix = _name_prefix([row["site"] for row in skipped])
    table = Table(title=_titled(f"Skipped operators ({len(skipped)})", prefix),
                  title_justify="left")
    for column in ("site", "op", "reason"):
        table.add_column(column)
    for row in skipped:
        table.add_row(row["site"][len(prefix):], row["op"], row["reason"])
    console.print(table)


def print_analysis(console: Console, rows: Sequence[dict], skipped: Sequence[dict],
                   inputs: Sequence[dict]) -> None:
    shapes = ", ".join(f"{i['name']}={list(i['shape'])}" for i in inputs)
    prefix = _name_prefix([row["site"] for row in rows])
    table = Table(title=_titled(f"Factorizable sites ({len(rows)}) at {shapes}", prefix),
                  title_justify="left")
    for column in ("site", "op", "weight", "method", "params", "FLOPs", "full", "erank",
                   "E90", "E95", "E99", "VBMF", "break-even"):
        table.add_column(column, justify="left" if column in ("site", "op", "method") else "right")
    for row in rows:
        table.add_row(
            row["site"][len(prefix):], row["op"], "x".join(map(str, row["weight_shape"])),
            row["method"],
            _num(row["params"]), _num(row["flops"]), _ranks(row["full_ranks"]),
            _ranks(row["effective_rank"]), _ranks(row["energy_90"]), _ranks(row["energy_95"]),
            _ranks(row["energy_99"]), _ranks(row["vbmf"]), _ranks(row["break_even_ranks"]),
        )
    console.print(table)
    print_skipped(console, skipped)


def print_compression(console: Console, report: dict) -> None:
    prefix = _name_prefix([row["site"] for row in report["sites"]])
    table = Table(title=_titled("Sites", prefix), title_justify="left")
    for column in ("site", "method", "ranks", "params", "FLOPs", "note"):
        table.add_column(column)
    for row in report["sites"]:
        table.add_row(
            row["site"][len(prefix):], row["method"], _ranks(row["ranks"]) if row["ranks"] else "",
            f"{_num(row['params_before'])} -> {_num(row['params_after'])}",
            f"{_num(row['flops_before'])} -> {_num(row['flops_after'])}",
            row["note"] if row["method"] == DENSE else "",
        )
    console.print(table)
    print_skipped(console, report["skipped"])
    totals = report["totals"]
    ratio = totals["model_params_after"] / max(totals["model_params_before"], 1)
    console.print(
        f"factorized {totals['sites_factorized']}/{totals['sites']} sites; model params "
        f"{totals['model_params_before']:,} -> {totals['model_params_after']:,} ({ratio:.1%}); "
        f"site FLOPs {_num(totals['site_flops_before'])} -> {_num(totals['site_flops_after'])}"
    )
    console.print(f"plan: {report['plan_source']}")
    verification = report["verification"]
    print_fidelity(console, f"Verification on {verification['feed_source']}",
                   verification["outputs"])


def print_fidelity(console: Console, title: str, rows: Sequence[dict]) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("output", "max abs error", "relative L2", "cosine", "float32 noise floor"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], f"{row['max_abs_error']:.3e}",
                      f"{row['relative_l2_error']:.3e}", f"{row['cosine']:.6f}",
                      f"{row['noise_floor']:.1e}")
    console.print(table)


def print_devices(console: Console, devices: Sequence) -> None:
    table = Table(title="Targets", title_justify="left")
    for column in ("name", "family", "triple", "cores", "GFLOP/s", "GB/s", "L2 KiB",
                   "flash / RAM KiB", "description"):
        table.add_column(column)
    for d in devices:
        memory = f"{d.flash_kib} / {d.ram_kib}" if d.flash_kib or d.ram_kib else "-"
        table.add_row(d.name, d.family, d.triple, str(d.cores), f"{d.peak_gflops:g}",
                      f"{d.bandwidth_gbs:g}", str(d.l2_kib), memory, d.description)
    console.print(table)


def print_manifest(console: Console, outdir: str | os.PathLike[str], manifest: dict) -> None:
    device = manifest["device"]
    inputs = ", ".join(f"{i['name']}={i['shape']}" for i in manifest["inputs"])
    console.print(f"compiled for {device['name']} ({device['triple']}): "
                  f"{os.path.join(outdir, manifest['artifact'])}")
    console.print(f"inputs {inputs}; weights embedded {manifest['param_bytes']:,} bytes "
                  f"(ONNX initializers {manifest['onnx_param_bytes']:,})")
    compression = manifest.get("compression")
    if compression:
        checked = compression["verification"]
        worst = max(checked["outputs"], key=lambda o: o["relative_l2_error"])
        console.print(f"compressed: parameters {compression['model_params_before']:,} -> "
                      f"{compression['model_params_after']:,} ({compression['sites_factorized']}"
                      f" of {compression['sites']} sites factorized); against the model as "
                      f"given, relative L2 error {worst['relative_l2_error']:.3e} (cosine "
                      f"{worst['cosine']:.6f}, output '{worst['name']}') on "
                      f"{checked['feed_source']}; details in "
                      f"{os.path.join(outdir, 'compression.json')}")
    half = manifest.get("half_precision")
    if half:
        worst = max(half["outputs"], key=lambda o: o["relative_l2_error"])
        console.print(f"float16: relative L2 error {worst['relative_l2_error']:.3e} (cosine "
                      f"{worst['cosine']:.6f}, output '{worst['name']}') against float32 "
                      f"onnxruntime, measured on a host build of the same float16 graph "
                      f"({half['feeds']})")
    mcu = manifest.get("mcu")
    if mcu:
        def kib(value: int) -> str:
            return f"{value / 1024:.1f} KiB"

        console.print(f"flash {kib(mcu['flash_bytes'])} of {kib(mcu['flash_limit_bytes'])} "
                      f"(weights {kib(mcu['weight_bytes'])}, code {kib(mcu['code_bytes'])}); "
                      f"RAM {kib(mcu['ram_bytes'])} of {kib(mcu['ram_limit_bytes'])} (arena "
                      f"{kib(mcu['arena_bytes'])}: lower bound {kib(mcu['arena_lower_bound'])}, "
                      f"without reuse {kib(mcu['arena_without_reuse'])}; stack "
                      f"{kib(mcu['stack_bytes'])})")
        console.print(f"build: make -C {outdir} host | lib | size | run-qemu")
    for note in manifest["notes"]:
        console.print(f"note: {note}")


def print_verification(console: Console, result) -> None:
    device = result.manifest["device"]
    if result.emulated:
        where = f"emulated under {device['emulator']} (no latency: emulated timings say nothing)"
    else:
        where = "built with the host C compiler" if device["family"] == "mcu" else "in-process"
    print_fidelity(console, f"{device['name']} artifact vs onnxruntime, {where}, on "
                            f"{result.feed_source}", [f.to_dict() for f in result.fidelity])


def _or_dash(value: float | None, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def _timing_cells(row: dict) -> list[str]:
    """A timing's cells from runtime to the largest relative error, as both the console table
    and the HTML page show them."""
    return [row["runtime"], row["where"] + (" [emulated]" if row["emulated"] else ""),
            str(len(row["samples_ms"])),
            *(_or_dash(row[k]) for k in ("median_ms", "p90_ms", "min_ms", "max_ms", "stddev_ms")),
            _or_dash(row["ratio_to_first"], "{:.2f}x"),
            _or_dash(row["max_relative_error"], "{:.1e}")]


def print_profile(console: Console, data: dict) -> None:
    emulated = " (EMULATED: timings say nothing about a real board)" \
        if data["device"].get("emulated") else ""
    table = Table(title=f"Latency, ms{emulated}", title_justify="left")
    for column in ("model", "runtime", "where", "runs", "median", "p90", "min", "max", "stddev",
                   "vs first", "max rel. error"):
        table.add_column(column)

    for row in data["timings"]:
        table.add_row(os.path.basename(row["model"].rstrip("/")), *_timing_cells(row))
    console.print(table)

    for row in data["timings"]:
        summary = row.get("layer_summary")
        if not summary:
            continue
        layers = sorted(row["layers"], key=lambda layer: -layer["ms"])
        title = (f"Per layer, {os.path.basename(row['model'].rstrip('/'))} on {row['runtime']}: "
                 f"{summary['total_ms']:.3f} ms in all, factorized sites "
                 f"{summary['share_factorized']:.0%}, dense sites "
                 f"{summary['share_dense_site']:.0%}, other {summary['share_other']:.0%}"
                 f" (top {min(TOP_LAYERS, len(layers))} of {len(layers)})")
        per_layer = Table(title=title, title_justify="left")
        for column in ("layer", "kind", "calls", "ms", "sites"):
            per_layer.add_column(column)
        for layer in layers[:TOP_LAYERS]:
            per_layer.add_row(layer["layer"], layer["kind"], str(layer["calls"]),
                              f"{layer['ms']:.3f}", ", ".join(layer["sites"]))
        console.print(per_layer)


TOP_LAYERS = 15


def write_profile_html(path: str | os.PathLike[str], data: dict) -> None:
    """A self-contained HTML page: the latency table and, per timing with layers, a bar chart
    of per-layer time (matplotlib, embedded as PNG) coloured by kind of layer."""
    import base64
    import html
    import io

    from lrdeploy.fileio import atomic_path

    plt = _pyplot()
    colours = {"factorized": "#2a9d8f", "dense_site": "#e76f51", "other": "#8d99ae"}
    device = data["device"]
    parts = [f"<h1>lrdeploy profile</h1><p>target {html.escape(str(device['target']))}, timed "
             f"{html.escape(str(device['where']))}</p>"]
    if device.get("emulated"):
        parts.append("<p><b>EMULATED device: these timings say nothing about a real "
                     "board.</b></p>")
    header = ("model", "runtime", "where", "runs", "median ms", "p90 ms", "min ms", "max ms",
              "stddev ms", "vs first", "max rel. error", "error")
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in (
            row["model"], *_timing_cells(row), row["error"] or "")) + "</tr>"
        for row in data["timings"])
    parts.append("<table border=1 cellpadding=4><tr>" + "".join(f"<th>{h}</th>" for h in header)
                 + f"</tr>{rows}</table>")
    for row in data["timings"]:
        layers = sorted(row.get("layers") or [], key=lambda layer: -layer["ms"])[:30]
        if not layers:
            continue
        figure, axes = plt.subplots(figsize=(10, 0.3 * len(layers) + 1.5))
        axes.barh([layer["layer"][-60:] for layer in layers][::-1],
                  [layer["ms"] for layer in layers][::-1],
                  color=[colours[layer["kind"]] for layer in layers][::-1])
        axes.set_xlabel("ms per inference" + (" (emulated)" if row["emulated"] else ""))
        axes.set_title(f"{os.path.basename(row['model'].rstrip('/'))} on {row['runtime']} "
                       "(green: factorized, orange: dense sites, grey: other)", fontsize=9)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=90)
        plt.close(figure)
        encoded = base64.b64encode(buffer.getvalue()).decode()
        parts.append(f"<h2>{html.escape(row['model'])} on {row['runtime']}</h2>"
                     f"<img alt='per-layer time' src='data:image/png;base64,{encoded}'>")
    with atomic_path(path) as tmp:
        tmp.write_text("<!doctype html><meta charset=utf-8><title>lrdeploy profile</title>"
                       + "".join(parts))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _measured_fits(outcome) -> list[dict]:
    """The plan's attempts that were measured within the budget (their error measured too)."""
    return [a for a in outcome.attempts if "measured_relative_error" in a]


PLOT_FORMATS = ("png", "svg", "pdf")


def plot_format(path: str | os.PathLike[str]) -> str:
    """The image format a plot's file name asks for (its suffix), refused when not one of
    ``PLOT_FORMATS``: an image under the wrong name opens nowhere."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise LrdeployError(f"{path}: a plot is written as {', '.join(PLOT_FORMATS)}; name the "
                            "file with one of those suffixes")
    return suffix


def plot_frontier(outcome, path: str | os.PathLike[str]) -> None:
    """An image (``plot_format``) of the Pareto frontier (predicted cost vs predicted error),
    the budget, the chosen plan as predicted and as measured, and the other plans measured
    within the budget."""
    from lrdeploy.fileio import atomic_path

    plt = _pyplot()
    unit = "ms" if outcome.kind == "ms" else "parameters"
    figure, axes = plt.subplots(figsize=(7, 4.5))
    points = outcome.frontier
    axes.step([p["cost"] for p in points], [p["predicted_relative_error"] for p in points],
              where="post", label="Pareto frontier (predicted)", color="#264653")
    axes.axvline(outcome.budget, color="#e76f51", linestyle="--",
                 label=f"budget {outcome.budget:.4g} {unit}")
    axes.axvline(outcome.dense, color="#8d99ae", linestyle=":", label="dense model")
    axes.plot([outcome.predicted], [outcome.predicted_error], "o", color="#2a9d8f",
              label="chosen plan, predicted")
    fits = _measured_fits(outcome)
    axes.plot([a["measured"] for a in fits], [a["measured_relative_error"] for a in fits], "+",
              color="#8d99ae", ms=8, label="plans measured within the budget")
    axes.plot([outcome.measured], [outcome.measured_error], "x", color="#e9c46a", ms=10,
              mew=3, label="chosen plan, measured")
    axes.set_yscale("symlog", linthresh=1e-3)
    axes.set_xlabel(f"{unit} ({outcome.engine})")
    axes.set_ylabel("relative output error")
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=plot_format(path), dpi=100)
    plt.close(figure)


def print_plan(console: Console, outcome, frontier_rows: int = 12) -> None:
    """The chosen plan per site, the budget check, and a thinned Pareto frontier."""
    unit = outcome.unit
    timed = outcome.kind == "ms"  # a parameter budget times nothing
    sites = Table(title="plan", title_justify="left")
    for column in ("site", "method", "ranks", *(("dense ms", "chosen ms") if timed else ()),
                   "params", "site err", "sensitivity"):
        sites.add_column(column, justify="left" if column in ("site", "method") else "right")
    for row in outcome.sites:
        sites.add_row(row["site"], row["method"], _ranks(row["ranks"]),
                      *((f"{row['dense_ms']:.4f}", f"{row['chosen_ms']:.4f}") if timed else ()),
                      f"{_num(row['params_before'])} -> {_num(row['params_after'])}",
                      f"{row['site_error']:.3g}", _or_dash(row["sensitivity"], "{:.3g}"))
    console.print(sites)
    # The engine goes in the column header: as the title of this narrow table it wrapped.
    frontier = Table(title="Pareto frontier", title_justify="left")
    frontier.add_column(f"{unit} ({outcome.engine})" if timed else unit, justify="right")
    frontier.add_column("predicted relative error", justify="right")
    points = outcome.frontier
    step = max(1, len(points) // frontier_rows)
    for point in points[::step]:
        frontier.add_row(outcome.amount(point["cost"]),
                         f"{point['predicted_relative_error']:.4g}")
    console.print(frontier)
    # The additive prediction can read far above 1 where the measured error is near 1
    # (MobileNetV2: predicted 3.73, measured 0.96), so every measured error is shown beside it.
    measured = ", ".join(f"{outcome.amount(a['measured'])} {unit} -> error "
                         f"{a['measured_relative_error']:.4g}" for a in _measured_fits(outcome))
    console.print("predicted error: the sites' errors added (e^2 = sum of e_s^2), which "
                  "overstates large errors; plans measured within the budget: "
                  f"{measured or 'none'}")
    chains = (f"; chains {'estimated' if outcome.estimate else 'timed'} "
              f"{outcome.chains_measured}, from the cache {outcome.chains_cached}"
              if timed else "")
    console.print(
        f"{outcome.budget_line()}; relative output error predicted "
        f"{outcome.predicted_error:.4g}, measured {outcome.measured_error:.4g}"
        f"{' with biases corrected' if outcome.plan.bias_correction else ''}, min cosine "
        f"{outcome.cosine:.6f}{chains}")
