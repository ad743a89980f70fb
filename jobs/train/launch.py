"""What the driver hands every worker of a launch and the background BLEU task, as one typed
value: Ray Train passes it through `train_loop_config` (pickled by Ray, with the Ray handles in
it), so a worker reads fields, not string keys, and a parameter's trip can be followed across Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.checkpoint import ResumePlan
from jobs.run.config import JobConfig
from jobs.run.layout import RunLayout

KEY = "launch"  # the one key of the `train_loop_config` dict Ray Train requires


@dataclass(frozen=True)
class Launch:
    job: JobConfig  # resolved by the driver: absolute local paths, the step budget, the dataset's vocabulary
    dataset_uri: str  # the dataset version the run trains on
    tracking_uri: str
    run_id: str  # the run's one MLflow run
    layout: RunLayout
    resume_plan: ResumePlan
    lease_uri: str  # the run's lease, which every worker checks before it writes
    lease_holder: str
    launch_id: str  # one per driver start: tells a restart within a launch from a new launch
    started_at: float  # when the driver started (time.time()), for the start-up time in the ledger
    signing_key: Any = None  # a Ray object holding the account's signing key (never in a snapshot or a log)
    relay: Any = None  # the driver's console relay (a Ray actor); None: lines go nowhere but MLflow
    monitor: Any = None  # the watchdog's monitor (a Ray actor); None: no heartbeats

    def loop_config(self) -> dict:
        return {KEY: self}

    @staticmethod
    def of(loop_config: dict) -> "Launch":
        return loop_config[KEY]
