"""The two collectives the training loop needs, over torch.distributed's default group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks, in float64 so that token counts stay exact."""
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
