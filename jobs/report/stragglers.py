"""Stragglers: a rank persistently slower than the others, named once on the console.

Collectives make every rank's step time the same (the fast ones wait for the slow one), so step
time cannot tell who is slow. What a rank does alone can: its forward passes (no collective in
ZeRO 0-2; ZeRO-3's parameter gathers are in it too) and its wait for data. The ranks' shares of
the data are not equal, though: near an epoch's end one rank may still have batches while another
runs out and steps on an empty stand-in batch, and a rank's batches vary in size. So each rank's
own time is measured per 1,000 of its own target tokens, over its real batches only
(`jobs.report.metrics.ForwardClock`, `MetricsWindow`): a rank is slow when it takes longer for the same
work, not when it has more of it. A rank with no data in a window is not compared. Each log window
rank 0 logs the figure per rank, with the skew, and `StragglerWatch` names a rank that was over
the factor, window by window, in most of the latest windows: enough of them to be more than a
loaded machine's moment.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

WINDOWS = 3  # a rank is judged over at least this many of the latest log windows...
MIN_STEPS = 20  # ...covering at least this many steps: a few short windows are the machine's noise
PERSISTENT = 0.75  # ...and is slow when it is over the factor in this share of those steps, window by window
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
        1,000 target tokens (None: the rank had no data in the window). Over the latest windows (at
        least WINDOWS of them and MIN_STEPS steps) a rank is compared with the others *in the same
        window*, so that a load on the whole machine cancels out, and is named when it was over the
        factor in PERSISTENT of the steps it had data in: a rank that is slow now and then, or by a
        margin near the factor that noise crosses both ways, is not a straggler."""
        self.recent.append((own_ms, steps))
        while len(self.recent) > WINDOWS and sum(s for _, s in self.recent) - self.recent[0][1] >= MIN_STEPS:
            self.recent.popleft()
        covered = sum(s for _, s in self.recent)
        if len(self.recent) < WINDOWS or covered < MIN_STEPS:
            return []
        lines = []
        for rank in range(len(own_ms)):
            pairs = [(window[rank], others, steps) for window, steps in self.recent
                     if rank < len(window) and window[rank] is not None
                     and (others := _median([ms for index, ms in enumerate(window) if index != rank])) is not None]
            compared = sum(steps for _, _, steps in pairs)
            slow = sum(steps for ms, others, steps in pairs if ms > self.factor * others and ms - others > NOISE_MS)
            if not pairs or slow < PERSISTENT * compared:
                self.named.discard(rank)
                continue
            if rank in self.named:
                continue
            self.named.add(rank)
            ms = statistics.median(ms for ms, _, _ in pairs)
            others = statistics.median(others for _, others, _ in pairs)
            lines.append(f"straggler: rank {rank} on {where[rank]} is {ms / max(others, 1e-9):.1f}x slower than "
                         f"the other ranks ({ms:.0f} ms against {others:.0f} ms of forward passes and data wait "
                         f"per 1,000 target tokens, the median of the last {covered} steps)")
        return lines


def _median(values: list[float | None]) -> float | None:
    measured = [value for value in values if value is not None]
    return statistics.median(measured) if measured else None
