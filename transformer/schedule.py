"""Learning-rate schedules (§5.3)."""

from __future__ import annotations


def noam_lr(step: int, d_model: int, warmup_steps: int, scale: float = 1.0) -> float:
    """lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (§5.3, eq. 3). Steps count from 1."""
    step = max(step, 1)
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)


def inverse_sqrt_lr(step: int, peak_lr: float, warmup_steps: int, warmup_init_lr: float = 0.0) -> float:
    """fairseq's inverse_sqrt: linear warm-up to peak_lr, then peak_lr * sqrt(warmup / step)."""
    step = max(step, 1)
    if step < warmup_steps:
        return warmup_init_lr + (peak_lr - warmup_init_lr) * step / warmup_steps
    return peak_lr * (warmup_steps / step) ** 0.5


def decay_factor(step: int, last_step: int, decay_steps: int) -> float:
    """Multiplier that takes the lr linearly to zero over the last `decay_steps` of `last_step`
    (over the whole run when that is shorter: a recipe's decay shrinks with a shorter budget).

    The cool-down of a warm-up/stable/decay schedule: with a known step budget, ending at a small
    lr gains what averaging checkpoints gains, and more, in the same steps. 1 before the decay.
    """
    decay_steps = min(decay_steps, last_step)
    if not decay_steps or step <= last_step - decay_steps:
        return 1.0
    return max(last_step - step + 1, 0) / decay_steps
