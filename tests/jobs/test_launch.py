"""The driver-to-worker contract: one typed value that arrives as it was sent."""

from __future__ import annotations

import dataclasses

import pytest
import ray.cloudpickle as cloudpickle

from jobs.checkpoint import ResumePlan
from jobs.run.config import load_job_config
from jobs.run.layout import RunLayout
from jobs.train.launch import Launch


def _launch() -> Launch:
    job = load_job_config(None, ["train.max_steps=7", "cluster.num_workers=3", "model.preset=tiny"])
    plan = ResumePlan(checkpoint="/runs/r/checkpoint_step00000005", step=5, saved_world_size=2, world_size=3,
                      zero_stage=2)
    return Launch(job, "/data/multi30k/versions/abc", "http://127.0.0.1:5000", "run-id", RunLayout("r", "/runs", "/scratch"),
                  plan, "/runs/r/lease.json", "host/123/abc", "launch-id", 1234.5, signing_key=b"not a real ref")


def test_a_launch_arrives_as_it_was_sent() -> None:
    """Ray pickles `train_loop_config` (and the validation task's arguments) to the workers: every
    field, the job's nested config included, must come back equal and typed."""
    sent = _launch()
    received = Launch.of(cloudpickle.loads(cloudpickle.dumps(sent.loop_config())))
    assert received == sent
    assert received.job.train.max_steps == 7 and received.job.model.d_model == sent.job.model.d_model
    assert received.resume_plan.resized and received.layout.export_uri == "/runs/r/export"
    fields = {field.name for field in dataclasses.fields(Launch)}
    assert {"job", "dataset_uri", "resume_plan", "layout", "lease_uri", "signing_key", "relay", "monitor"} <= fields


def test_a_launch_cannot_be_changed_on_the_way() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        _launch().run_id = "another"  # type: ignore[misc]
