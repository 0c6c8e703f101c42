"""Writing a variational checkpoint: its metadata, and its tensors streamed in storage order.

The layout is `bnnify.formats.checkpoint`'s (read there); `docs/format.md` documents it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import bnnify
from bnnify.formats.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    Checkpoint,
    ParameterRecord,
    TensorRecord,
)
from bnnify.formats.safetensors_io import SafetensorsWriter, ShardedWriter, TensorInfo
from bnnify.formats.spec import ConversionSpec

__all__ = ["checkpoint_metadata", "copy_checkpoint", "sharded_paths", "write_tensors"]


def checkpoint_metadata(
    *,
    source: Mapping[str, Any],
    spec: ConversionSpec,
    parameters: Sequence[ParameterRecord],
    deterministic: Sequence[TensorRecord],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The metadata strings of a checkpoint (namespaced keys, JSON values)."""
    metadata = {
        "bnnify.format": FORMAT,
        "bnnify.format_version": FORMAT_VERSION,
        "bnnify.version": bnnify.__version__,
        "torch.version": torch.__version__,
        "bnnify.source": json.dumps(dict(source), sort_keys=True),
        "bnnify.spec": json.dumps(spec.to_json(), sort_keys=True),
        "bnnify.parameters": json.dumps({r.name: r.to_json() for r in parameters}),
        "bnnify.deterministic": json.dumps({r.name: r.to_json() for r in deterministic}),
    }
    for key, value in (extra or {}).items():
        metadata[f"bnnify.{key}"] = json.dumps(value, sort_keys=True)
    return metadata


def write_tensors(
    target: Path,
    infos: Sequence[TensorInfo],
    produce: Callable[[str], Tensor],
    metadata: Mapping[str, str],
    temp_path: Callable[[Path], Path],
    *,
    shard_bytes: int | None = None,
    stem: str | None = None,
) -> None:
    """Streams tensors into `target` (or shards under its folder) in storage order.

    `produce(key)` is called once per tensor, in the writer's order, so that only
    one tensor (or one parameter's tensors) is in memory at a time.
    """
    if shard_bytes is None:
        with open(temp_path(target), "wb") as file:
            writer = SafetensorsWriter(file, infos, metadata)
            for key in writer.order:
                writer.write(key, produce(key))
            writer.finish()
        return
    assert stem is not None
    with ShardedWriter(target.parent, stem, infos, metadata, shard_bytes) as writer:
        writer.temp_path = temp_path
        for key in writer.order:
            writer.write(key, produce(key))
        writer.finish()


def sharded_paths(
    target: Path, stem: str, infos: Sequence[TensorInfo], shard_bytes: int
) -> list[Path]:
    """Files a sharded checkpoint of `infos` will consist of (shards, then the index)."""
    return ShardedWriter(target.parent, stem, infos, None, shard_bytes).paths()


def copy_checkpoint(checkpoint: Checkpoint, path: Path, metadata: Mapping[str, str]) -> None:
    """Writes every tensor of `checkpoint`, bytes unchanged, into one file with `metadata`.

    Tensors are read and written one at a time; a sharded checkpoint becomes one file.
    `path` is where the bytes go (an `AtomicOutputs` temp path).
    """
    infos = [checkpoint.tensor_info(key) for key in checkpoint.keys()]  # noqa: SIM118
    write_tensors(path, infos, checkpoint.tensor, metadata, lambda final: path)
