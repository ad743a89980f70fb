"""The weights' moving average against updates worked out by hand."""

from __future__ import annotations

import pytest
import torch

from transformer.ema import WeightAverage


def test_the_average_follows_hand_computed_updates() -> None:
    average = WeightAverage(0.5, {"w": torch.tensor([0.0, 4.0])})
    # update 1: d = min(0.5, 1/10) = 0.1  -> 0.1 * [0, 4] + 0.9 * [10, 0]  = [9, 0.4]
    average.update([("w", torch.tensor([10.0, 0.0]))])
    assert average.weights["w"].tolist() == pytest.approx([9.0, 0.4])
    # update 2: d = min(0.5, 2/11) = 2/11 -> 2/11 * [9, 0.4] + 9/11 * [20, 2.2] = [18, 1.8727...]
    average.update([("w", torch.tensor([20.0, 2.2]))])
    assert average.weights["w"].tolist() == pytest.approx([18.0, 20.6 / 11])
    # past the warm-up (updates >= 8: (1 + n) / (10 + n) >= 0.5) the decay itself: halfway each time
    late = WeightAverage(0.5, {"w": torch.tensor([2.0])}, updates=8)
    late.update([("w", torch.tensor([4.0]))])
    assert late.weights["w"].tolist() == [3.0] and late.updates == 9


def test_the_average_is_fp32_and_a_copy() -> None:
    weights = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    average = WeightAverage(0.9, {"w": weights})
    weights.add_(1)
    assert average.weights["w"].dtype == torch.float32 and average.weights["w"].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(1.0, {"w": weights})
