"""Dropout and ReLU: the paper's distribution, its own mask in the gradient, reproducible; compiled
on a CPU, the same without the bool masks inductor writes slowly there."""

import pytest
import torch

from transformer.elementwise import dropout, dropout_add, relu


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_drops_with_probability_p_and_scales_the_rest(p: float) -> None:
    x = torch.rand(1000, 1000) + 0.5  # no zeros of its own
    out = dropout(x, p, training=True)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.003  # 1e6 draws: std 0.0005
    # p is rounded to 1/65536 and the scale is exactly that p's: 1 / (1 - p) within 1e-4
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=1e-4, atol=0.0)


def test_every_16_bit_lane_of_a_word_drops_alike_and_each_call_draws_afresh() -> None:
    x = torch.ones(4, 250_000)
    torch.manual_seed(0)
    first = dropout(x.t().contiguous(), 0.5, training=True).t()  # row j: lane j % 4 of each word
    second = dropout(x, 0.5, training=True)
    kept = (first != 0).float().mean(dim=1)  # 250,000 draws a lane: std 0.001
    assert (kept - 0.5).abs().max() < 0.006, kept  # a lane with a biased (e.g. sign) bit fails
    assert abs((first == second).float().mean().item() - 0.5) < 0.006  # independent, not repeated


def test_bfloat16_activations_keep_their_dtype_and_p() -> None:
    x = torch.rand(1000, 1000, dtype=torch.bfloat16) + 0.5  # as CPU autocast hands dropout
    out = dropout(x, 0.1, training=True)
    assert out.dtype == torch.bfloat16
    assert abs((out != 0).float().mean().item() - 0.9) < 0.003


def test_gradient_passes_only_where_the_forward_kept() -> None:
    x = (torch.rand(300, 200) + 0.5).requires_grad_()
    out = dropout(x, 0.2, training=True)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    torch.testing.assert_close(x.grad, torch.where(out != 0, upstream / 0.8, 0.0), rtol=1e-4, atol=1e-6)


def test_dropout_add_is_the_residual_plus_dropout_with_both_gradients() -> None:
    residual = torch.randn(300, 200).requires_grad_()
    x = (torch.rand(300, 200) + 0.5).requires_grad_()
    torch.manual_seed(5)
    out = dropout_add(residual, x, 0.2, training=True)
    torch.manual_seed(5)
    expected = residual.detach() + dropout(x.detach(), 0.2, training=True)  # the same mask
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    torch.testing.assert_close(residual.grad, upstream)
    torch.testing.assert_close(x.grad, torch.where(expected != residual.detach(), upstream / 0.8, 0.0),
                               rtol=1e-4, atol=1e-6)
    assert torch.equal(dropout_add(residual, x, 0.2, training=False), residual + x)


def test_same_generator_state_same_mask_and_identity_outside_training() -> None:
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    first = dropout(x, 0.1, training=True)
    torch.manual_seed(3)
    assert torch.equal(first, dropout(x, 0.1, training=True))  # resume replays the same masks
    assert dropout(x, 0.1, training=False) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))


def _compiled_with_code(function, x: torch.Tensor, upstream: torch.Tensor):
    """(output, input gradient, the C++ inductor generated for the forward and the backward)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(function)

    def forward_and_backward():
        out = compiled(x)
        out.backward(upstream)
        return out

    out, code = run_and_get_code(forward_and_backward)
    grad, x.grad = x.grad, None
    return out.detach(), grad, "\n".join(code)


def test_compiled_relu_matches_eager_without_writing_a_bool_mask() -> None:
    x = torch.randn(64, 256).requires_grad_()
    upstream = torch.randn(64, 256)
    out, grad, code = _compiled_with_code(relu, x, upstream)
    expected = torch.relu(x.detach())
    assert torch.equal(out, expected)
    assert torch.equal(grad, torch.where(expected > 0, upstream, 0.0))
    # inductor's CPU kernels that write bools run ~20x slower than eager (the module's docstring)
    assert "bool*" not in code and "kernel(" in code


def test_compiled_dropout_drops_with_probability_p_without_writing_a_bool_mask() -> None:
    x = (torch.rand(500, 400) + 0.5).requires_grad_()
    upstream = torch.randn(500, 400)
    out, grad, code = _compiled_with_code(lambda t: dropout(t, 0.2, training=True), x, upstream)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.005  # 2e5 draws: std 0.0009
    torch.testing.assert_close(out[kept], x.detach()[kept] / 0.8, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad, torch.where(kept, upstream / 0.8, 0.0), rtol=1e-6, atol=1e-7)
    assert "bool*" not in code and "kernel(" in code
