"""`bnnify env`: the versions and settings a bug report needs."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

from bnnify.cli.options import JsonOpt
from bnnify.cli.output import Output, command

__all__ = ["env"]

_PACKAGES = ("typer", "rich", "safetensors", "pyyaml", "numpy")


@command
def env(json: JsonOpt = False) -> None:
    """Print bnnify's, Python's and torch's versions, the devices and the thread count."""
    out = Output(command="env", json_mode=json)
    info = _environment()
    out.json(info)
    torch_info, device = info["torch"], info["device"]
    out.line(f"bnnify {info['bnnify']}")
    out.line(f"Python {info['python']} ({info['platform']})")
    out.line(
        f"torch {torch_info['version'] or 'not installed'}"
        + (f" (CUDA {torch_info['cuda']})" if torch_info["cuda"] else "")
    )
    out.line(f"device {device['default']}; CUDA devices: {', '.join(device['cuda']) or 'none'}")
    threads = info["threads"]
    omp = threads["omp"] or "unset"
    out.line(f"threads {threads['torch']} of {threads['cpus']} CPUs (OMP_NUM_THREADS {omp})")
    packages = ", ".join(f"{k} {v or 'not installed'}" for k, v in info["packages"].items())
    out.line(f"packages: {packages}")


def _environment() -> dict[str, Any]:
    import bnnify

    try:
        import torch
    except ImportError:  # a broken install is what a bug report may be about
        torch = None
    cuda = torch is not None and torch.cuda.is_available()
    names = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    )
    return {
        "bnnify": bnnify.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": {
            "version": None if torch is None else torch.__version__,
            "cuda": None if torch is None else torch.version.cuda,
        },
        "device": {"default": "cuda" if cuda else "cpu", "cuda": names},
        "threads": {
            "torch": None if torch is None else torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS"),
            "cpus": os.cpu_count(),
        },
        "packages": {name: _version(name) for name in _PACKAGES},
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
