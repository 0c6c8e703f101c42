"""Running under `torchrun`: this process's rank and device, and agreeing across processes."""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["everywhere", "join", "process_device", "process_rank"]


def process_rank() -> int:
    """The rank of this process under `torchrun` (0 alone): rank 0 writes the output."""
    return int(os.environ.get("RANK", "0"))


def process_device(device: str) -> str:
    """The device of this process: under torchrun, `cuda` means `cuda:LOCAL_RANK`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    return device


def join(device: torch.device) -> tuple[int, int]:
    """This process's rank and the world size; joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        # nccl moves CUDA tensors only; CPU training needs gloo even on a GPU machine.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def everywhere(flag: Tensor) -> bool:
    """Whether `flag` holds in every process, so that under torchrun all of them stop
    together (each has its own loss, and a stop decided by one alone would hang the rest)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)
    return bool(flag)
