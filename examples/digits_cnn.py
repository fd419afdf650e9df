"""A small CNN for microcontrollers, trained in seconds on scikit-learn's bundled digits (1,797
8x8 handwritten digits, 0..16 grey levels), and exported to ONNX for ``--target cortex-m4``.

    python examples/digits_cnn.py -o out/digits                 # digits_cnn.onnx, ~72k params
    python examples/digits_cnn.py -o out/digits --hidden 1024   # ~540k params: too big for 1 MiB
    lrdeploy compile out/digits/digits_cnn.onnx --target cortex-m4 -o out/digits/m4
    lrdeploy verify out/digits/m4 --calib out/digits/digits_calib.npz --emulate

Writes the model, ``digits_calib.npz`` (32 held-out images, the model's input name as key) for
``--calib``, and prints the held-out accuracy. Only the data file of scikit-learn is read (it is
installed with --no-deps), so scikit-learn itself is never imported.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAME = "image"


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 8, 8) scaled to [0, 1] and labels (N,), from sklearn's digits.csv.gz."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-learn is not installed: run scripts/setup.sh")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    return (table[:, :64] / 16.0).reshape(-1, 1, 8, 8), table[:, 64].astype(np.int64)


class DigitsCNN(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train(hidden: int = 128, epochs: int = 15,
          seed: int = 0) -> tuple[DigitsCNN, float, np.ndarray]:
    """The trained model, its accuracy on the held-out fifth, and the held-out images."""
    torch.manual_seed(seed)
    images, labels = load_digits()
    order = np.random.default_rng(seed).permutation(len(images))
    held_out = order[: len(order) // 5]
    train_idx = order[len(order) // 5:]
    x, y = torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx])
    model = DigitsCNN(hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(images[held_out])).argmax(1).numpy()
    return model, float((predicted == labels[held_out]).mean()), images[held_out]


def export(model: nn.Module, path: Path) -> None:
    # The TorchScript exporter writes one self-contained file (the dynamo exporter puts the
    # weights in a separate .data file and logs its progress); its deprecation notice is noise
    # to someone running the example.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript",
                                DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False,
                          input_names=[INPUT_NAME], output_names=["logits"], opset_version=17)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--outdir", default="out/digits", help="where to write")
    parser.add_argument("--hidden", type=int, default=128,
                        help="width of the hidden Linear layer (default 128)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--name", help="file name of the model (default digits_cnn[_HIDDEN])")
    args = parser.parse_args()
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    model, accuracy, held_out = train(args.hidden, args.epochs)
    name = args.name or ("digits_cnn" if args.hidden == 128 else f"digits_cnn_{args.hidden}")
    path = outdir / f"{name}.onnx"
    export(model, path)
    calib = outdir / "digits_calib.npz"
    np.savez(calib, **{INPUT_NAME: held_out[:32, None]})
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({params:,} params, held-out accuracy {accuracy:.3f}) and {calib}")


if __name__ == "__main__":
    main()
