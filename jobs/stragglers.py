"""Stragglers: a rank persistently slower than the others, named once on the console.

Collectives make every rank's step time the same (the fast ones wait for the slow one), so step
time cannot tell who is slow. What a rank does alone can: its forward passes (no collective in
ZeRO 0-2; ZeRO-3's parameter gathers are in it too) and its wait for data. The ranks' shares of
the data are not equal, though: near an epoch's end one rank may still have batches while another
runs out and steps on an empty stand-in batch, and a rank's batches vary in size. So each rank's
own time is measured per 1,000 of its own target tokens, over its real batches only
(`jobs.metrics.ForwardClock`, `MetricsWindow`): a rank is slow when it takes longer for the same
work, not when it has more of it. A rank with no data in a window is not compared. Each log window
rank 0 logs the figure per rank, with the skew, and `StragglerWatch` decides on the median of each
rank's latest windows, enough of them to be more than a loaded machine's moment.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

WINDOWS = 3  # a rank is judged over at least this many of the latest log windows...
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
    recent: deque = field(default_factory=deque)  # (own ms per rank, steps) of the latest log windows
    named: set[int] = field(default_factory=set)

    def observe(self, own_ms: list[float | None], where: list[str], steps: int) -> list[str]:
        """Console lines for the ranks that have just become stragglers (each named once until it
        recovers) after one log window of `steps` steps, given each rank's own milliseconds per
        1,000 target tokens (None: the rank had no data in the window). Each rank's figure is the
        median over the latest windows (at least WINDOWS of them and MIN_STEPS steps, its windows
        without data left out), so that neither one noisy window nor an epoch's end decides."""
        self.recent.append((own_ms, steps))
        while len(self.recent) > WINDOWS and sum(s for _, s in self.recent) - self.recent[0][1] >= MIN_STEPS:
            self.recent.popleft()
        covered = sum(s for _, s in self.recent)
        if len(self.recent) < WINDOWS or covered < MIN_STEPS:
            return []
        typical = [_median([window[rank] for window, _ in self.recent if rank < len(window)])
                   for rank in range(len(own_ms))]
        lines = []
        for rank, ms in enumerate(typical):
            others = [other for index, other in enumerate(typical) if index != rank and other is not None]
            if ms is None or not others:
                continue  # not compared: no data, or no one to compare with
            median = statistics.median(others)
            if not (ms > self.factor * median and ms - median > NOISE_MS):
                self.named.discard(rank)
            elif rank not in self.named:
                self.named.add(rank)
                lines.append(f"straggler: rank {rank} on {where[rank]} is {ms / max(median, 1e-9):.1f}x slower than "
                             f"the other ranks ({ms:.0f} ms against {median:.0f} ms of forward passes and data wait "
                             f"per 1,000 target tokens, the median of the last {covered} steps)")
        return lines


def _median(values: list[float | None]) -> float | None:
    measured = [value for value in values if value is not None]
    return statistics.median(measured) if measured else None
