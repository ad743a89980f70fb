"""The per-worker training function that Ray Train runs on every rank: build, restore, loop, report.

The loop asks small components what to do: `cadence` when to log, validate, save and stop;
`metrics` the window's tokens/s and MFU; `engine` one exact optimizer step; `checkpoint` how to
start, save and restore (`start.py`, `save.py`); `run_report` what a person and MLflow are told;
`goodput` where the time went. It knows nothing of clusters, only Ray Train's session API
(context, checkpoint, report).

Ranks can have different numbers of batches in an epoch; a rank that ran out steps a zero-weight
dummy batch until every rank has, then all start the next epoch together.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import socket
import time
from pathlib import Path
from typing import Iterator

import torch

from data_pipeline.batching import Batch
from data_pipeline.manifest import load_manifest
from data_pipeline.stream import ShardStream
from jobs import checkpoint as ckpt
from jobs.report.goodput import GoodputLedger
from jobs.report.metrics import (
    ForwardClock,
    MetricsWindow,
    batch_training_flops,
    device_peak_flops,
    rank_time_metrics,
    run_metrics,
)
from jobs.report.stragglers import StragglerWatch
from jobs.report.system_metrics import NodeSystemMetrics
from jobs.report.tracking import END_OF_RUN_WAIT_S, local_store_dir
from jobs.run.config import JobConfig, build_section
from jobs.run.layout import RunLayout
from jobs.run.lease import check_holds
from jobs.train.cadence import Cadence
from jobs.train.collectives import all_gather, all_sum
from jobs.train.deepspeed_config import accumulation_steps
from jobs.train.engine import DivergenceGuard, train_step
from jobs.train.run_report import RankReport
from jobs.train.save import Saver
from jobs.train.start import Place, attempt_checkpoint, start_rank
from jobs.train.validation import valid_bleu, valid_loss
from jobs.train.watchdog import CHECKPOINT, START, STEP, TRACKING, VALIDATE, Heartbeat


class Trainer:
    """One rank's training: built or restored in `__init__`, trained in `run`; the run's state it
    advances is what each checkpoint carries."""

    def __init__(self, loop_config: dict):
        import ray.train

        self.ledger, self.began_at = GoodputLedger(), time.time()  # this attempt's time starts here
        self.job: JobConfig = build_section(JobConfig, loop_config["job"], "")
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.heartbeat = Heartbeat(loop_config.get("monitor"), self.rank, self.world)
        self.heartbeat.beat(0, START)  # building, restoring and the first collectives take long
        self.lease = loop_config["lease"]  # the driver's: checked before every write
        self.fence("anything")  # a restarted worker of a driver that lost the run stops at once
        torch.set_num_threads(self.job.train.threads_per_worker)
        self.manifest = load_manifest(loop_config["dataset_uri"])
        self.model_config = self.job.model  # completed from the dataset by the driver
        self.cadence = Cadence(self.job.train, self.manifest.has_split("valid") and not self.manifest.monolingual)
        self.accumulation = accumulation_steps(self.job, self.world)
        self.guard = DivergenceGuard(self.job.train.max_consecutive_skips)
        self.preemption_seen = False
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        RunLayout.from_dict(loop_config["layout"]).use_staging()  # checkpoint parts and downloads

        self.signer = ckpt.Signer(ray.get(loop_config["signing_key"]), self.job.train.accept_unsigned_checkpoints)
        restored, registered = attempt_checkpoint(ckpt.ResumePlan(**loop_config["resume_plan"]))
        place = Place(self.rank, self.world, self.local_rank)
        with restored.as_directory() if restored is not None else contextlib.nullcontext() as directory:
            # downloaded to local scratch if remote
            self.start = start_rank(self.job, self.manifest, place, loop_config["launch_id"], loop_config["run_id"],
                                    Path(directory) if directory is not None else None,
                                    posixpath.basename(restored.path.rstrip("/")) if restored is not None else "",
                                    self.signer)
        self.engine, self.scheduler, self.state, self.average = (self.start.engine, self.start.scheduler,
                                                                 self.start.state, self.start.average)
        if self.start.resumed_from_step is not None:
            self.ledger.carry(self.state.goodput)
        if self.start.restarted_in_run:
            self.ledger.add_restart(self.state.step, self.state.saved_at, self.heartbeat.last_progress(),
                                    self.began_at, placement_wait_s())
        else:  # this driver's start-up: from its start to this worker's
            self.ledger.add_start("startup", self.began_at - loop_config["started_at"], placement_wait_s())
        self.stream = ShardStream(self.manifest, "train", self.job.stream, rank=self.rank, world_size=self.world,
                                  position=self.start.position, max_length=self.model_config.max_positions)

        self._start_tracking(loop_config["tracking_uri"], loop_config["run_id"], loop_config.get("relay"))
        self.peak = device_peak_flops(self.device, self.job.train.precision)
        self.forward_clock = ForwardClock(self.device)
        self.stragglers = StragglerWatch(self.job.train.straggler_factor)
        self.saver = Saver(self.rank, self.job.train.zero_stage, self.job.train.async_checkpoint, self.engine,
                           self.average, self.report, self.fence, self.signer)
        if not registered:  # complete, but never registered
            self.saver.register(posixpath.basename(restored.path.rstrip("/")), self.state.step,
                                validate=self.cadence.bleu_of_checkpoint(self.state.step))
        self.nodes: list[str] = []  # each rank's host/node, from _announce
        # The dropout stream of this rank, set last so that nothing above can draw from it.
        if self.start.rng is not None:
            torch.set_rng_state(self.start.rng)
        else:  # a fresh run, or a resume at another world size (no old rank's stream fits)
            torch.manual_seed(self.job.train.seed * 1000 + self.rank + 1 + 7919 * self.state.step)

    def _start_tracking(self, tracking_uri: str, run_id: str, relay) -> None:
        """The report (rank 0's reaches the console and MLflow). Each node's local rank 0: its
        system metrics (with a store in files, SQLite, only rank 0's node can reach it)."""
        import ray

        os.environ.update(self.job.tracking.environment())
        self.report = RankReport.of_rank(self.rank, relay, tracking_uri, run_id, self.state.pending_metrics, self.fence)
        self.system_metrics = None
        every = self.job.tracking.system_metrics_every_s
        if self.local_rank == 0 and every and (self.rank == 0 or local_store_dir(tracking_uri) is None):
            self.system_metrics = NodeSystemMetrics(run_id, tracking_uri, ray.get_runtime_context().get_node_id(), every)

    def fence(self, what: str) -> None:
        """Raises LeaseLost once another driver holds this run: its workers must not write."""
        check_holds(self.lease["uri"], self.lease["holder"], what)

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, metrics: dict[str, float], wait: bool, validate: bool = False) -> None:
        """The checkpoint of this step, with the run's state as of now (`Saver.save`)."""
        self.heartbeat.beat(self.state.step, CHECKPOINT)
        self.state.pending_metrics = self.report.unsent()  # kept with the checkpoint
        self.ledger.charge("checkpoint")  # the ledger saved covers the run up to saved_at exactly
        self.state.goodput, self.state.saved_at = self.ledger.to_dict(), time.time()
        self.saver.save(self.state, ckpt.RankState(self.stream.position, torch.get_rng_state()), metrics, wait, validate)

    # -- the loop --------------------------------------------------------------------------------
    def _batches(self) -> Iterator[Batch]:
        if self.stream.position.epoch == self.state.epoch:
            return self.stream.epoch_batches()
        return iter(())  # this rank finished the epoch before the checkpoint; others had not

    def _announce(self) -> None:
        import ray

        self.nodes = all_gather(f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}")
        self.report.started(self.start, self.world, self.job.train.zero_stage, self.nodes, self.accumulation, self.peak)

    def run(self) -> None:
        cadence = self.cadence
        self._announce()
        started, elapsed_before, last_save = time.monotonic(), self.state.elapsed_seconds, time.monotonic()
        batches, window, stop = self._batches(), MetricsWindow(), cadence.out_of_steps(self.state.step)
        preemption_pending = False
        first = True  # the attempt's first step stays in the start phase: it may compile, and warms up
        ledger = self.ledger
        ledger.charge("startup")
        while not stop:
            self.heartbeat.beat(self.state.step + 1, START if first else STEP)
            first = False
            fetch = time.perf_counter()
            micro = [next(batches, None) for _ in range(self.accumulation)]
            data_wait = time.perf_counter() - fetch
            ledger.charge("data_wait")
            real = [b for b in micro if b is not None]
            # One collective per step: the token/FLOP sums, and rank 0's clock decisions (the
            # other ranks add zeros) so that every rank stops and saves at the same step.
            clock = cadence.clock(elapsed_before + time.monotonic() - started, time.monotonic() - last_save)
            preemption_pending = self._preemption_notice() or preemption_pending
            global_tokens, ranks_with_data, global_flops, time_up, save_due = all_sum([
                sum(b.target_tokens for b in real), float(bool(real)),
                sum(batch_training_flops(self.model_config, b) for b in real),
                *(clock if self.rank == 0 else [0.0, 0.0]),
            ])
            if ranks_with_data == 0:  # every rank finished the epoch
                self.state.epoch += 1
                stop = cadence.out_of_epochs(self.state.epoch)
                if not stop:
                    batches = self._batches()
                    continue
            else:
                loss, nll = train_step(self.engine, micro, global_tokens, self.world, self.model_config.label_smoothing,
                                       self.forward_clock)
                self.state.step += 1
                skipped = self.guard.after_step(self.engine, self.state.step)
                self.state.skipped_steps += skipped
                if self.average is not None and not skipped:
                    self.average.update(self.engine.module.named_parameters())
                self.state.tokens_seen += int(global_tokens)
                window.add_step(loss, nll, global_tokens, global_flops, data_wait, self.forward_clock.take(),
                                sum(b.target_tokens for b in real))
            self.state.elapsed_seconds = elapsed_before + time.monotonic() - started
            step = self.state.step
            stop = stop or bool(time_up) or cadence.out_of_steps(step)
            ledger.charge("training")
            metrics: dict[str, float] = {}
            if window.steps and cadence.log(step, stop):
                metrics.update(self._window_metrics(window))
                window = MetricsWindow()
                if not stop:  # the last step's are the driver's: the whole run's, with its end
                    metrics.update(ledger.metrics())
            ledger.charge("tracking")
            bleu_in_loop = cadence.bleu_in_loop(step)
            if cadence.validate(step, stop) or bleu_in_loop:
                self.heartbeat.beat(step, VALIDATE)
            if cadence.validate(step, stop):
                metrics.update(valid_loss(self.engine, self.job, self.manifest, self.rank, self.world))
                if "valid/loss" in metrics:
                    stop = cadence.patience_exhausted(self.state, metrics["valid/loss"]) or stop
            if bleu_in_loop:
                metrics.update(valid_bleu(self.engine, self.job, self.manifest, self.rank, self.world))
            ledger.charge("validation")
            self.report.publish(step, metrics, cadence, self.state.elapsed_seconds)
            ledger.charge("tracking")
            # A checkpoint at each BLEU step: the score belongs to a checkpoint that retention can keep.
            if cadence.save(step, stop, bool(save_due) or preemption_pending or cadence.bleu(step)):
                self.save(metrics, wait=stop or preemption_pending, validate=cadence.bleu_of_checkpoint(step))
                last_save, preemption_pending = time.monotonic(), False
            ledger.charge("checkpoint")
        if self.system_metrics is not None:
            self.system_metrics.finish()
        if self.report.active:  # what is still queued is in the last checkpoint's spool too
            self.heartbeat.beat(self.state.step, TRACKING)
            self.report.close(timeout_s=END_OF_RUN_WAIT_S)
        self.heartbeat.close(self.state.step)

    def _preemption_notice(self) -> bool:
        """True once per notice that a node of this run will be preempted (Ray Train agrees on it
        across ranks): the loop then checkpoints at once, for the restart to start from (once Ray
        Train has registered it, which can take longer than the node's grace period)."""
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None or self.preemption_seen:
            return False
        self.preemption_seen = True
        self.report.line(f"step {self.state.step}  preemption notice for ranks {info.preempted_ranks}: "
                         "checkpointing now")
        return True

    def _window_metrics(self, window: MetricsWindow) -> dict[str, float]:
        """Collective: every rank calls it at the same step."""
        own = all_gather(window.own_ms_per_1k_tokens())
        for line in self.stragglers.observe(own, self.nodes, window.steps):
            self.report.line(f"step {self.state.step}  {line}")
        return {**window.summary(all_sum, self.peak[0], self.world), **rank_time_metrics(own),
                **run_metrics(self.state, self.world, self.scheduler.get_last_lr()[0], self.engine.get_global_grad_norm())}


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point given to TorchTrainer."""
    Trainer(loop_config).run()


def placement_wait_s() -> float:
    """Seconds Ray waited to place this worker group: its placement group's creation latency,
    long only when the cluster's resources were busy or missing. A placement Ray Train gave up on
    (it retries after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s) is not in it."""
    from ray.util.placement_group import get_current_placement_group, placement_group_table

    group = get_current_placement_group()
    if group is None:
        return 0.0
    return placement_group_table(group)["stats"]["end_to_end_creation_latency_ms"] / 1000
