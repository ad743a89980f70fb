"""`aiayn train --dry-run`: the plan of a run and an estimate of its cost, before it is paid.

Every check a run makes before it takes the cluster (config, data source, storage), then what the
cluster has against what the run asks for, the step's shape (tokens, micro-batches, accumulation
per worker), and a few real optimizer steps of the run's own model, engine, precision and compile
setting timed on one worker's resources (a Ray task) with synthetic micro-batches of the run's
shape. Nothing is trained, nothing is written (but the write probe of the run's storage, removed at
once), no MLflow run is made.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from data_pipeline.batching import Batch, longest_example
from data_pipeline.manifest import Manifest
from data_pipeline.tokenizer import BOS_ID
from jobs.report.metrics import batch_training_flops, device_peak_flops
from jobs.report.progress import duration
from jobs.run.config import JobConfig
from jobs.run.layout import RunLayout
from jobs.train.cpu_allocator import worker_environment
from jobs.train.deepspeed_config import accumulation_steps, with_step_budget
from jobs.train.engine import build_engine, compiles, train_step

WARMUP_STEPS = 2  # untimed: the first steps allocate, and compile where the run compiles
ASSUMED_LENGTH = 30  # tokens a side when the data is not prepared yet: a news sentence's typical length


@dataclass(frozen=True)
class Shape:
    """One micro-batch as the run will see it: rows of `src_len` and `tgt_len` tokens."""

    rows: int
    src_len: int
    tgt_len: int
    measured_lengths: bool  # from the prepared dataset's token counts, else `ASSUMED_LENGTH`


@dataclass(frozen=True)
class Measured:
    step_s: float
    steps: int
    device: str
    peak_memory: int  # bytes of device memory the steps held at most (GPU); 0 on a CPU
    device_memory: int
    mfu: float  # of the device's dense peak for the precision


def micro_batch_shape(job: JobConfig, manifest: Manifest | None) -> Shape:
    """A micro-batch of the dataset's mean lengths filling the token budget (the stream sorts by
    length, so a real one pads little)."""
    longest = longest_example(job.stream.max_tokens, job.model.max_positions)
    if manifest is not None:
        train = manifest.data["splits"]["train"]
        src = train["src_tokens"] / max(1, train["rows"])
        tgt = train.get("tgt_tokens", train["src_tokens"]) / max(1, train["rows"])
        measured = True
    else:
        src = tgt = ASSUMED_LENGTH
        measured = False
    src_len, tgt_len = (min(longest, max(2, round(length))) for length in (src, tgt))
    return Shape(max(1, job.stream.max_tokens // max(src_len, tgt_len)), src_len, tgt_len, measured)


def measure_steps(job: JobConfig, shape: Shape, accumulation: int, steps: int) -> Measured:
    """Time `steps` optimizer steps (after `WARMUP_STEPS`) of the run's DeepSpeed engine at world
    size 1 on this process's device, each of `accumulation` synthetic micro-batches of `shape`. Runs
    in a Ray task of its own (it makes a process group and sets the variables torch's needs)."""
    import torch.distributed as dist

    with socket.socket() as probe:  # a free port for a process group of one, on the loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    try:
        torch.set_num_threads(job.train.threads_per_worker)
        engine, _ = build_engine(job, job.model, 1, load_universal=False)
        generator = torch.Generator().manual_seed(0)
        vocab = job.model.vocab_size

        def micro_batch() -> Batch:
            src = torch.randint(4, vocab, (shape.rows, shape.src_len), generator=generator)
            tgt = torch.randint(4, vocab, (shape.rows, shape.tgt_len), generator=generator)
            bos = torch.full((shape.rows, 1), BOS_ID)
            return Batch(src=src, tgt_in=torch.cat([bos, tgt[:, :-1]], 1), tgt_out=tgt)

        tokens = accumulation * shape.rows * shape.tgt_len
        device = engine.device
        timings = []
        for step in range(WARMUP_STEPS + steps):
            micro = [micro_batch() for _ in range(accumulation)]
            if cuda:
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            train_step(engine, micro, tokens, 1, job.model.label_smoothing)
            if cuda:
                torch.cuda.synchronize(device)
            if step >= WARMUP_STEPS:
                timings.append(time.perf_counter() - began)
        step_s = float(np.median(timings))
        flops = sum(batch_training_flops(job.model, batch) for batch in micro)
        peak, _ = device_peak_flops(device, job.train.precision)
        name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
        return Measured(step_s, steps, name, torch.cuda.max_memory_allocated(device) if cuda else 0,
                        torch.cuda.get_device_properties(device).total_memory if cuda else 0,
                        flops / step_s / peak if peak else 0.0)
    finally:
        dist.destroy_process_group()


def cluster_lines(job: JobConfig) -> list[str]:
    """What the connected cluster has against what the run's worker group asks for."""
    import ray

    cluster = job.cluster
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    need_cpus = cluster.num_workers * cluster.cpus_per_worker
    need_gpus = cluster.num_workers if cluster.use_gpu else 0
    fits = cpus >= need_cpus and gpus >= need_gpus
    workers = (f"{cluster.min_workers}-{cluster.num_workers} workers (elastic)" if cluster.elastic
               else f"{cluster.num_workers} workers")
    asks = f"{workers} x {cluster.cpus_per_worker:g} CPU" + (" + 1 GPU" if cluster.use_gpu else "")
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    lines = [f"cluster: {nodes} node{'s' if nodes > 1 else ''}, {cpus:g} CPUs, {gpus:g} GPUs; the run asks {asks}: "
             + ("fits" if fits else "does NOT fit now (Ray Train would wait for the resources)")]
    if gpus and not cluster.use_gpu:
        lines.append("cluster: it has GPUs and cluster.use_gpu is false: the run would train on CPUs")
    return lines


def plan_lines(job: JobConfig, shape: Shape, manifest: Manifest | None) -> tuple[list[str], int | None]:
    """The step's shape and the run's length in steps (None where only a time budget bounds it)."""
    accumulation = accumulation_steps(job, job.cluster.num_workers)
    train = job.train
    compiled = compiles(job, job.cluster.use_gpu)
    lines = [f"step: {train.tokens_per_step:,} padded tokens over {job.cluster.num_workers} workers, each "
             f"{accumulation} micro-batch{'es' if accumulation > 1 else ''} of up to {job.stream.max_tokens:,} tokens "
             f"a step (accumulation {accumulation}); ZeRO stage {train.zero_stage}, {train.precision}"
             f"{', compiled' if compiled else ''}"]
    lengths = "the dataset's mean lengths" if shape.measured_lengths else "lengths assumed: the data is not prepared yet"
    lines.append(f"micro-batch: about {shape.rows} sentences of {shape.src_len} source and {shape.tgt_len} target "
                 f"tokens ({lengths})")
    steps = train.max_steps or None
    if steps is None and train.max_epochs and manifest is not None:
        split = manifest.data["splits"]["train"]
        per_epoch = math.ceil(max(split["src_tokens"], split.get("tgt_tokens", 0)) / train.tokens_per_step)
        steps = per_epoch * train.max_epochs
        lines.append(f"length: about {per_epoch:,} steps an epoch x {train.max_epochs} epochs")
    limits = [f"{train.max_steps:,} steps"] if train.max_steps else []
    limits += [f"{train.max_epochs} epochs"] if train.max_epochs else []
    limits += [f"{train.max_minutes:g} minutes"] if train.max_minutes else []
    lines.append(f"stops at the first of: {', '.join(limits)}")
    return lines, steps


def dry_run(job: JobConfig, say: Callable[[str], None] = print, timed_steps: int = 3) -> None:
    """Check and plan `job` without training or writing; print the plan and the estimate."""
    from cluster.ray_connection import connect
    from jobs.train.driver import run_name, validate, with_absolute_paths

    job = with_step_budget(with_absolute_paths(job))
    layout = RunLayout.of(job.cluster, run_name(job))
    plan, manifest = validate(job, layout)
    if manifest is not None:
        job = job.with_dataset(manifest)
        say(f"data: {manifest.uri}: prepared, verified ({manifest.data['splits']['train']['rows']:,} training rows)")
    else:
        rows = sum(d["rows"] for d in plan.described_inputs if d["split"] == "train")
        say(f"data: {job.data.dataset_uri}: not prepared yet; its inputs check out ({rows:,} training pairs before "
            "cleaning); the run would prepare it first")
        job = job.with_vocabulary(job.data.tokenizer.vocab_size)  # the size it asks SentencePiece for
    say(f"run {layout.name}: checkpoints and export in {layout.uri}")
    connect(job.cluster.address)
    for line in cluster_lines(job):
        say(line)
    shape = micro_batch_shape(job, manifest)
    lines, steps = plan_lines(job, shape, manifest)
    for line in lines:
        say(line)
    for line in _timed_lines(job, shape, steps, timed_steps):
        say(line)
    say("dry run: nothing was trained or written")


def _timed_lines(job: JobConfig, shape: Shape, steps: int | None, timed_steps: int) -> list[str]:
    """A few steps timed on one worker's resources, and the run's length at that rate."""
    import ray

    if job.cluster.use_gpu and not ray.cluster_resources().get("GPU"):
        return ["measured: nothing: the run trains on GPUs and this cluster has none to time a step on"]
    task = ray.remote(  # max_calls: the process group and DeepSpeed's state leave with the process
        num_cpus=job.cluster.cpus_per_worker, num_gpus=1 if job.cluster.use_gpu else 0, max_calls=1,
        runtime_env={"env_vars": worker_environment(job.cluster, uses_gpu=job.cluster.use_gpu)})(measure_steps)
    try:
        measured = ray.get(task.remote(job, shape, accumulation_steps(job, job.cluster.num_workers), timed_steps))
    except ray.exceptions.RayTaskError as error:
        if "OutOfMemoryError" in str(error) or "out of memory" in str(error):
            return [f"measured: one micro-batch of {job.stream.max_tokens:,} tokens does not fit in a worker's memory; "
                    "lower stream.max_tokens (the step keeps its size: train.tokens_per_step)"]
        raise
    memory = (f", peak {measured.peak_memory / 2**30:.1f} of {measured.device_memory / 2**30:.0f} GiB"
              if measured.device_memory else "")
    lines = [f"measured: {measured.steps} steps on one worker ({measured.device}, world size 1): "
             f"{measured.step_s:.3f} s a step, {measured.mfu:.0%} of its {job.train.precision} peak{memory}"]
    if steps is not None:
        lines.append(f"estimate: {duration(steps * measured.step_s)} for {steps:,} steps at that rate, plus the "
                     f"gradient exchange across {job.cluster.num_workers} workers, validation and checkpoints")
    return lines
