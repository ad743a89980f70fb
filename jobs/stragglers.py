"""Stragglers: a rank persistently slower than the others, named once on the console.

Collectives make every rank's step time the same (the fast ones wait for the slow one), so step
time cannot tell who is slow. What a rank does alone can: its forward passes (no collective in
ZeRO 0-2; ZeRO-3's parameter gathers are in it too) and its wait for data. The ranks' shares of
the data are not equal, though: near an epoch's end one rank may still have batches while another
runs out and steps on an empty stand-in batch, and a rank's batches vary in size. So each rank's
own time is measured per 1,000 of its own target tokens, over its real batches only
(`jobs.metrics.ForwardClock`, `MetricsWindow`): a rank is slow when it takes longer for the same
work, not when it has more of it. A rank with no data in a window is not compared. Each log window
rank 0 logs the figure per rank, with the skew, and `StragglerWatch` decides: slow in several log
windows in a row that together cover enough steps to be more than a loaded machine's moment.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

WINDOWS = 3  # log windows in a row a rank must be slow in before it is named...
MIN_STEPS = 20  # ...covering at least this many steps: a few short windows are the machine's noise
NOISE_MS = 2.0  # differences below this per 1,000 tokens are noise, however large the ratio


def skew(own_ms: list[float | None]) -> float:
    """The slowest rank's own time per 1,000 tokens over the median rank's (1.0: balanced), among
    the ranks that had data."""
    measured = [ms for ms in own_ms if ms is not None]
    median = statistics.median(measured) if measured else 0.0
    return max(measured) / median if median > 0 else 1.0


@dataclass
class StragglerWatch:
    factor: float  # train.straggler_factor
    slow_windows: dict[int, int] = field(default_factory=dict)
    slow_steps: dict[int, int] = field(default_factory=dict)
    named: set[int] = field(default_factory=set)

    def observe(self, own_ms: list[float | None], where: list[str], steps: int) -> list[str]:
        """Console lines for the ranks that have just become stragglers (each named once until it
        recovers) after one log window of `steps` steps, given each rank's own milliseconds per
        1,000 target tokens (None: the rank had no data in the window)."""
        lines = []
        for rank, ms in enumerate(own_ms):
            others = [other for index, other in enumerate(own_ms) if index != rank and other is not None]
            median = statistics.median(others) if others else None
            if not (ms is not None and median is not None and ms > self.factor * median and ms - median > NOISE_MS):
                self.slow_windows[rank], self.slow_steps[rank] = 0, 0
                self.named.discard(rank)
                continue
            self.slow_windows[rank] = self.slow_windows.get(rank, 0) + 1
            self.slow_steps[rank] = self.slow_steps.get(rank, 0) + steps
            if rank not in self.named and self.slow_windows[rank] >= WINDOWS and self.slow_steps[rank] >= MIN_STEPS:
                self.named.add(rank)
                lines.append(f"straggler: rank {rank} on {where[rank]} is {ms / max(median, 1e-9):.1f}x slower than "
                             f"the other ranks ({ms:.0f} ms against {median:.0f} ms of forward passes and data wait "
                             f"per 1,000 target tokens) for {self.slow_steps[rank]} steps in a row")
        return lines
