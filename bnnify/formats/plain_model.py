"""Plain PyTorch model files, as `bnnify export` writes them: nothing in them needs bnnify.

| format | written with | read back with |
| --- | --- | --- |
| `state_dict` | `torch.save` of a dict of tensors | `torch.load(path, weights_only=True)` |
| `safetensors` | safetensors (metadata `bnnify.export`) | `safetensors.torch.load_file` |
| `torchscript` | `torch.jit.save` (extra file `bnnify.json`) | `torch.jit.load` |
| `export` | `torch.export.save` (extra file `bnnify.json`) | `torch.export.load(path).module()` |

The provenance (`bnnify.json`, or the safetensors metadata) is a JSON object a reader may
ignore: the checkpoint, its source model and the weights chosen.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnnify.enums import ExportFormat
from bnnify.formats.export_archive import load_export, unlift
from bnnify.formats.safetensors_io import save_file
from bnnify.formats.safetensors_reader import SafetensorsFile

__all__ = ["EXTENSIONS", "PROVENANCE_KEY", "independent", "read_plain", "write_plain"]

# The ending of each format's default file name: distinct, so that no two collide.
EXTENSIONS = {
    ExportFormat.STATE_DICT: ".state_dict.pt",
    ExportFormat.SAFETENSORS: ".safetensors",
    ExportFormat.TORCHSCRIPT: ".torchscript.pt",
    ExportFormat.EXPORT: ".pt2",
}
PROVENANCE_KEY = "bnnify.export"
_EXTRA_FILE = "bnnify.json"


def independent(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors owning their memory; names of one tensor (tied) stay one tensor.

    A view of a larger storage would save the whole storage (`torch.save`) or be
    refused (safetensors), so each distinct tensor is cloned once.
    """
    copies: dict[int, Tensor] = {}
    result = {}
    for name, tensor in tensors.items():
        key = id(tensor)
        if key not in copies:
            copies[key] = tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
        result[name] = copies[key]
    return result


def write_plain(
    content: Mapping[str, Tensor] | nn.Module | Any,
    fmt: ExportFormat,
    path: Path,
    provenance: Mapping[str, Any],
) -> None:
    """Writes a state dict (`state_dict`, `safetensors`), a TorchScript module or an
    `ExportedProgram` to `path` (use an `AtomicOutputs` temp path for safety)."""
    text = json.dumps(dict(provenance), sort_keys=True)
    if fmt is ExportFormat.STATE_DICT:
        torch.save(independent(content), path)
    elif fmt is ExportFormat.SAFETENSORS:
        # One copy per name: safetensors has no tied tensors.
        tensors = {name: t.detach().cpu().clone().contiguous() for name, t in content.items()}
        save_file(tensors, path, {PROVENANCE_KEY: text})
    elif fmt is ExportFormat.TORCHSCRIPT:
        torch.jit.save(content, str(path), _extra_files={_EXTRA_FILE: text})
    else:
        with open(path, "wb") as stream:  # a stream: torch warns about names not ending in .pt2
            torch.export.save(content, stream, extra_files={_EXTRA_FILE: text})


def read_plain(path: Path, fmt: ExportFormat) -> dict[str, Tensor] | nn.Module:
    """Reads back what `write_plain` wrote: a dict of tensors, or a callable module.

    A torch.export program is read through bnnify's guard (`load_export`), as any input.
    """
    if fmt is ExportFormat.STATE_DICT:
        return torch.load(path, weights_only=True)
    if fmt is ExportFormat.SAFETENSORS:
        reader = SafetensorsFile(path, "exported model")
        return {name: reader.tensor(name, "cpu") for name in reader.infos}
    if fmt is ExportFormat.TORCHSCRIPT:
        return torch.jit.load(str(path))
    with open(path, "rb") as stream:
        program = load_export(stream, path)
    return unlift(program, path)
