"""The two collectives the training loop needs, over torch.distributed's default group."""

from __future__ import annotations

import json
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
    """Every rank's `value` (JSON-able: tuples come back as lists), in rank order. It travels as
    JSON in byte tensors, never as a pickle (`all_gather_object`), so nothing a peer sends can run
    code here: first each rank's length, then every rank's bytes padded to the longest."""
    device = _backend_device()
    data = json.dumps(value, default=lambda item: item.tolist()).encode()  # numpy and torch numbers as plain ones
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device))
    longest = max(int(size.item()) for size in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(parts, mine.to(device))
    return [json.loads(part[:int(size.item())].cpu().numpy().tobytes()) for part, size in zip(parts, sizes)]
