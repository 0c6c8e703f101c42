"""Runs exported models with plain PyTorch, in a process where bnnify cannot be imported.

    python -I tests/plain_check.py JOBS.json INPUTS.safetensors OUT.safetensors

Each job names a file written by `bnnify export` and how a user without bnnify loads
it; its outputs on the inputs (all rows, and the first 7 again: any batch size must
work) are written to OUT as `<job>.<output>` and `<job>.<output>.part`. Not a test
module: `test_export.py` runs it with `python -I` (no current folder on the path).
"""

from __future__ import annotations

import importlib.abc
import json
import sys
from pathlib import Path


class _NoBnnify(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "bnnify" or name.startswith("bnnify."):
            raise ImportError(f"{name} is blocked: exported models must not need it")
        return None


import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402


def _demo_mlp() -> nn.Module:
    """The architecture of `bnnify.demo.build_model`, written out: the user's own code."""
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))


def _state(job: dict) -> dict:
    if job["format"] == "safetensors":
        return load_file(job["path"])
    return torch.load(job["path"], weights_only=True)


def _module(job: dict) -> nn.Module:
    fmt = job["format"]
    if fmt == "torchscript":
        return torch.jit.load(job["path"])
    if fmt == "export":
        return torch.export.load(job["path"]).module()
    base = job["base"]
    if base == "demo_mlp":
        module = _demo_mlp()
    elif base.endswith(".pt2"):
        module = torch.export.load(base).module()
    else:
        module = torch.jit.load(base)
    module.load_state_dict(_state(job), strict=True)
    return module.eval() if base == "demo_mlp" else module


def main() -> None:
    # Blocked here, not on import: pytest's doctest collection imports this file, and a
    # blocker installed then would stop the whole test session from importing bnnify.
    sys.meta_path.insert(0, _NoBnnify())
    jobs_path, inputs_path, out_path = sys.argv[1:4]
    try:
        import bnnify  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("bnnify could be imported")
    inputs = load_file(inputs_path)
    results = {}
    with torch.no_grad():
        for job in json.loads(Path(jobs_path).read_text()):
            module = _module(job)
            x = inputs[job["inputs"]]
            for suffix, rows in (("", x), (".part", x[:7])):
                found = module(rows)
                found = found if isinstance(found, tuple) else (found,)
                for name, tensor in zip(job["outputs"], found, strict=True):
                    results[f"{job['name']}.{name}{suffix}"] = tensor.contiguous()
    assert not any(name.startswith("bnnify") for name in sys.modules)
    save_file(results, out_path)


if __name__ == "__main__":
    main()
