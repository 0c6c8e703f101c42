"""State dict files: torch.save checkpoints, safetensors files, sharded checkpoints of either."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from bnnify.errors import FormatError, UsageError, shorten
from bnnify.formats.detect import ModelFormat, shard_format
from bnnify.formats.nesting import find_state_dict
from bnnify.formats.safe_unpickle import stand_ins_in, torch_load
from bnnify.formats.safetensors_reader import SafetensorsFile
from bnnify.formats.sharded import ShardedIndex, read_index
from bnnify.formats.tensor_meta import Loaded, TensorMeta, eager_tensors

__all__ = ["load_safetensors", "load_sharded", "load_torch_save", "refuse_key"]

logger = logging.getLogger("bnnify")
_RESAVE = "Save the weights with torch.save(model.state_dict(), path)."


def load_torch_save(file: Path, device: str, trust_pickle: bool, key: str | None) -> Loaded:
    """A `torch.save` file: its state dict (found in a checkpoint dict), or a trusted module.

    Args:
        file: The file.
        device: Where tensors are placed.
        trust_pickle: Allow full unpickling (see `torch_load`).
        key: The dotted path of the state dict in a checkpoint dict (see
            `find_state_dict`); None to find it.
    """
    content = torch_load(file, device, trust_pickle)
    replaced = stand_ins_in(content)
    if replaced:
        logger.info(
            "%s: its non-tensor objects of %s were read as inert stand-ins and dropped",
            file,
            ", ".join(replaced),
        )
    found = find_state_dict(content, str(file), key)
    if isinstance(found.value, nn.Module):
        assert trust_pickle, "weights_only=True never returns a module"
        entries = [(n, t, "parameter") for n, t in found.value.named_parameters()]
        entries += [(n, t, "buffer") for n, t in found.value.named_buffers()]
        tensors, metas = eager_tensors(entries)
        fmt = ModelFormat.PICKLED_MODULE
        return Loaded(fmt, found.value, metas, tensors.__getitem__, key=found.key)
    tensors, metas = eager_tensors(_entries(found.value, file), dedup=False)
    return Loaded(
        ModelFormat.STATE_DICT,
        None,
        metas,
        tensors.__getitem__,
        key=found.key,
        prefix=found.prefix,
    )


def _entries(state: dict, file: Path) -> list[tuple[str, Tensor, str]]:
    entries = []
    for name, value in state.items():
        if isinstance(name, str) and isinstance(value, Tensor):
            entries.append((name, value, "unknown"))
        else:
            logger.debug("ignoring the non-tensor entry %r (%s)", name, type(value).__name__)
    if not entries:
        raise FormatError(f"'{file}' holds a dict with no tensors", hint=_RESAVE)
    return entries


def load_safetensors(file: Path, device: str) -> Loaded:
    """A safetensors file, memory-mapped: tensors are read one at a time."""
    reader = SafetensorsFile(file, "model file")
    metas = {name: _meta(info) for name, info in reader.infos.items()}
    return Loaded(ModelFormat.SAFETENSORS, None, metas, lambda n: reader.tensor(n, device))


def load_sharded(file: Path, device: str) -> Loaded:
    """A sharded checkpoint: safetensors shards (memory-mapped), or torch.save shards.

    torch.save shards (Hugging Face's `pytorch_model-00001-of-00002.bin`) load with
    `weights_only=True` and, as zip archives, memory-mapped; each must be a flat
    state dict. Every tensor the index maps must be in its shard; tensors of a shard
    that the index does not map to it are ignored.
    """
    index = read_index(file)
    fmt = shard_format(index)
    if fmt is ModelFormat.SHARDED:
        readers = {shard: SafetensorsFile(path, "shard") for shard, path in index.shards.items()}
        shards = {shard: {n: _meta(i) for n, i in r.infos.items()} for shard, r in readers.items()}

        def read(shard: str, name: str) -> Tensor:
            return readers[shard].tensor(name, device)

    else:
        states = {shard: _torch_shard(path, device) for shard, path in index.shards.items()}
        shards = {shard: _tensor_metas(state) for shard, state in states.items()}

        def read(shard: str, name: str) -> Tensor:
            return states[shard][name].detach()

    metas = _mapped(index, shards)
    return Loaded(fmt, None, metas, lambda name: read(index.weight_map[name], name))


def _torch_shard(path: Path, device: str) -> dict[str, Tensor]:
    state = torch_load(path, device, trust_pickle=False, what="torch.save shard")
    if not isinstance(state, dict) or not any(isinstance(v, Tensor) for v in state.values()):
        raise FormatError(
            f"shard '{path}' holds a {type(state).__name__} without tensors, not a state dict",
            hint="Download the checkpoint again.",
        )
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _tensor_metas(state: dict[str, Tensor]) -> dict[str, TensorMeta]:
    return {n: TensorMeta(n, t.dtype, tuple(t.shape), "unknown") for n, t in state.items()}


def _mapped(index: ShardedIndex, shards: dict[str, dict[str, TensorMeta]]) -> dict:
    """The metadata of the tensors the index maps, in shard order; refused if any lacks."""
    lacking = [n for n, shard in index.weight_map.items() if n not in shards[shard]]
    if lacking:
        raise FormatError(
            f"'{index.path}': the shards lack {len(lacking)} tensors the index maps to them: "
            f"{shorten(lacking[:5], 200)}",
            hint="The index and the shards come from different checkpoints: download them again.",
        )
    metas = {}
    for shard, found in shards.items():
        for name, meta in found.items():
            if index.weight_map.get(name) == shard:
                metas[name] = meta
            else:
                logger.debug("ignoring %r of shard %s: not in the index", name, shard)
    return metas


def _meta(info: Any) -> TensorMeta:
    return TensorMeta(info.name, info.dtype, info.shape, "unknown")


def refuse_key(fmt: ModelFormat, key: str | None) -> None:
    """`key` chooses within a torch.save checkpoint dict; other formats have no such dict.

    Raises:
        UsageError: If `key` is given for another format.
    """
    if key is not None:
        raise UsageError(
            f"--key {key!r} chooses a state dict inside a torch.save checkpoint, but this "
            f"model is {fmt.value}",
            hint="Leave out --key (key=...).",
        )
