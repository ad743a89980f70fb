"""A CPU worker's process keeps freed memory for its next step instead of faulting it in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jobs.run.config import load_job_config
from jobs.train.cpu_allocator import worker_environment

# A fresh process (the settings hold for a whole process) trains a small model in a thread, as Ray
# Train runs the training function, and reports the minor page faults of five steps after the heap
# has settled: the steps free and reallocate their activations, logits and gradients. The logits
# (1280 x 8000 floats, 41 MB) are over the largest threshold glibc ever serves from its heap by
# default, so there every step maps them afresh.
STEPS = """
import json, resource, sys, threading, torch
from jobs.train.cpu_allocator import keep_freed_memory
from transformer import build_model, preset
from transformer.loss import label_smoothed_loss
applied = keep_freed_memory() if sys.argv[1] == "mallopt" else None
faults = []
def train():
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=8000))
    optimizer = torch.optim.Adam(model.parameters())
    src, tgt = torch.randint(4, 8000, (64, 20)), torch.randint(4, 8000, (64, 21))
    for step in range(15):
        if step == 10:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss, _ = label_smoothed_loss(model(src, tgt[:, :-1]), tgt[:, 1:], 0.1, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=train)
thread.start()
thread.join()
print(json.dumps({"applied": applied, "faults": faults[0]}))
"""


def _five_steps(mode: str, overrides: tuple[str, ...] = ()) -> dict:
    """`environment`: what the driver gives Ray Train's workers for a job with `overrides`."""
    cluster = load_job_config(None, list(overrides)).cluster
    worker = worker_environment(cluster, uses_gpu=cluster.use_gpu) if mode == "environment" else {}
    environment = {**os.environ, **worker}
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120,
                          env=environment)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("mode", ["environment", "mallopt"])
def test_a_training_step_reuses_the_memory_the_last_one_freed(mode: str) -> None:
    """`environment`: as the driver starts Ray Train's CPU workers; `mallopt`: as the benchmarks
    set up their own process before its loop."""
    default, kept = _five_steps("default"), _five_steps(mode)
    logits_pages = 64 * 20 * 8000 * 4 // 4096  # one step's logits alone, faulted in again by default
    assert default["faults"] > 5 * logits_pages, default
    assert kept["faults"] < default["faults"] / 4, (kept, default)  # one late growth of the heap at most
    assert kept["applied"] is (True if mode == "mallopt" else None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_job_can_keep_glibcs_defaults() -> None:
    """`cluster.keep_freed_memory=false` gives CPU workers glibc's defaults back (memory before
    speed), and GPU workers never get the settings: their steps live on the device."""
    default = _five_steps("default")
    opted_out = _five_steps("environment", ("cluster.keep_freed_memory=false",))
    assert opted_out["faults"] > default["faults"] / 2, (opted_out, default)
    assert worker_environment(load_job_config(None, ["cluster.use_gpu=true"]).cluster, uses_gpu=True) == {}


# A 64 MB buffer, then a 48 MB one, allocated, filled and freed in turn: glibc maps each afresh by
# default; a process that keeps freed memory fills the second into pages it already has.
def second_buffer_faults() -> int:
    """Page faults of the second buffer."""
    import resource

    import torch

    faults = []
    for mib in (64, 48):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(mib * 2**18).fill_(1.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults[1]


SECOND_BUFFER = """
import argparse, sys
from jobs.cli import _inference_device
from tests.jobs.test_cpu_allocator import second_buffer_faults
if sys.argv[1] == "cli":
    assert _inference_device(argparse.Namespace(device="cpu")) == "cpu"
print(second_buffer_faults())
"""
PAGES = 48 * 2**20 // 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_translating_on_the_cpu_keeps_freed_memory() -> None:
    """`aiayn evaluate|translate --device cpu` set the process up before decoding, whose steps
    free and reallocate their caches' copies and logits."""
    def second_buffer(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", SECOND_BUFFER, mode], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    assert second_buffer("default") > PAGES / 2
    assert second_buffer("cli") < PAGES / 8


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_background_bleu_task_keeps_freed_memory(local_ray) -> None:
    """The valid-BLEU task runs with the options training gives Ray Train's validation (a process
    of its own, set up at its start) unless the job opts out, and on the CPU even when training
    is on GPUs."""
    from jobs.checkpoint import ResumePlan
    from jobs.run.layout import RunLayout
    from jobs.train.checkpoint_bleu import validation_config
    from jobs.train.launch import Launch

    def faults_in_the_task(*overrides: str) -> int:
        job = load_job_config(None, ["tracking.uri=http://127.0.0.1:1", *overrides])
        launch = Launch(job, "", job.tracking.uri, "", RunLayout("run", "/nowhere"), ResumePlan(), "", "", "", 0.0)
        options = validation_config(launch).ray_remote_kwargs
        return local_ray.get(local_ray.remote(second_buffer_faults).options(**options).remote(), timeout=120)

    assert faults_in_the_task("cluster.use_gpu=true") < PAGES / 8
    assert faults_in_the_task("cluster.keep_freed_memory=false") > PAGES / 2
