"""Dropout's CPU path: the paper's distribution, its own mask in the gradient, reproducible."""

import pytest
import torch

from transformer.dropout import dropout


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_drops_with_probability_p_and_scales_the_rest(p: float) -> None:
    x = torch.rand(1000, 1000) + 0.5  # no zeros of its own
    out = dropout(x, p, training=True)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.003  # 1e6 draws: std 0.0005
    # p is rounded to 1/65536 and the scale is exactly that p's: 1 / (1 - p) within 1e-4
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=1e-4, atol=0.0)


def test_gradient_passes_only_where_the_forward_kept() -> None:
    x = (torch.rand(300, 200) + 0.5).requires_grad_()
    out = dropout(x, 0.2, training=True)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    torch.testing.assert_close(x.grad, torch.where(out != 0, upstream / 0.8, 0.0), rtol=1e-4, atol=1e-6)


def test_same_generator_state_same_mask_and_identity_outside_training() -> None:
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    first = dropout(x, 0.1, training=True)
    torch.manual_seed(3)
    assert torch.equal(first, dropout(x, 0.1, training=True))  # resume replays the same masks
    assert dropout(x, 0.1, training=False) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
