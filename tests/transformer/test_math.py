"""Schedules, positional encodings, the loss, averaging and FLOPs against hand-computed values."""

import math

import pytest
import torch

from transformer import preset
from transformer.averaging import average_state_dicts
from transformer.embeddings import sinusoidal_table
from transformer.flops import encoder_decoder_training_flops, training_flops_per_token
from transformer.loss import label_smoothed_loss
from transformer.schedule import decay_factor, inverse_sqrt_lr, noam_lr


def test_noam_schedule_hand_values() -> None:
    # d_model = 512, warmup = 4000: peak at step 4000 is 512^-0.5 * 4000^-0.5.
    assert noam_lr(4000, 512, 4000) == pytest.approx(1 / math.sqrt(512) / math.sqrt(4000))
    assert noam_lr(1, 512, 4000) == pytest.approx(512**-0.5 * 4000**-1.5)
    assert noam_lr(16000, 512, 4000) == pytest.approx(3.49386e-4, rel=1e-5)  # 512^-0.5 * 16000^-0.5
    assert noam_lr(2000, 512, 4000) == pytest.approx(0.5 * noam_lr(4000, 512, 4000))


def test_inverse_sqrt_schedule_hand_values() -> None:
    assert inverse_sqrt_lr(50, 1e-3, 100) == pytest.approx(5e-4)
    assert inverse_sqrt_lr(100, 1e-3, 100) == pytest.approx(1e-3)
    assert inverse_sqrt_lr(400, 1e-3, 100) == pytest.approx(5e-4)


def test_decay_takes_the_lr_to_zero_over_the_last_steps() -> None:
    assert [decay_factor(s, 10, 4) for s in (1, 6, 7, 8, 9, 10)] == pytest.approx([1, 1, 1, 0.75, 0.5, 0.25])
    assert decay_factor(11, 10, 4) == 0.0  # past the budget (a run extended without its decay)
    assert decay_factor(10, 10, 0) == 1.0  # no decay
    assert [decay_factor(s, 2, 400) for s in (1, 2)] == pytest.approx([1, 0.5])  # a shorter run: all of it


def test_sinusoidal_positions_hand_values() -> None:
    table = sinusoidal_table(10, 4)
    # PE(pos, 0) = sin(pos), PE(pos, 1) = cos(pos), PE(pos, 2) = sin(pos / 100), PE(pos, 3) = cos(pos / 100)
    pos = 3
    expected = torch.tensor([math.sin(3), math.cos(3), math.sin(0.03), math.cos(0.03)])
    torch.testing.assert_close(table[pos], expected)


def test_label_smoothed_loss_hand_values() -> None:
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])  # second row is padding (pad id 2 here)
    loss, nll = label_smoothed_loss(logits, targets, epsilon=0.1, pad_id=2)
    nll_expected = -math.log(0.5)
    uniform = -(math.log(0.5) + 2 * math.log(0.25)) / 3
    assert nll.item() == pytest.approx(nll_expected)
    assert loss.item() == pytest.approx(0.9 * nll_expected + 0.1 * uniform)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_nll_per_group_is_torchs_over_each_groups_targets(compiled: bool) -> None:
    """A mixture's loss per corpus: each target's group picks the sum it joins; padding joins none."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 13, generator=generator)
    targets = torch.tensor([3, 5, 0, 7, 1, 0, 12, 4])  # 0: padding
    groups = torch.tensor([0, 2, 2, 0, 1, 1, 2, 0])
    loss, nll = label_smoothed_loss(logits, targets, 0.1, 0, compiled=compiled, groups=groups, group_count=4)
    for group in range(4):
        rows = groups == group
        reference = torch.nn.functional.cross_entropy(logits[rows], targets[rows], ignore_index=0, reduction="sum")
        torch.testing.assert_close(nll[group], reference)  # group 3 has no target: 0
    torch.testing.assert_close(loss, label_smoothed_loss(logits, targets, 0.1, 0, compiled=compiled)[0])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_label_smoothed_loss_and_its_gradient_match_torch_cross_entropy(compiled: bool) -> None:
    """Both paths (eager: one log_softmax; compiled: log-sum-exp reductions and one fused gradient
    pass) give torch's label-smoothed cross entropy, gradients too."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator, requires_grad=True)
    targets = torch.randint(1, 11, (3, 5), generator=generator)
    targets[1, 3:] = 0  # padding
    loss, nll = label_smoothed_loss(logits, targets, epsilon=0.1, pad_id=0, compiled=compiled)
    flat, flat_targets = logits.reshape(-1, 11), targets.reshape(-1)
    reference = torch.nn.functional.cross_entropy(flat, flat_targets, ignore_index=0, label_smoothing=0.1,
                                                  reduction="sum")
    reference_nll = torch.nn.functional.cross_entropy(flat, flat_targets, ignore_index=0, reduction="sum")
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(nll, reference_nll.detach())
    ours, = torch.autograd.grad(loss, logits)
    theirs, = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_label_smoothed_loss_gradient_in_bfloat16_follows_float32(compiled: bool) -> None:
    """bf16 logits (autocast's output layer) get a bf16 gradient computed in fp32: it stays within
    bf16's rounding of the fp32 one, and the figures are fp32."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 50, generator=generator)
    targets = torch.randint(0, 50, (16,), generator=generator)
    half = logits.bfloat16().requires_grad_()
    full = half.detach().float().requires_grad_()
    loss_half, _ = label_smoothed_loss(half, targets, epsilon=0.1, pad_id=0, compiled=compiled)
    loss_full, _ = label_smoothed_loss(full, targets, epsilon=0.1, pad_id=0)
    assert loss_half.dtype == torch.float32
    torch.testing.assert_close(loss_half, loss_full)
    (grad_half,), (grad_full,) = torch.autograd.grad(loss_half, half), torch.autograd.grad(loss_full, full)
    assert grad_half.dtype == torch.bfloat16
    torch.testing.assert_close(grad_half.float(), grad_full, rtol=1e-2, atol=1e-3)


def test_label_smoothed_loss_refuses_a_second_backward() -> None:
    """The gradient is written over the saved log-probabilities: a second pass would be wrong."""
    logits = torch.randn(4, 7, requires_grad=True)
    loss, _ = label_smoothed_loss(logits, torch.tensor([1, 2, 3, 0]), epsilon=0.1, pad_id=0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


def test_average_of_checkpoints() -> None:
    states = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)}, {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(2)}]
    averaged = average_state_dicts(states)
    torch.testing.assert_close(averaged["w"], torch.tensor([2.0, 4.0]))
    assert averaged["n"].item() == 2
    with pytest.raises(ValueError, match="different parameter names"):
        average_state_dicts([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])


def test_flops_hand_count_for_a_one_layer_model() -> None:
    config = preset("tiny", n_layers=1, d_model=4, d_ff=8, n_heads=2, vocab_size=10)
    s, t = 3, 2
    attn = 4 * 4 * 4  # four 4x4 projections (h * d_k = 4)
    ffn = 2 * 4 * 8
    scores = lambda ctx: 2 * ctx * 2 * (2 + 2)  # noqa: E731
    encoder = s * (2 * (attn + ffn) + scores(s))
    decoder = t * (2 * attn + scores(1.5) + 2 * (attn / 2) + scores(s) + 2 * ffn)
    cross_kv = s * 2 * (attn / 2)
    output = t * 2 * 4 * 10
    expected = 3 * (encoder + decoder + cross_kv + output)
    assert encoder_decoder_training_flops(config, s, t) == pytest.approx(expected)
    assert training_flops_per_token(config, s, t) == pytest.approx(expected / t)


def test_flops_are_about_six_n_for_short_sequences() -> None:
    config = preset("base", vocab_size=37000)
    from transformer import build_model, count_parameters

    n = count_parameters(build_model(config))
    per_token = training_flops_per_token(config, 1, 1)
    # With one token, attention terms vanish; the encoder-decoder forward touches every weight once.
    assert per_token == pytest.approx(6 * n, rel=0.03)
