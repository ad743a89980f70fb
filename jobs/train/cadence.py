"""When the training loop logs, validates, saves and stops: the loop asks, this module decides."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.checkpoint import JobState
from jobs.run.config import TrainConfig


@dataclass(frozen=True)
class Cadence:
    train: TrainConfig
    bleu_possible: bool = True  # the dataset has a translation valid split

    def clock(self, elapsed_s: float, since_save_s: float) -> list[float]:
        """[time up, checkpoint due by the clock] as floats, for rank 0 to broadcast in the step's
        collective so that every rank stops and saves at the same step."""
        return [float(bool(self.train.max_minutes) and elapsed_s >= self.train.max_minutes * 60),
                float(since_save_s >= self.train.checkpoint_every_minutes * 60)]

    def out_of_steps(self, step: int) -> bool:
        return bool(self.train.max_steps) and step >= self.train.max_steps

    def out_of_epochs(self, epoch: int) -> bool:
        return bool(self.train.max_epochs) and epoch >= self.train.max_epochs

    def log(self, step: int, stop: bool) -> bool:
        return step % self.train.log_every == 0 or step == 1 or stop  # step 1 shows the start-up time

    def validate(self, step: int, stop: bool) -> bool:
        return bool(self.train.validate_every) and step % self.train.validate_every == 0 or stop

    def bleu(self, step: int) -> bool:
        """Valid BLEU is computed at `step` (in the loop, or of the checkpoint saved there)."""
        return self.bleu_possible and bool(self.train.bleu_every) and step % self.train.bleu_every == 0

    def bleu_in_loop(self, step: int) -> bool:
        return self.bleu(step) and not self.train.bleu_in_background

    def bleu_of_checkpoint(self, step: int) -> bool:
        """The checkpoint of `step` is scored by Ray Train's validation task, while training goes on."""
        return self.bleu(step) and self.train.bleu_in_background

    def save(self, step: int, stop: bool, due_by_clock: bool) -> bool:
        every = self.train.checkpoint_every_steps
        return stop or due_by_clock or bool(every and step % every == 0)

    def patience_exhausted(self, state: JobState, valid_loss: float) -> bool:
        """Early stopping: record `valid_loss` in `state`; True after `train.patience` validations
        in a row without improvement."""
        if valid_loss < state.best_valid_loss:
            state.best_valid_loss, state.validations_without_improvement = valid_loss, 0
        else:
            state.validations_without_improvement += 1
        return bool(self.train.patience) and state.validations_without_improvement >= self.train.patience

    def steps_left(self, step: int) -> int | None:
        return self.train.max_steps - step if self.train.max_steps else None

    def seconds_left(self, elapsed_s: float) -> float | None:
        return max(self.train.max_minutes * 60 - elapsed_s, 0.0) if self.train.max_minutes else None

    def eta_s(self, step: int, elapsed_s: float, step_time_s: float) -> float | None:
        """Seconds to the end by whichever bound comes first (steps at this pace, or time); None if unbounded."""
        steps_left, seconds_left = self.steps_left(step), self.seconds_left(elapsed_s)
        by_steps = None if steps_left is None else steps_left * step_time_s
        return min((t for t in (by_steps, seconds_left) if t is not None), default=None)
