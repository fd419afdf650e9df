"""Data-aware (whitened) against plain spatial SVD at equal ranks, on the k x k convolutions of
real models: does whitening by the vertical input patches (``passes.whitened_svd``) keep a
conv's outputs on data it was not fitted to?

    .venv/bin/python benchmarks/whitened_conv.py

Models and data:
    PP-OCRv6 det small (rapidocr's text detector, ONNX) at 160 x 160, calibrated on 32 of
    scikit-image's photos (benchmarks/requirements.txt), pixels scaled to [-1, 1] as rapidocr
    feeds it;
    the digits CNN of examples/digits_cnn.py (trained here in seconds), calibrated on its 32
    held-out digits.
The statistics are fitted on the first 24 samples and every error is measured on the last 8
(``split_calibration``, as ``--calib`` does). For each k x k site and each rank (1/8, 1/4, 1/2
of the full rank), the site is cut out alone (``planner.standalone``) and fed its own input
activations from the dense model; the figure is the relative L2 error of its outputs,
``||y' - y|| / ||y||`` over the 8 held-out samples, plain / whitened. For the digits CNN the
same is also measured at the model's logits, with its 3 x 3 conv factorized at a few ranks and
everything else dense (a site's error and the model's need not move together).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))

import lrdeploy  # noqa: E402
from lrdeploy import runtime  # noqa: E402
from lrdeploy.analysis import analyze_model  # noqa: E402
from lrdeploy.calibration import site_input_name, site_statistics, split_calibration  # noqa: E402
from lrdeploy.methods import PLAIN, rule_for  # noqa: E402
from lrdeploy.plan import Plan, PlanEntry  # noqa: E402
from lrdeploy.planner import standalone  # noqa: E402

RANK_FRACTIONS = (1 / 8, 1 / 4, 1 / 2)
CALIBRATION_SAMPLES = 32


def ocr_detector(folder: Path) -> tuple[Path, Path]:
    """rapidocr's PP-OCRv6 detector and 32 photos at 160 x 160 in [-1, 1]."""
    import importlib.metadata

    import torch
    from budget import skimage_photos
    from mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD

    model = next(f.locate() for f in importlib.metadata.files("rapidocr")
                 if str(f).endswith("PP-OCRv6_det_small.onnx"))
    photos = np.stack(skimage_photos(CALIBRATION_SAMPLES))  # ImageNet-normalised, 224 x 224
    unit = photos * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]
    small = torch.nn.functional.interpolate(torch.from_numpy(unit * 2 - 1), size=(160, 160),
                                            mode="bilinear").numpy()
    calib = folder / "photos.npz"
    np.savez(calib, x=small[:, None].astype(np.float32))
    return Path(model), calib


def digits_cnn(folder: Path) -> tuple[Path, Path]:
    """The digits CNN, trained, and its 32 held-out digits."""
    import digits_cnn as d

    model, _, held_out = d.train(128, 15)
    path = folder / "digits_cnn.onnx"
    d.export(model, path)
    calib = folder / "digits.npz"
    np.savez(calib, **{d.INPUT_NAME: held_out[:CALIBRATION_SAMPLES, None]})
    return path, calib


def site_errors(model_path: Path, calib: Path) -> None:
    loaded = lrdeploy.load(model_path)
    feeds = runtime.load_calibration(calib, runtime.input_specs(loaded.canonical))
    analysis = analyze_model(loaded.canonical, probe_feed=feeds[0])
    split = split_calibration(feeds)
    convs = [s for s in analysis.sites if s.is_conv and s.kernel != (1, 1)]
    grams, _ = site_statistics(analysis.model, convs, split.fit)
    inputs = {s.name: site_input_name(analysis.model, s) for s in convs}
    session = runtime.session(analysis.model, sorted(set(inputs.values())))
    captured = [{**feed, **runtime.run(session, feed)} for feed in split.held_out]
    for site in convs:
        alone = standalone(analysis.model, site)
        xs = [c[inputs[site.name]] for c in captured]
        dense = [runtime.run(runtime.session(alone), {"x": x})["y"] for x in xs]
        full = rule_for("spatial", site).full_ranks(site)[0]
        cells = []
        for rank in sorted({max(1, int(f * full)) for f in RANK_FRACTIONS}):
            errors = []
            for method in ("spatial", "wspatial"):
                factorized = runtime.session(rule_for(method, site, grams=grams)(
                    alone, {site.name: (rank,)}))
                squared = sum(np.sum((runtime.run(factorized, {"x": x})["y"] - y) ** 2)
                              for x, y in zip(xs, dense, strict=True))
                errors.append(np.sqrt(squared / sum(np.sum(y**2) for y in dense)))
            cells.append(f"r {rank:3d}: {errors[0]:.3f} / {errors[1]:.3f}")
        shape = "x".join(map(str, site.weight.shape))
        print(f"  {site.name[-28:]:28s} {shape:>12s}  " + "   ".join(cells), flush=True)


def model_errors(model_path: Path, calib: Path, ranks: tuple[int, ...]) -> None:
    """The model's output error with its widest k x k conv factorized alone, plain / whitened."""
    analysis = lrdeploy.analyze(model_path)
    widest = max((s for s in analysis.sites if s.is_conv and s.kernel != (1, 1)),
                 key=lambda s: s.weight.shape[1])
    for rank in ranks:
        aware = lrdeploy.compress(model_path, rank=f"rank:{rank}", method="spatial",
                                  only=[widest.name], calib=calib)
        plain = lrdeploy.compress(model_path, calib=calib, plan=Plan(
            [PlanEntry(e.site, PLAIN.get(e.method, e.method), e.ranks)
             for e in aware.plan.entries]))
        errors = [r.fidelity[0].relative_l2_error for r in (plain, aware)]
        print(f"  {widest.name} at rank {rank}: logits' relative error "
              f"{errors[0]:.4f} / {errors[1]:.4f}", flush=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        print("site output error on 8 held-out samples, plain / whitened spatial SVD")
        print("PP-OCRv6 det small (160 x 160), 32 scikit-image photos")
        site_errors(*ocr_detector(Path(folder)))
        print("digits CNN, its 32 held-out digits")
        digits = digits_cnn(Path(folder))
        site_errors(*digits)
        print("digits CNN, the model's logits, plain / whitened")
        model_errors(*digits, ranks=(1, 2, 4, 8))


if __name__ == "__main__":
    main()
