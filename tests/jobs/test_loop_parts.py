"""The parts the training loop asks (cadence, divergence guard, metrics window, time ledger,
progress lines), each without Ray or DeepSpeed: a change to one is checked here in a second."""

from __future__ import annotations

import math
import time

import pytest

from jobs.checkpoint import JobState
from jobs.report.goodput import CATEGORIES, GoodputLedger
from jobs.report.metrics import MetricsWindow
from jobs.report.progress import validation_line, window_line
from jobs.run.config import TrainConfig
from jobs.train.cadence import Cadence
from jobs.train.engine import DivergenceGuard, NonFiniteTraining


def _cadence(**train) -> Cadence:
    return Cadence(TrainConfig(**{"max_minutes": 0, "max_epochs": 1, **train}))


def test_cadence_logs_validates_saves_and_stops_at_its_steps() -> None:
    cadence = _cadence(max_steps=20, log_every=5, validate_every=10, checkpoint_every_steps=4, bleu_every=6)
    assert [s for s in range(1, 21) if cadence.log(s, stop=False)] == [1, 5, 10, 15, 20]
    assert [s for s in range(1, 21) if cadence.validate(s, stop=False)] == [10, 20]
    assert [s for s in range(1, 21) if cadence.save(s, stop=False, due_by_clock=False)] == [4, 8, 12, 16, 20]
    assert [s for s in range(1, 21) if cadence.bleu(s)] == [6, 12, 18]
    assert cadence.log(7, stop=True) and cadence.validate(7, stop=True) and cadence.save(7, stop=True, due_by_clock=False)
    assert cadence.save(7, stop=False, due_by_clock=True)
    assert not cadence.out_of_steps(19) and cadence.out_of_steps(20)
    assert cadence.steps_left(15) == 5 and cadence.seconds_left(100.0) is None
    assert not _cadence(max_steps=0).out_of_steps(10**9) and _cadence(max_steps=0).steps_left(3) is None
    assert not _cadence(validate_every=0).validate(100, stop=False)


def test_cadence_clock_stops_and_saves_by_time() -> None:
    cadence = _cadence(max_minutes=2, checkpoint_every_minutes=1)
    assert cadence.clock(elapsed_s=119.0, since_save_s=59.0) == [0.0, 0.0]
    assert cadence.clock(elapsed_s=120.0, since_save_s=60.0) == [1.0, 1.0]
    assert cadence.seconds_left(90.0) == 30.0 and cadence.seconds_left(500.0) == 0.0
    assert _cadence(max_minutes=0).clock(elapsed_s=10**6, since_save_s=0.0)[0] == 0.0  # no time bound


def test_cadence_scores_bleu_in_the_loop_or_of_the_checkpoint_and_says_when_the_run_ends() -> None:
    loop, background = _cadence(bleu_every=5, bleu_in_background=False), _cadence(bleu_every=5, bleu_in_background=True)
    assert [s for s in range(1, 11) if loop.bleu_in_loop(s)] == [5, 10] and not any(map(loop.bleu_of_checkpoint, range(11)))
    assert [s for s in range(1, 11) if background.bleu_of_checkpoint(s)] == [5, 10]
    assert not any(map(background.bleu_in_loop, range(11)))
    no_valid_split = Cadence(TrainConfig(bleu_every=5, max_minutes=0, max_epochs=1), bleu_possible=False)
    assert not any(no_valid_split.bleu(s) or no_valid_split.bleu_of_checkpoint(s) for s in range(11))
    assert _cadence(max_steps=100).eta_s(60, elapsed_s=50.0, step_time_s=0.5) == 20.0  # 40 steps left
    assert _cadence(max_steps=100, max_minutes=1).eta_s(60, elapsed_s=50.0, step_time_s=0.5) == 10.0  # time first
    assert _cadence(max_steps=0).eta_s(60, elapsed_s=50.0, step_time_s=0.5) is None


def test_patience_counts_validations_without_improvement() -> None:
    cadence, state = _cadence(patience=2), JobState()
    assert [cadence.patience_exhausted(state, loss) for loss in (3.0, 2.5, 2.6, 2.4, 2.4, 2.5)] == \
        [False, False, False, False, False, True]
    assert state.best_valid_loss == 2.4
    never = _cadence(patience=0)
    assert not any(never.patience_exhausted(JobState(), 9.0) for _ in range(5))


class _Engine:
    def __init__(self, applied: list[bool]) -> None:
        self.applied = iter(applied)

    def was_step_applied(self) -> bool:
        return next(self.applied)


def test_divergence_guard_forgives_a_few_skips_and_stops_a_run_of_them() -> None:
    guard, engine = DivergenceGuard(limit=3), _Engine([True, False, False, True, False, False, False])
    assert [guard.after_step(engine, step) for step in range(1, 7)] == [False, True, True, False, True, True]
    with pytest.raises(NonFiniteTraining, match="step 7: the last 3 updates"):
        guard.after_step(engine, 7)


def test_metrics_window_sums_over_ranks_and_reports_rates() -> None:
    window = MetricsWindow()
    window.add_step(loss=20.0, nll=18.0, global_tokens=100.0, global_flops=1e9, data_wait=0.01)
    window.add_step(loss=10.0, nll=9.0, global_tokens=50.0, global_flops=5e8, data_wait=0.03)
    window.started -= 2.0  # the window has lasted 2 s (and a few microseconds)
    sent: list[list[float]] = []

    def all_sum(values: list[float]) -> list[float]:  # two ranks with the same sums
        sent.append(values)
        return [2 * v for v in values]

    metrics = window.summary(all_sum, peak_flops_per_rank=1e9, world_size=2)
    assert sent == [[30.0, 27.0]]  # this rank's loss and NLL sums; tokens and FLOPs are global already
    assert metrics["train/loss"] == pytest.approx(60.0 / 150) and metrics["train/nll"] == pytest.approx(54.0 / 150)
    assert metrics["train/ppl"] == pytest.approx(math.exp(54.0 / 150))
    assert metrics["train/tokens_per_s"] == pytest.approx(75.0, rel=1e-3)
    assert metrics["train/step_time_s"] == pytest.approx(1.0, rel=1e-3)
    assert metrics["train/data_wait_s"] == pytest.approx(0.02)
    assert metrics["train/mfu"] == pytest.approx(1.5e9 / 2.0 / 2e9, rel=1e-3)
    assert "train/mfu" not in MetricsWindow().summary(all_sum, peak_flops_per_rank=0.0, world_size=2)


def test_the_ledger_charges_each_second_once_and_carries_across_checkpoints() -> None:
    ledger = GoodputLedger()
    time.sleep(0.02)
    ledger.charge("training")
    ledger.charge("tracking")  # nothing since the previous charge
    assert 0.02 <= ledger.seconds["training"] < 1 and ledger.seconds["tracking"] < 0.01
    ledger.add_start("startup", 10.0, waited_for_resources=4.0)
    ledger.add_start("recovery", 3.0, waited_for_resources=7.0)  # never more than the start took
    ledger.add_start("recovery", 2.0, waited_for_resources=-1.0)
    assert ledger.seconds["startup"] == 6.0 and ledger.seconds["recovery"] == 2.0 and ledger.seconds["resources"] == 7.0
    saved = ledger.to_dict()
    resumed = GoodputLedger()
    resumed.add("startup", 1.0)  # this attempt's own start, before it read the checkpoint
    resumed.carry({**saved, "seconds": {**saved["seconds"], "from_a_newer_version": 5.0}})
    assert resumed.seconds["startup"] == 7.0 and resumed.seconds["resources"] == 7.0
    assert set(resumed.seconds) == set(CATEGORIES)
    assert resumed.total() == pytest.approx(ledger.total() + 1.0)
    assert GoodputLedger.from_dict({}).total() == 0  # a checkpoint older than the ledger
    table = resumed.table()
    assert table.splitlines()[1].split()[0] == "start-up" and "waiting for resources" in table


def test_a_restart_charges_the_lost_steps_and_the_recovery_once() -> None:
    ledger = GoodputLedger()  # saved at t=100 after step 30; the lost attempt reached step 38 at t=140
    ledger.add_restart(30, 100.0, (38, 140.0), began_at=200.0, waited_for_resources=15.0)
    assert ledger.seconds["recomputed"] == 40.0 and ledger.recomputed_steps == 8
    assert (ledger.seconds["recovery"], ledger.seconds["resources"]) == (45.0, 15.0)
    unknown = GoodputLedger()  # the monitor had no progress after the checkpoint: nothing recomputed
    unknown.add_restart(30, 100.0, (0, 0.0), began_at=130.0, waited_for_resources=0.0)
    assert (unknown.seconds["recomputed"], unknown.recomputed_steps, unknown.seconds["recovery"]) == (0.0, 0, 30.0)


def test_progress_lines_say_what_a_person_needs() -> None:
    metrics = {"train/loss": 4.2134, "train/ppl": 67.61, "train/lr": 1.8e-3, "train/tokens_per_s": 3512.4,
               "train/mfu": 0.031, "train/data_wait_s": 0.002}
    assert window_line(120, 450, metrics, 552.0) == \
        "step 120/450  loss 4.213  ppl 67.6  lr 1.80e-03  3,512 tok/s  MFU 3.1%  data 2 ms  ETA 9m12s"
    without = {k: v for k, v in metrics.items() if k != "train/mfu"}
    assert window_line(7, 0, without, None) == "step 7  loss 4.213  ppl 67.6  lr 1.80e-03  3,512 tok/s  data 2 ms"
    assert validation_line(100, {"valid/loss": 3.1, "valid/ppl": 22.2, "valid/bleu": 30.456}) == \
        "step 100  valid loss 3.100  ppl 22.2  BLEU 30.46"
    assert validation_line(100, {"train/loss": 1.0}) is None
