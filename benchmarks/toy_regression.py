"""A calibrated 1-D regression through the Python API: the README's coverage curve.

    python benchmarks/toy_regression.py

y = sin(1.5 x) + 0.1 noise on [-5, 5]: a 1-32-32-1 MLP is trained, converted, fitted,
calibrated on a validation set and predicted on a test set (`--keep-samples
--keep-inputs`); `bnnify.plot` draws the coverage curve (copied to `docs/images/`) and
the 1-D bands, and the numbers go to `benchmarks/results/toy_regression.json`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

import bnnify

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
RESULTS = ROOT / "benchmarks" / "results" / "toy_regression.json"


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=generator) * 10 - 5
    return x, torch.sin(1.5 * x) + 0.1 * torch.randn(n, 1, generator=generator)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    (x, y), val, test = data(512, 0), data(256, 1), data(256, 2)
    net = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(800):
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()
    net.eval()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        ckpt = folder / "toy.bnn.safetensors"
        bnnify.convert(net, output=ckpt, report=folder / "toy.kl.safetensors")
        fitted = bnnify.fit(ckpt, net, (x, y), task="regression", epochs=100, lr=0.01)
        calibrated = bnnify.calibrate(fitted.output, net, val)
        output = folder / "toy.safetensors"
        predicted = bnnify.predict(
            calibrated.output,
            net,
            test[0],
            targets=test[1],
            keep_samples=True,
            keep_inputs=True,
            output=output,
        )
        drawn = bnnify.plot(
            predictions=output, figures=["coverage", "bands"], out_dir=folder, force=True
        )
        IMAGES.mkdir(parents=True, exist_ok=True)
        image = (folder / "toy.coverage.png").read_bytes()  # the bands (~100 KB) stay out
        (IMAGES / "toy_coverage.png").write_bytes(image)
    result = {
        "scale": calibrated.calibration.values["bayesian"],
        "validation": calibrated.calibration.record["bayesian"],
        "test": predicted.metrics["bayesian"],
        "coverage_drawn": drawn.figures["coverage"]["drawn"],
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"scale": result["scale"], "test": result["test"]}, indent=2))


if __name__ == "__main__":
    main()
