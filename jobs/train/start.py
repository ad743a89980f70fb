"""A rank's start: its engine built fresh or restored from a checkpoint, and which kind of start it is.

The driver chose the checkpoint once (`resume.plan_resume`); Ray Train may hand a restarted worker
group a newer one (`resume.attempt_source`). From that directory, or none, this module builds the
engine, loads the weights and optimizer state (through DeepSpeed's universal format when the world
size changed), the moving average, this rank's data position and RNG state, and says what kind of
start it is: fresh, a resume, a restart inside the same driver's run, a resize.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from data_pipeline.manifest import Manifest
from data_pipeline.stream import StreamPosition
from jobs.checkpoint.files import (
    JobState,
    load_engine_state,
    load_weight_average,
    read_job_state,
    universal_copy,
    verify,
)
from jobs.checkpoint.resume import ResumePlan, attempt_source, rank_start, reshard_of
from jobs.checkpoint.signing import Signer
from jobs.run.config import JobConfig, public_config
from jobs.train.collectives import all_gather
from jobs.train.engine import build_engine
from transformer.ema import WeightAverage


@dataclass(frozen=True)
class Place:
    """Where this rank is: its rank, the world size, its rank on its node."""
    rank: int
    world: int
    local_rank: int


@dataclass
class Start:
    engine: Any  # DeepSpeed's engine
    scheduler: Any
    state: JobState  # the run's state as this attempt continues it
    average: WeightAverage | None  # rank 0's moving average of the weights (train.ema_decay)
    position: StreamPosition  # this rank's place in the data
    rng: torch.Tensor | None  # this rank's saved dropout stream; None: seed it anew
    resumed_from_step: int | None = None  # None: a fresh start
    resized_from: int | None = None  # the saved world size, when it differs
    restarted_in_run: bool = False  # a failure or an elastic resize inside this driver's run

    def resize(self, world: int) -> str | None:
        """The resize this start is, and why, for a person; None when the world size is the saved one."""
        if self.resized_from is None:
            return None
        if not self.restarted_in_run:
            cause = "resumed with another cluster.num_workers"
        else:
            cause = "capacity lost: a node left or failed" if world < self.resized_from else "capacity returned"
        return f"{self.resized_from} -> {world} workers ({cause})"


def attempt_checkpoint(plan: ResumePlan) -> tuple[Any, bool]:
    """(Ray Train's checkpoint this attempt starts from, or None; whether Ray Train has it
    registered). A restart inside the run gets Ray Train's latest; else the driver's plan chose."""
    import ray.train

    registered = ray.train.get_checkpoint()
    registered_path = registered.path if registered is not None else None
    source = attempt_source(plan, registered_path)
    if source == registered_path:  # also neither: a fresh start
        return registered, True
    return ray.train.Checkpoint(source), False


def start_rank(job: JobConfig, manifest: Manifest, place: Place, launch_id: str, run_id: str,
               checkpoint: Path | None, name: str, signer: Signer) -> Start:
    """The engine and state this rank trains on: fresh when `checkpoint` is None, else restored
    from that local copy of checkpoint `name` (verified, its signature included, before DeepSpeed
    unpickles anything in it)."""
    if checkpoint is None:
        engine, scheduler = build_engine(job, job.model, place.world, load_universal=False)
        state = JobState(mlflow_run_id=run_id, launch_id=launch_id, world_size=place.world,
                         zero_stage=job.train.zero_stage, tokenizer_sha256=manifest.tokenizer_sha256,
                         dataset_fingerprint=manifest.fingerprint, config=public_config(job))
        return Start(engine, scheduler, state, _weight_average(job, place, engine, None), StreamPosition(), None)
    verify(str(checkpoint), signer, name)
    saved = read_job_state(str(checkpoint))
    resharded = reshard_of(saved, place.world)
    with _universal_copy(checkpoint, place) if resharded else contextlib.nullcontext() as universal:
        engine, scheduler = build_engine(job, job.model, place.world, load_universal=resharded)
        load_engine_state(engine, checkpoint, universal)
    position, rng = rank_start(checkpoint, saved, place.rank, place.world, manifest, job.stream)
    start = Start(engine, scheduler, saved, _weight_average(job, place, engine, checkpoint), position, rng,
                  resumed_from_step=saved.step,
                  resized_from=saved.world_size if saved.world_size != place.world else None,
                  restarted_in_run=saved.launch_id == launch_id)
    _continue_state(saved, job, manifest, place, launch_id, run_id)
    return start


def _continue_state(state: JobState, job: JobConfig, manifest: Manifest, place: Place, launch_id: str,
                    run_id: str) -> None:
    """The saved state as this attempt carries it on: its launch, world, config and data."""
    state.launch_id = launch_id
    if state.mlflow_run_id != run_id:  # --resume into a new run: what the old one had not sent is not ours
        state.mlflow_run_id, state.pending_metrics = run_id, []
    state.world_size, state.config = place.world, public_config(job)
    state.dataset_fingerprint = manifest.fingerprint


def _weight_average(job: JobConfig, place: Place, engine, checkpoint: Path | None) -> WeightAverage | None:
    """Rank 0's moving average of the weights (train.ema_decay; every rank of ZeRO 0-2 holds the
    same whole weights): the checkpoint's, else begun from the weights as they are now."""
    decay = job.train.ema_decay
    if place.rank != 0 or not decay:
        return None
    saved = load_weight_average(checkpoint, decay) if checkpoint is not None else None
    return saved or WeightAverage(decay, dict(engine.module.named_parameters()))


@contextlib.contextmanager
def _universal_copy(checkpoint: Path, place: Place) -> Iterator[Path]:
    """The checkpoint in DeepSpeed's universal format, converted once per node, by the node's
    local rank 0, into a private directory made for this restore and removed after it: a known
    path in /tmp could be planted by another account, and DeepSpeed unpickles what it loads.
    Ray groups local ranks by node IP, which need not mean one disk: a rank that does not see
    its node's copy converts its own."""
    import ray

    own = Path(tempfile.mkdtemp(prefix="aiayn-universal-")) if place.local_rank == 0 else None
    try:
        if own is not None:
            universal_copy(checkpoint, own)
        node = ray.get_runtime_context().get_node_id()
        copies = [Path(path) for on, path in all_gather((node, str(own or ""))) if on == node and path]
        if not (copies and copies[0].is_dir()):
            own = Path(tempfile.mkdtemp(prefix="aiayn-universal-"))
            universal_copy(checkpoint, own)
            copies = [own]
        yield copies[0]
        dist.barrier()  # every rank of the node has loaded it
    finally:
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)
