"""The loop's phases, named once: entering one tells the watchdog (its heartbeat, and so the time
allowed) and leaving it charges the goodput ledger, in one `with phases(VALIDATE, step):`.

A phase's `watch` is the watchdog's phase it enters (jobs/train/watchdog.py: START, VALIDATE,
CHECKPOINT and TRACKING are long ones, with their own allowance); None keeps the step's, so the
short phases inside a step cost no heartbeat. Its `ledger` is the category its time is charged
to (jobs/report/goodput.py).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

from jobs.report.goodput import GoodputLedger
from jobs.train import watchdog
from jobs.train.watchdog import Heartbeat


@dataclass(frozen=True)
class Phase:
    ledger: str
    watch: str | None = None


BUILD = Phase("startup", watchdog.START)  # building, restoring, the first collectives
DATA = Phase("data_wait")
TRAIN = Phase("training")
LOG = Phase("tracking")
VALIDATE = Phase("validation", watchdog.VALIDATE)
SAVE = Phase("checkpoint", watchdog.CHECKPOINT)
FLUSH = Phase("tracking", watchdog.TRACKING)  # the end of the run's metric backlog


class Phases:
    """A rank's phase clock: its heartbeat and its ledger, moved together."""

    def __init__(self, heartbeat: Heartbeat, ledger: GoodputLedger) -> None:
        self.heartbeat, self.ledger = heartbeat, ledger
        self.step = 0

    def begin_step(self, step: int, first: bool) -> None:
        """A new optimizer step; an attempt's first stays in the start phase: it may compile, and warms up."""
        self.step = step
        self.heartbeat.beat(step, watchdog.START if first else watchdog.STEP)

    @contextlib.contextmanager
    def __call__(self, phase: Phase, *, entered: bool = True) -> Iterator[None]:
        """`entered=False`: nothing of the phase is done this step (no heartbeat), though the
        moment since the last charge is still its."""
        if entered and phase.watch is not None:
            self.heartbeat.beat(self.step, phase.watch)
        try:
            yield
        finally:
            self.ledger.charge(phase.ledger)


@dataclass
class LoopClock:
    """The attempt's wall clock: the run's elapsed training time and the time since its last save."""

    elapsed_before: float  # the run's elapsed seconds at this attempt's start
    started: float = 0.0
    last_save: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.last_save = time.monotonic()

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def since_save(self) -> float:
        return time.monotonic() - self.last_save

    def saved(self) -> None:
        self.last_save = time.monotonic()
