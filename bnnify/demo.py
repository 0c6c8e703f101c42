"""A small trained model for `make demo`, the sample specs and the tests.

`python -m bnnify.demo OUT.pt` trains a 8-32-1 MLP on a synthetic regression task
(seeded, a second on a laptop) and saves it as TorchScript, its state dict beside
it (`OUT.state_dict.pt`, for the `arch` example spec) and the data
(`train.safetensors`, `val.safetensors`, `test.safetensors`: tensors `x` and `y`) for
`bnnify fit`, `bnnify calibrate` and `bnnify predict`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

__all__ = ["build_model", "main", "synthetic_regression", "train_demo_model"]


def build_model(in_features: int = 8, hidden: int = 32, out_features: int = 1) -> nn.Module:
    """The demo architecture: Linear-BatchNorm-ReLU-Linear (used by `arch:` specs)."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, out_features),
    )


def synthetic_regression(n: int, in_features: int = 8, seed: int = 0) -> tuple:
    """`(x, y)` with y = sin(2 x . w) + 0.1 noise; `seed` draws x and the noise, w is fixed."""
    w = torch.randn(in_features, generator=torch.Generator().manual_seed(1234))
    w = w / in_features**0.5
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=generator)
    y = torch.sin(2 * x @ w) + 0.1 * torch.randn(n, generator=generator)
    return x, y.unsqueeze(1)


def train_demo_model(seed: int = 0, epochs: int = 200) -> nn.Module:
    """Trains `build_model()` on `synthetic_regression` (full batch, Adam)."""
    torch.manual_seed(seed)
    x, y = synthetic_regression(512, seed=seed)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="TorchScript file to write")
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    model = train_demo_model()
    torch.jit.save(torch.jit.script(model), str(args.output))
    state_path = args.output.with_suffix(".state_dict.pt")
    torch.save(model.state_dict(), state_path)
    folder = args.output.parent
    x, y = synthetic_regression(512, seed=0)
    save_file({"x": x, "y": y}, str(folder / "train.safetensors"))
    x, y = synthetic_regression(256, seed=2)
    save_file({"x": x, "y": y}, str(folder / "val.safetensors"))
    x, y = synthetic_regression(256, seed=1)
    save_file({"x": x, "y": y}, str(folder / "test.safetensors"))
    with torch.no_grad():
        rmse = nn.functional.mse_loss(model(x), y).sqrt().item()
    print(
        f"trained demo model (test RMSE {rmse:.3f}): wrote {args.output}, {state_path}, "
        f"{folder / 'train.safetensors'}, {folder / 'val.safetensors'} and "
        f"{folder / 'test.safetensors'}"
    )


if __name__ == "__main__":
    main()
