"""Small real models saved in every format bnnify reads, for the conversion and CLI tests.

Each `save_*` function writes one file (or folder) and returns its path; `build_all`
writes every model in every format into a folder, and `shared_files` does it once per
pytest session (exporting takes seconds).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = [
    "FORMATS",
    "MODELS",
    "LSTMNet",
    "ModelFiles",
    "build_all",
    "build_cnn",
    "build_lstm",
    "build_mlp",
    "plain_state",
    "save_export",
    "save_pickled",
    "save_safetensors",
    "save_sharded",
    "save_state_dict",
    "save_torchscript",
    "shared_files",
]

# Every format of `build_all`, as `bnnify convert` names them in its summary.
FORMATS = {
    "torchscript": "torchscript",
    "export": "export",
    "state_dict": "state_dict",
    "safetensors": "safetensors",
    "sharded": "sharded_safetensors",
    "pickled": "pickled_module",
}


class LSTMNet(nn.Module):
    """An LSTM over a sequence, then a linear head on its last output."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def build_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def build_cnn() -> nn.Module:
    """Conv-BatchNorm-ReLU-Linear, with running statistics moved off their defaults."""
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)
    )
    with torch.no_grad():
        net(torch.randn(8, 1, 6, 6))
    return net.eval()


def build_lstm() -> nn.Module:
    return LSTMNet().eval()


# name -> (builder, example input of the forward pass)
MODELS = {
    "mlp": (build_mlp, lambda: torch.randn(2, 4)),
    "cnn": (build_cnn, lambda: torch.randn(2, 1, 6, 6)),
    "lstm": (build_lstm, lambda: torch.randn(2, 7, 3)),
}


def plain_state(module: nn.Module) -> dict[str, Tensor]:
    """The state dict as independent contiguous tensors (safetensors refuses shared memory)."""
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def save_torchscript(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def save_export(module: nn.Module, example: Tensor, path: Path) -> Path:
    program = torch.export.export(module, (example,))
    buffer = io.BytesIO()  # torch.export.save warns about paths not ending in ".pt2"
    torch.export.save(program, buffer)
    path.write_bytes(buffer.getvalue())
    return path


def save_state_dict(module: nn.Module, path: Path) -> Path:
    torch.save(module.state_dict(), path)
    return path


def save_safetensors(module: nn.Module, path: Path) -> Path:
    save_file(plain_state(module), str(path))
    return path


def save_sharded(module: nn.Module, folder: Path, shards: int = 3) -> Path:
    """A Hugging Face sharded checkpoint in `folder`: `shards` files and the index."""
    folder.mkdir(parents=True, exist_ok=True)
    state = plain_state(module)
    names = list(state)
    assert len(names) >= shards, "fewer tensors than shards"
    weight_map, total = {}, 0
    for i in range(shards):
        part = {n: state[n] for n in names[i::shards]}
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def save_pickled(module: nn.Module, path: Path) -> Path:
    """The whole module pickled by `torch.save` (loads only with --trust-pickle)."""
    torch.save(module, path)
    return path


@dataclass
class ModelFiles:
    """The modules of `MODELS` and their files: `files[(model, format)]`."""

    folder: Path
    modules: dict[str, nn.Module] = field(default_factory=dict)
    examples: dict[str, Tensor] = field(default_factory=dict)
    files: dict[tuple[str, str], Path] = field(default_factory=dict)

    def path(self, model: str, fmt: str) -> Path:
        return self.files[(model, fmt)]


def build_all(folder: Path, seed: int = 0) -> ModelFiles:
    """Saves every model of `MODELS` in every format of `FORMATS` under `folder`.

    Pickled modules are written for the `nn.Sequential` models only, whose classes any
    process can import. The global RNG is left as it was.
    """
    result = ModelFiles(folder)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # Exporting an LSTM warns about its flat weights; TorchScript is deprecated.
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        for name, (build, example) in MODELS.items():
            module, x = build(), example()
            result.modules[name], result.examples[name] = module, x
            files = {
                "torchscript": save_torchscript(module, folder / f"{name}.script.pt"),
                "export": save_export(module, x, folder / f"{name}.pt2"),
                "state_dict": save_state_dict(module, folder / f"{name}.state.pt"),
                "safetensors": save_safetensors(module, folder / f"{name}.safetensors"),
                "sharded": save_sharded(module, folder / f"{name}_sharded"),
            }
            if isinstance(module, nn.Sequential):
                files["pickled"] = save_pickled(module, folder / f"{name}.module.pt")
            result.files.update({(name, fmt): path for fmt, path in files.items()})
    return result


_SHARED: dict[str, ModelFiles] = {}


def shared_files(tmp_path_factory) -> ModelFiles:
    """`build_all` once per pytest session, shared by every test module that asks.

    Tests must not modify these files: they write their outputs to their own folders.
    """
    key = str(tmp_path_factory.getbasetemp())
    if key not in _SHARED:
        _SHARED[key] = build_all(tmp_path_factory.mktemp("model_files"))
    return _SHARED[key]
