"""A rank's save: the weights checked finite, its part written to local staging (a full disk said
in one line that names the setting to change), then handed to `Uploads`, which copies it to the
run's storage while training goes on; the stall and each upload reported.

The loop decides when to save (`jobs.train.cadence`); this module owns how, and what of the run's
state goes with it.
"""

from __future__ import annotations

import shutil
import time
from typing import Any, Callable

import torch

from data_pipeline.stream import StreamPosition
from jobs.checkpoint.files import CheckpointError, JobState, RankState, checkpoint_dir_name, save_checkpoint
from jobs.checkpoint.retention import reported_metrics
from jobs.checkpoint.signing import Signer
from jobs.checkpoint.upload import Uploads
from jobs.report.goodput import GoodputLedger
from jobs.run.metric_names import CHECKPOINT_STALL_S, CHECKPOINT_UPLOAD_S
from jobs.train.engine import check_finite_weights
from jobs.train.phases import SAVE
from jobs.train.run_report import RankReport
from transformer.ema import WeightAverage


class Saver:
    def __init__(self, rank: int, zero_stage: int, asynchronous: bool, engine: Any, average: WeightAverage | None,
                 report: RankReport, fence: Callable[[str], None], signer: Signer) -> None:
        """`fence(what)` raises once this run's lease is lost (checked before each upload);
        `signer` signs this rank's part."""
        self.rank, self.zero_stage, self.engine, self.average, self.report = rank, zero_stage, engine, average, report
        self.signer = signer
        self.uploads = Uploads(rank, asynchronous, fence, self._uploaded)

    def checkpoint(self, state: JobState, position: StreamPosition, ledger: GoodputLedger, metrics: dict[str, float],
                   wait: bool, validate: bool) -> None:
        """`save` with the run's state as of now: the metrics MLflow has not taken yet, and the
        ledger charged up to this moment, which the checkpoint records as `saved_at`."""
        state.pending_metrics = self.report.unsent()
        ledger.charge(SAVE.ledger)
        state.goodput, state.saved_at = ledger.to_dict(), time.time()
        self.save(state, RankState(position, torch.get_rng_state()), metrics, wait, validate)

    def save(self, state: JobState, rank_state: RankState, metrics: dict[str, float], wait: bool,
             validate: bool) -> None:
        """The checkpoint of `state.step` (`wait`: in storage before returning; `validate`: then
        scored by Ray Train's validation task). The seconds training stood still go to MLflow."""
        held_since = time.monotonic()
        check_finite_weights(self.engine, self.zero_stage, state.step)
        with self.uploads.staging() as local:
            try:
                save_checkpoint(self.engine, local, self.rank,
                                state if self.rank == 0 else None, rank_state, self.signer, self.average)
            except (OSError, RuntimeError) as error:  # torch reports a full disk as an iostream error
                free = shutil.disk_usage(local).free
                raise CheckpointError(
                    f"step {state.step}: writing this rank's checkpoint part to {local} failed with "
                    f"{free / 2**20:.0f} MiB free on that disk ({str(error).splitlines()[0][:120]}); "
                    "set cluster.staging_dir to a local disk with room for one checkpoint shard"
                ) from error
            self.uploads.report(reported_metrics(metrics, state.step), local, state.step, wait, validate)
        self.report.log({CHECKPOINT_STALL_S: time.monotonic() - held_since}, state.step)

    def register(self, name: str, step: int, validate: bool) -> None:
        """A complete checkpoint Ray Train never registered, which this attempt resumed from."""
        self.uploads.register(name, step, validate)

    def _uploaded(self, step: int, seconds: float, in_background: bool) -> None:
        """This rank's part of the checkpoint of `step` is in storage."""
        self.report.log({CHECKPOINT_UPLOAD_S: seconds}, step)
        self.report.line(f"step {step}  checkpoint {checkpoint_dir_name(step)} saved "
                         f"(uploaded in {seconds:.1f} s{', while training went on' if in_background else ''})")
