"""The fitted checkpoint: the likelihood a fit starts from, and the file it writes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import bnnify
from bnnify.bnn.likelihood import CategoricalLikelihood, GaussianLikelihood, Likelihood
from bnnify.enums import Task
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.checkpoint_writer import write_tensors
from bnnify.formats.safetensors_io import TensorInfo
from bnnify.formats.strict_json import dump_json
from bnnify.usecases.runner import Runner

__all__ = ["FIT_KEYS", "make_likelihood", "save_fitted"]

# Metadata keys a fit writes; an older file's are dropped unless written again.
FIT_KEYS = ("bnnify.fit", "bnnify.search")


def make_likelihood(
    task: Task | str, checkpoint: Checkpoint, resume: bool, class_dim: int = -1
) -> Likelihood:
    """The likelihood of `task`; with `resume`, the noise scale fitted before."""
    if Task.parse(task) is Task.CLASSIFICATION:
        return CategoricalLikelihood(class_dim)
    likelihood = GaussianLikelihood()
    tensors = checkpoint.fit_tensors()
    if resume and "bnnify.fit.log_noise" in tensors:
        with torch.no_grad():
            likelihood.log_noise.copy_(tensors["bnnify.fit.log_noise"])
    return likelihood


def save_fitted(
    path: Path,
    temp: Path,
    checkpoint: Checkpoint,
    runner: Runner,
    likelihood: Likelihood,
    info: dict[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Writes the fitted checkpoint to `temp` (renamed onto `path` by the caller).

    Args:
        path: Where the file will be.
        temp: Where it is written.
        checkpoint: The checkpoint fitted (its metadata and deterministic tensors).
        runner: The fitted model (its variational state is written).
        likelihood: The fitted likelihood (its noise scale, for regression).
        info: The fit's record, `bnnify.fit`.
        extra: More metadata as JSON values by key (`bnnify.search`, and `bnnify.spec`
            when a search changed the prior or the initial posterior).
    """
    tensors: dict[str, Tensor] = {}
    file_keys = checkpoint.state_keys()
    for key, value in runner.bnn.variational_state().items():
        tensors[file_keys.get(key, key)] = value.detach().cpu().contiguous()
    tensors.update({k: v.contiguous() for k, v in checkpoint.deterministic_state().items()})
    if isinstance(likelihood, GaussianLikelihood):
        tensors["bnnify.fit.log_noise"] = likelihood.log_noise.detach().cpu().clone()
    dropped = {"total_size", *FIT_KEYS}
    metadata = {k: v for k, v in checkpoint.metadata.items() if k not in dropped}
    metadata["bnnify.version"] = bnnify.__version__
    metadata["torch.version"] = torch.__version__
    for key, value in {"bnnify.fit": info, **(extra or {})}.items():
        metadata[key] = dump_json(value, sort_keys=True, default=str)
    infos = [TensorInfo(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    write_tensors(path, infos, tensors.__getitem__, metadata, lambda final: temp)
