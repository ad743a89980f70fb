"""Checkpoint averaging: the paper averages the last 5 (base) or 20 (big) checkpoints (§6.1)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def average_state_dicts(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors; other tensors are taken from the last state."""
    if not states:
        raise ValueError("need at least one checkpoint to average")
    keys = list(states[-1].keys())
    for index, state in enumerate(states):
        if list(state.keys()) != keys:
            raise ValueError(f"checkpoint {index} has different parameter names from the last one")
    averaged: dict[str, torch.Tensor] = {}
    for key in keys:
        last = states[-1][key]
        if last.is_floating_point():
            total = torch.zeros_like(last, dtype=torch.float64)
            for state in states:
                total += state[key].to(torch.float64)
            averaged[key] = (total / len(states)).to(last.dtype)
        else:
            averaged[key] = last.clone()
    return averaged
