"""The rules of resuming and retention that need no checkpoint on disk: which config changes a resume
accepts, where a worker group resumes from, which checkpoints nobody else would delete."""

from __future__ import annotations

import pytest

from data_pipeline.errors import InputError
from jobs import checkpoint as ckpt
from jobs.checkpoint import CheckpointError, ResumePlan, attempt_source, check_compatible, untracked
from jobs.run.config import load_job_config, public_config


def _config(*overrides: str) -> dict:
    return public_config(load_job_config(None, list(overrides)))


@pytest.mark.parametrize("override", [
    "train.max_steps=900", "train.log_every=7", "train.checkpoint_every_steps=20", "cluster.num_workers=5",
    "tracking.experiment=other", "model.dropout=0.3", "stream.prefetch_windows=3", "train.tokens_per_step=8192",
])
def test_settings_that_may_change_on_resume(override: str) -> None:
    check_compatible(_config(), _config(override), "ckpt")


@pytest.mark.parametrize("override, key", [
    ("model.d_model=128", "model.d_model"), ("model.n_layers=4", "model.n_layers"),
    ("stream.seed=9", "stream.seed"), ("stream.max_tokens=4096", "stream.max_tokens"),
    ("stream.window_rows=2048", "stream.window_rows"), ("optim.lr=0.01", "optim.lr"),
    ("train.zero_stage=3", "train.zero_stage"), ("deepspeed={zero_optimization: {reduce_bucket_size: 10}}",
                                                 "deepspeed.zero_optimization"),
])
def test_settings_fixed_on_resume_are_refused_with_the_key(override: str, key: str) -> None:
    with pytest.raises(InputError) as error:
        check_compatible(_config(), _config(override), "ckpt")
    message = str(error.value)
    assert message.startswith(key) and "\n" not in message and "--name" in message


def test_a_checkpoint_written_before_a_model_key_existed_resumes_as_it_was_built() -> None:
    """A checkpoint's config without `model.attention_bias` was written by a model with attention
    biases: resuming it needs them, and says so; asking for them resumes."""
    saved = _config()
    del saved["model"]["attention_bias"]
    with pytest.raises(InputError, match=r"^model.attention_bias: ckpt was written with True, .* set model.attention_bias=True"):
        check_compatible(saved, _config(), "ckpt")
    check_compatible(saved, _config("model.attention_bias=true"), "ckpt")


def test_a_checkpoint_is_resharded_only_at_another_world_size_under_zero_1_to_3() -> None:
    """What the worker asks before loading (`reshard_of`), and what the driver's plan says."""
    assert ckpt.reshard_of(ckpt.JobState(world_size=1, zero_stage=2), 3)
    assert not ckpt.reshard_of(ckpt.JobState(world_size=2, zero_stage=2), 2)
    assert not ckpt.reshard_of(ckpt.JobState(world_size=1, zero_stage=0), 3)  # stage 0's files hold it whole
    fresh = ResumePlan(world_size=2, zero_stage=2)
    assert not fresh.resized and "fresh" in fresh.describe()
    same = ResumePlan("s3://b/run/checkpoint_step00000040", 40, 2, 2, 2)
    assert not same.resized and "workers" not in same.describe()
    grow = ResumePlan("s3://b/run/checkpoint_step00000040", 40, 1, 3, 2)
    assert grow.resized and "1 -> 3 workers" in grow.describe() and "universal format" in grow.describe()
    stage0 = ResumePlan("s3://b/run/checkpoint_step00000040", 40, 1, 3, 0)
    assert stage0.resized and "as saved" in stage0.describe()


def test_an_attempt_loads_the_newer_of_the_plan_and_ray_trains_registered_checkpoint() -> None:
    plan = ResumePlan("/runs/r/checkpoint_step00000015", 15, 2, 2, 2)
    # The last run's upload of step 15 finished after Ray Train last registered (step 10).
    assert attempt_source(plan, "/runs/r/checkpoint_step00000010") == plan.checkpoint
    # A restart inside this run, once it has registered a later checkpoint of its own.
    assert attempt_source(plan, "bucket/runs/r/checkpoint_step00000020") == "bucket/runs/r/checkpoint_step00000020"
    assert attempt_source(plan, None) == plan.checkpoint
    assert attempt_source(ResumePlan(world_size=2, zero_stage=2), None) is None
    with pytest.raises(CheckpointError):
        attempt_source(plan, "/runs/r/not-a-checkpoint")


def test_checkpoints_ray_train_never_registered_are_deleted_except_the_newest() -> None:
    runs = "s3://bucket/runs/r"
    complete = [f"{runs}/checkpoint_step{s:08d}" for s in (10, 15, 20, 30)]
    # 15 finished uploading after the first driver was gone: the rerun resumed from it, Ray Train never knew it
    assert untracked(complete, {"checkpoint_step00000010", "checkpoint_step00000020", "checkpoint_step00000030"}) \
        == [f"{runs}/checkpoint_step00000015"]
    # the newest is never deleted (a resume needs it), nor anything when Ray Train's list is unknown
    assert untracked(complete, {"checkpoint_step00000010"}) == complete[1:3]
    assert untracked(complete, set()) == []
