"""Conversion of safetensors models with many small tensors: the cost must stay linear.

    python benchmarks/bench_many_tensors.py [--counts 1000 2500 5000 10000] [--repeat 1]
        [--out benchmarks/out/bench_many_tensors.json]

Each model holds N float32 tensors of 16 elements. Opening the model (`load_model`:
format detection, hashing, header validation) and converting it (`convert`: posterior,
prior, KL and the two output files) are timed in this process, each the best of
`--repeat` runs. Reported per N: seconds, tensors per second, and the cost per tensor
relative to the smallest N (1.0 means linear; a header re-read per tensor, as before,
made it grow with N). Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import environment, write_json

from bnnify.formats.model_files import load_model
from bnnify.formats.spec import resolve_spec
from bnnify.usecases.convert import convert


def make_model(folder: Path, count: int) -> Path:
    path = folder / f"many{count}.safetensors"
    generator = torch.Generator().manual_seed(count)
    tensors = {f"layers.{i}.weight": torch.randn(16, generator=generator) for i in range(count)}
    save_file(tensors, path)
    return path


def time_one(model: Path, out: Path) -> tuple[float, float]:
    """Seconds to open the model, and to convert it."""
    start = time.perf_counter()
    with load_model(model) as loaded:
        opened = time.perf_counter()
        convert(
            loaded,
            resolve_spec(None),
            output=out / "c.bnn.safetensors",
            report=out / "c.kl.safetensors",
            force=True,
        )
    return opened - start, time.perf_counter() - opened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 2500, 5000, 10000])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_many_tensors.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        time_one(make_model(folder, 10), folder)  # warm-up: imports, first kernels
        for count in sorted(args.counts):
            model = make_model(folder, count)
            runs = [time_one(model, folder) for _ in range(args.repeat)]
            opened, converted = min(runs, key=sum)
            rows.append({"tensors": count, "open_s": opened, "convert_s": converted})
    base = (rows[0]["open_s"] + rows[0]["convert_s"]) / rows[0]["tensors"]
    print(f"{'tensors':>8} {'open s':>8} {'convert s':>10} {'tensors/s':>10} {'cost/tensor':>12}")
    for row in rows:
        total = row["open_s"] + row["convert_s"]
        row["tensors_per_s"] = row["tensors"] / total
        row["per_tensor_ratio"] = (total / row["tensors"]) / base
        print(
            f"{row['tensors']:>8} {row['open_s']:>8.2f} {row['convert_s']:>10.2f} "
            f"{row['tensors_per_s']:>10.0f} {row['per_tensor_ratio']:>11.2f}x"
        )
    write_json(args.out, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
