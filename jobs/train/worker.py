"""The per-worker training function that Ray Train runs on every rank: build, restore, loop, report.

The loop asks small components what to do: `cadence` when to log, validate, save and stop;
`metrics` the window's tokens/s and MFU; `engine` one exact optimizer step; `start` and `save` how
a rank starts (fresh or restored) and saves; `run_report` what a person and MLflow are told;
`phases` the phase clock, which moves the watchdog's heartbeat and the goodput ledger together.
It knows nothing of clusters, only Ray Train's session API (context, checkpoint, report).

Ranks can have different numbers of batches in an epoch; a rank that ran out steps a zero-weight
dummy batch until every rank has, then all start the next epoch together."""

from __future__ import annotations

import contextlib
import os
import posixpath
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from data_pipeline.batching import Batch
from data_pipeline.manifest import Manifest, load_manifest
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
from jobs.report.system_metrics import NodeSampler, node_metrics
from jobs.report.tracking import END_OF_RUN_WAIT_S
from jobs.run.config import JobConfig
from jobs.run.lease import check_holds
from jobs.run.metric_names import VALID_LOSS
from jobs.train.cadence import Cadence
from jobs.train.collectives import all_gather, all_sum
from jobs.train.deepspeed_config import accumulation_steps
from jobs.train.engine import DivergenceGuard, train_step
from jobs.train.launch import Launch
from jobs.train.phases import BUILD, DATA, FLUSH, LOG, SAVE, TRAIN, VALIDATE, LoopClock, Phases
from jobs.train.run_report import RankReport
from jobs.train.save import Saver
from jobs.train.start import Place, Start, attempt_checkpoint, start_rank
from jobs.train.validation import valid_bleu, valid_loss
from jobs.train.watchdog import Heartbeat


class Trainer:
    """One rank's training: built or restored in `__init__`, trained in `run`; the run's state it
    advances is what each checkpoint carries."""

    def __init__(self, launch: Launch):
        import ray.train

        ledger, began_at, self.job = GoodputLedger(), time.time(), launch.job  # this attempt's time starts here
        context = ray.train.get_context()
        self.place = Place(context.get_world_rank(), context.get_world_size(), context.get_local_rank())
        self.rank, self.world = self.place.rank, self.place.world
        self.phases = Phases(Heartbeat(launch.monitor, self.rank, self.world), ledger)
        self.phases.heartbeat.beat(0, BUILD.watch)  # building, restoring and the first collectives take long
        self.lease = (launch.lease_uri, launch.lease_holder)  # the driver's: checked before every write
        self.fence("anything")  # a restarted worker of a driver that lost the run stops at once
        torch.set_num_threads(self.job.train.threads_per_worker)
        self.manifest = load_manifest(launch.dataset_uri)
        self.model_config = self.job.model  # completed from the dataset by the driver
        self.cadence = Cadence(self.job.train, self.manifest.has_split("valid") and not self.manifest.monolingual)
        self.accumulation = accumulation_steps(self.job, self.world)
        self.guard, self.preemption_pending = DivergenceGuard(self.job.train.max_consecutive_skips), False
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        launch.layout.use_staging()  # checkpoint parts and downloads
        self.signer = ckpt.Signer(ray.get(launch.signing_key), self.job.train.accept_unsigned_checkpoints)
        self.start, restored, registered = _start(launch, self.place, self.manifest, self.signer)
        self.engine, self.scheduler, self.state, self.average = (self.start.engine, self.start.scheduler,
                                                                 self.start.state, self.start.average)
        _charge_start(self.phases, self.start, began_at, launch.started_at)
        self.stream = ShardStream(self.manifest, "train", self.job.stream, rank=self.rank, world_size=self.world,
                                  position=self.start.position, max_length=self.model_config.max_positions)
        self.report, self.system_metrics = _tracking(self.job, self.place, launch, self.state.pending_metrics, self.fence)
        self.peak = device_peak_flops(self.device, self.job.train.precision)
        self.forward_clock, self.window = ForwardClock(self.device), MetricsWindow(corpora=self.stream.corpora)
        self.stragglers = StragglerWatch(self.job.train.straggler_factor)
        self.saver = Saver(self.rank, self.job.train.zero_stage, self.job.train.async_checkpoint, self.engine,
                           self.average, self.report, self.fence, self.signer)
        if not registered:  # complete, but never registered
            self.saver.register(posixpath.basename(restored.path.rstrip("/")), self.state.step,
                                validate=self.cadence.bleu_of_checkpoint(self.state.step))
        self.nodes, self.preemption = [], PreemptionWatch(self.report.line)  # nodes: each rank's, from _announce
        _seed_dropout(self.start, self.job.train.seed, self.rank)  # last: nothing above may draw from it

    def fence(self, what: str) -> None:
        """Raises LeaseLost once another driver holds this run: its workers must not write."""
        check_holds(*self.lease, what)

    def run(self) -> None:
        """Each step: fetch, agree, train; then log, validate and save, each when it is due."""
        self._announce()
        self.phases.ledger.charge(BUILD.ledger)
        self.clock, batches = LoopClock(self.state.elapsed_seconds), self._batches()
        stop, first = self.cadence.out_of_steps(self.state.step), True
        while not stop:
            self.phases.begin_step(self.state.step + 1, first)
            first = False
            with self.phases(DATA):
                fetched = time.perf_counter()
                micro = [next(batches, None) for _ in range(self.accumulation)]
                data_wait = time.perf_counter() - fetched
            with self.phases(TRAIN):
                agreed = self._agree([b for b in micro if b is not None])
                if agreed.ranks_with_data:
                    self._train(micro, agreed, data_wait)
                    stop = agreed.time_up or self.cadence.out_of_steps(self.state.step)
                else:  # every rank finished the epoch
                    self.state.epoch += 1
                    stop = self.cadence.out_of_epochs(self.state.epoch)
                    batches = batches if stop else self._batches()
                self.state.elapsed_seconds = self.clock.elapsed()
            if not (agreed.ranks_with_data or stop):
                continue
            with self.phases(LOG):
                metrics = self._window_metrics(stop)
            stop = self._validate(metrics, stop)
            with self.phases(LOG):
                self.report.publish(self.state.step, metrics, self.cadence, self.state.elapsed_seconds)
            self._save_if_due(metrics, stop, agreed.save_due)
        _finish(self.phases, self.report, self.system_metrics, self.state.step)

    def _announce(self) -> None:
        import ray

        self.nodes = all_gather(f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}")
        self.report.started(self.start, self.world, self.job.train.zero_stage, self.nodes, self.accumulation, self.peak)

    def _batches(self) -> Iterator[Batch]:
        if self.stream.position.epoch == self.state.epoch:
            return self.stream.epoch_batches()
        return iter(())  # this rank finished the epoch before the checkpoint; others had not

    def _agree(self, real: list[Batch]) -> Agreement:
        """The step's one collective: the token and FLOP sums, and rank 0's clock decisions (the
        other ranks add zeros) so that every rank stops and saves at the same step."""
        clock = self.cadence.clock(self.clock.elapsed(), self.clock.since_save())
        self.preemption_pending = self.preemption.notice(self.state.step) or self.preemption_pending
        tokens, ranks_with_data, flops, time_up, save_due = all_sum([
            sum(b.target_tokens for b in real), float(bool(real)),
            sum(batch_training_flops(self.model_config, b) for b in real), *(clock if self.rank == 0 else [0.0, 0.0]),
        ])
        return Agreement(tokens, int(ranks_with_data), flops, bool(time_up), bool(save_due))

    def _train(self, micro: list[Batch | None], agreed: Agreement, data_wait: float) -> None:
        """One optimizer step over this rank's micro-batches (None: a zero-weight stand-in)."""
        corpora = len(self.stream.corpora)
        sums = train_step(self.engine, micro, agreed.tokens, self.world, self.model_config.label_smoothing,
                          self.forward_clock, corpora)
        self.state.step += 1
        skipped = self.guard.after_step(self.engine, self.state.step)
        self.state.skipped_steps += skipped
        if self.average is not None and not skipped:
            self.average.update(self.engine.module.named_parameters())
        self.state.tokens_seen += int(agreed.tokens)
        real = [b for b in micro if b is not None]
        corpus_tokens = sum((b.corpus_target_tokens(corpora) for b in real), 0) if corpora else ()
        self.window.add_step(sums.loss, sums.nll, agreed.tokens, agreed.flops, data_wait, self.forward_clock.take(),
                             sum(b.target_tokens for b in real), sums.corpus_nll, corpus_tokens)

    def _window_metrics(self, stop: bool) -> dict[str, float]:
        """The log window's metrics when a log line is due (a collective: every rank is here at the
        same step); the last step's ledger is the driver's, with the run's end."""
        if not (self.window.steps and self.cadence.log(self.state.step, stop)):
            return {}
        window, self.window = self.window, MetricsWindow(corpora=self.stream.corpora)
        own = all_gather(window.own_ms_per_1k_tokens())
        nodes = all_gather(self.system_metrics.take() if self.system_metrics is not None else None)
        self.report.rank_figures(self.state.step, own, self.nodes, nodes)
        for line in self.stragglers.observe(own, self.nodes, window.steps):
            self.report.line(f"step {self.state.step}  {line}")
        return {**window.summary(all_sum, self.peak[0], self.world), **rank_time_metrics(own), **node_metrics(nodes),
                **run_metrics(self.state, self.world, self.scheduler.get_last_lr()[0], self.engine.get_global_grad_norm()),
                **({} if stop else self.phases.ledger.metrics())}

    def _validate(self, metrics: dict[str, float], stop: bool) -> bool:
        """Valid loss (and BLEU in the loop) when due, into `metrics`; whether to stop now (patience)."""
        step, cadence = self.state.step, self.cadence
        loss_due, bleu_due = cadence.validate(step, stop), cadence.bleu_in_loop(step)
        with self.phases(VALIDATE, entered=loss_due or bleu_due):
            if loss_due:
                metrics.update(valid_loss(self.engine, self.job, self.manifest, self.rank, self.world))
                if VALID_LOSS in metrics:  # the patience counts every validation, the last one too
                    stop = cadence.patience_exhausted(self.state, metrics[VALID_LOSS]) or stop
            if bleu_due:
                metrics.update(valid_bleu(self.engine, self.job, self.manifest, self.rank, self.world))
        return stop

    def _save_if_due(self, metrics: dict[str, float], stop: bool, save_due: bool) -> None:
        """By steps or the clock, at the end, on a preemption notice, at each BLEU step (for retention)."""
        step = self.state.step
        due = self.cadence.save(step, stop, save_due or self.preemption_pending or self.cadence.bleu(step))
        with self.phases(SAVE, entered=due):
            if due:
                self.saver.checkpoint(self.state, self.stream.position, self.phases.ledger, metrics,
                                      wait=stop or self.preemption_pending, validate=self.cadence.bleu_of_checkpoint(step))
                self.clock.saved()
                self.preemption_pending = False


class PreemptionWatch:
    """Ray Train's notice that a node of this run will be preempted (it agrees on it across
    ranks): the loop then checkpoints at once, for the restart to start from (once Ray Train has
    registered it, which can take longer than the node's grace period)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say, self.seen = say, False

    def notice(self, step: int) -> bool:
        """True once per run attempt, at the first step that sees a notice."""
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None or self.seen:
            return False
        self.seen = True
        self.say(f"step {step}  preemption notice for ranks {info.preempted_ranks}: checkpointing now")
        return True


@dataclass(frozen=True)
class Agreement:
    """What every rank learns from a step's collective."""

    tokens: float  # target tokens of the step over all ranks
    ranks_with_data: int
    flops: float
    time_up: bool  # rank 0's clock: train.max_minutes spent
    save_due: bool  # rank 0's clock: train.checkpoint_every_minutes since the last save


def _start(launch: Launch, place: Place, manifest: Manifest, signer: ckpt.Signer):
    """(this rank's Start, the checkpoint it restored or None, whether Ray Train registered it)."""
    restored, registered = attempt_checkpoint(launch.resume_plan)
    with restored.as_directory() if restored is not None else contextlib.nullcontext() as directory:
        # downloaded to local scratch if remote
        start = start_rank(launch.job, manifest, place, launch.launch_id, launch.run_id,
                           Path(directory) if directory is not None else None,
                           posixpath.basename(restored.path.rstrip("/")) if restored is not None else "", signer)
    return start, restored, registered


def _finish(phases: Phases, report: RankReport, system_metrics: NodeSampler | None, step: int) -> None:
    """The attempt's end: the system figures' last, what is still queued for MLflow (it is in the
    last checkpoint's spool too), the heartbeat's last."""
    if system_metrics is not None:
        system_metrics.finish()
    if report.active:
        with phases(FLUSH):
            report.close(timeout_s=END_OF_RUN_WAIT_S)
    phases.heartbeat.close(step)


def _seed_dropout(start: Start, seed: int, rank: int) -> None:
    """This rank's dropout stream: the saved one, else (a fresh run, or a resume at another world
    size, where no old rank's stream fits) one seeded by the run's seed, the rank and the step."""
    if start.rng is not None:
        torch.set_rng_state(start.rng)
    else:
        torch.manual_seed(seed * 1000 + rank + 1 + 7919 * start.state.step)


def _charge_start(phases: Phases, start: Start, began_at: float, driver_started_at: float) -> None:
    """The ledger continues the checkpoint's totals, and charges this attempt's start: a restart's
    detection and recovery, or the driver's start-up (from its start to this worker's)."""
    ledger = phases.ledger
    if start.resumed_from_step is not None:
        ledger.carry(start.state.goodput)
    if start.restarted_in_run:
        ledger.add_restart(start.state.step, start.state.saved_at, phases.heartbeat.last_progress(), began_at,
                           placement_wait_s())
    else:
        ledger.add_start(BUILD.ledger, began_at - driver_started_at, placement_wait_s())


def _tracking(job: JobConfig, place: Place, launch: Launch, pending_metrics: list, fence) -> tuple:
    """(the rank's report, its node's system figures' sampler or None). Rank 0's report reaches the
    console and MLflow; each node's local rank 0 samples the node's system figures, which reach
    rank 0 with each log window."""
    os.environ.update(job.tracking.environment())
    report = RankReport.of_rank(place.rank, launch.relay, launch.tracking_uri, launch.run_id, pending_metrics, fence)
    every = job.tracking.system_metrics_every_s
    return report, NodeSampler(every, launch.tracking_uri) if place.local_rank == 0 and every else None


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point given to TorchTrainer."""
    Trainer(Launch.of(loop_config)).run()


def placement_wait_s() -> float:
    """Seconds Ray waited to place this worker group: its placement group's creation latency,
    long only when the cluster's resources were busy or missing. A placement Ray Train gave up on
    (it retries after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s) is not in it."""
    from ray.util.placement_group import get_current_placement_group, placement_group_table

    group = get_current_placement_group()
    if group is None:
        return 0.0
    return placement_group_table(group)["stats"]["end_to_end_creation_latency_ms"] / 1000
