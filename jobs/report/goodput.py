"""Where a run's wall-clock time went: the goodput ledger.

Every second from `aiayn train`'s start to its end is charged to exactly one category:

- the workers' loop charges the time since its previous charge to what it just did (`charge`),
  so their categories add up to the time the loop ran;
- a worker group's start is charged from the driver's start (a first attempt) or from the
  previous attempt's last progress (a restart: `recovery`, failure detection and the restart),
  less the time Ray waited for the cluster's resources to place the group (`resources`);
- a restart inside the run also lost the steps its previous attempt trained after the
  checkpoint it resumes from: their time is `recomputed`, their number `recomputed_steps`;
- the driver charges the end (the last upload, shutdown, export and test scoring) to `finish`.

The totals travel in each checkpoint, so a restart continues from its checkpoint's totals and
the parts sum to the run's wall time. Goodput is the share spent in training steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from jobs.report.progress import duration

# In the order a person reads them. `training` is the optimizer steps themselves (forward,
# backward, the update and the step's collective); the rest is what kept them from running.
CATEGORIES = {
    "training": "training steps",
    "data_wait": "data wait",
    "validation": "validation",
    "checkpoint": "checkpoint stalls",
    "tracking": "metrics and logging",
    "startup": "start-up (driver, worker group, build)",
    "resources": "waiting for resources",
    "recovery": "failure detection and restart",
    "recomputed": "steps trained again after a restart",
    "finish": "final upload, export and test scoring",
}


@dataclass
class GoodputLedger:
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    recomputed_steps: int = 0
    _mark: float = field(default_factory=time.monotonic, repr=False)

    @classmethod
    def from_dict(cls, saved: dict) -> GoodputLedger:
        """A checkpoint's totals (empty for checkpoints older than the ledger)."""
        ledger = cls()
        for category, value in saved.get("seconds", {}).items():
            if category in CATEGORIES:
                ledger.seconds[category] = float(value)
        ledger.recomputed_steps = int(saved.get("recomputed_steps", 0))
        return ledger

    def to_dict(self) -> dict:
        return {"seconds": dict(self.seconds), "recomputed_steps": self.recomputed_steps}

    def carry(self, saved: dict) -> None:
        """Continue from a checkpoint's totals; what this attempt charged so far is kept."""
        restored = GoodputLedger.from_dict(saved)
        for category, value in restored.seconds.items():
            self.seconds[category] += value
        self.recomputed_steps += restored.recomputed_steps

    def add(self, category: str, seconds: float) -> None:
        """Time outside this process's loop (before it started, after it ended)."""
        self.seconds[category] += max(seconds, 0.0)

    def add_start(self, category: str, seconds: float, waited_for_resources: float) -> None:
        """A worker group's start (`startup` or `recovery`): the part Ray spent waiting for the
        cluster's resources (busy with other jobs, or a lost node not yet replaced) is `resources`."""
        seconds = max(seconds, 0.0)
        waited = min(max(waited_for_resources, 0.0), seconds)
        self.add("resources", waited)
        self.add(category, seconds - waited)

    def add_restart(self, saved_step: int, saved_at: float, last_progress: tuple[int, float], began_at: float,
                    waited_for_resources: float) -> None:
        """A restart inside the run, from the checkpoint of `saved_step` (saved at `saved_at`): the
        steps the previous attempt trained after it are trained again (their time `recomputed`),
        and from its last step (`last_progress`: step, wall time) to this attempt's start
        (`began_at`) the failure was detected and the workers restarted (`recovery`). A later
        `aiayn train` charges neither: it may come days after the last one, and its own start-up
        is counted from its start."""
        step, at = last_progress
        reached = at if step > saved_step and at > saved_at else saved_at
        self.add("recomputed", reached - saved_at)
        self.recomputed_steps += max(step - saved_step, 0)
        self.add_start("recovery", began_at - reached, waited_for_resources)

    def charge(self, category: str) -> None:
        """The time since the previous charge (or since the ledger began) goes to `category`."""
        now = time.monotonic()
        self.seconds[category] += now - self._mark
        self._mark = now

    def total(self) -> float:
        return sum(self.seconds.values())

    def goodput(self) -> float:
        return self.seconds["training"] / self.total() if self.total() else 0.0

    def metrics(self) -> dict[str, float]:
        """For MLflow: cumulative seconds per category, the steps trained again, the goodput so far."""
        return {**{f"goodput/{category}_s": value for category, value in self.seconds.items()},
                "goodput/recomputed_steps": float(self.recomputed_steps), "goodput/ratio": self.goodput()}

    def table(self) -> str:
        """The end-of-run table: each category's time and share, largest first."""
        total = self.total() or 1.0
        rows = [f"  {CATEGORIES[category]:<40} {duration(value):>10}  {100 * value / total:5.1f}%"
                for category, value in sorted(self.seconds.items(), key=lambda item: -item[1]) if value > 0]
        again = f"; {self.recomputed_steps} steps trained again" if self.recomputed_steps else ""
        return "\n".join([f"where the time went ({duration(self.total())} in all; goodput "
                          f"{100 * self.goodput():.1f}%{again}):", *rows])
