"""The optimizer the benchmarks' peers step with: the paper's Adam, as training's DeepSpeed config
asks for it (jobs/train/deepspeed_config.py), so that a peer updates its weights as fast as ours."""

from __future__ import annotations

from typing import Iterable

import torch


def paper_adam(params: Iterable[torch.nn.Parameter], lr: float = 1.0) -> torch.optim.Adam:
    """Adam with beta1 = 0.9, beta2 = 0.98, epsilon = 1e-9 (§5.3), torch's fused kernel (as training's
    DeepSpeed config asks for it): the benchmarks' peers update their weights as fast as ours."""
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.98), eps=1e-9, fused=True)
