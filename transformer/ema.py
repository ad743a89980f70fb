"""An exponential moving average of a model's weights (Polyak averaging, as fairseq's and timm's
EMA): after each applied update, `average <- d * average + (1 - d) * weights`.

With d = min(decay, (1 + n) / (10 + n)) after n updates (the warm-up of TensorFlow's
ExponentialMovingAverage), the first updates weigh more, so that a short run's average is not
dominated by the random initialisation it started from. Kept in fp32 whatever the training
precision; it costs one fp32 copy of the weights and one fused lerp per step.
"""

from __future__ import annotations

from typing import Iterable

import torch


class WeightAverage:
    def __init__(self, decay: float, weights: dict[str, torch.Tensor], updates: int = 0):
        if not 0 < decay < 1:
            raise ValueError(f"the average's decay must lie strictly between 0 and 1, got {decay}")
        self.decay, self.updates = decay, updates
        self.weights = {name: tensor.detach().to(torch.float32, copy=True) for name, tensor in weights.items()}

    def rate(self) -> float:
        """The weight of the next update's weights, 1 - d."""
        return 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, named_weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        current = dict(named_weights)
        names = list(self.weights)
        torch._foreach_lerp_([self.weights[name] for name in names],
                             [current[name].detach().float() for name in names], self.rate())
        self.updates += 1
