"""Stragglers: a rank persistently slower than the others, named once on the console.

Collectives make every rank's step time the same (the fast ones wait for the slow one), so step
time cannot tell who is slow. What a rank does alone can: its forward passes (no collective in
ZeRO 0-2; ZeRO-3's parameter gathers are in it too) and its wait for data. Each log window every
rank contributes that time per step (`jobs.metrics.ForwardClock`, `MetricsWindow`); rank 0 logs it
per rank, with the skew, and `StragglerWatch` decides.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

WINDOWS = 3  # log windows in a row a rank must be slow in before it is named
NOISE_S = 0.002  # differences below this per step are noise, however large the ratio


def skew(own_seconds: list[float]) -> float:
    """The slowest rank's own time per step over the median rank's (1.0: balanced)."""
    median = statistics.median(own_seconds)
    return max(own_seconds) / median if median > 0 else 1.0


@dataclass
class StragglerWatch:
    factor: float  # train.straggler_factor
    slow_windows: dict[int, int] = field(default_factory=dict)

    def observe(self, own_seconds: list[float], where: list[str]) -> list[str]:
        """Console lines for the ranks that have just become stragglers (each named once until it
        recovers) after one log window's per-rank own time per step."""
        lines = []
        for rank, seconds in enumerate(own_seconds):
            others = statistics.median(own_seconds[:rank] + own_seconds[rank + 1:]) if len(own_seconds) > 1 else seconds
            slow = seconds > self.factor * others and seconds - others > NOISE_S
            self.slow_windows[rank] = self.slow_windows.get(rank, 0) + 1 if slow else 0
            if self.slow_windows[rank] == WINDOWS:
                lines.append(f"straggler: rank {rank} on {where[rank]} is {seconds / max(others, 1e-9):.1f}x slower than "
                             f"the other ranks ({1000 * seconds:.0f} ms against {1000 * others:.0f} ms per step of "
                             f"forward passes and data wait) for {WINDOWS} log windows in a row")
        return lines
