"""The two collectives the training loop needs, over torch.distributed's default group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks, in float64 so that token counts stay exact."""
    tensor = torch.tensor(values, dtype=torch.float64, device=_backend_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def _backend_device() -> torch.device:
    """Where the default group's tensors must live: NCCL reduces CUDA tensors only (on the device the
    rank has set as current), gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
