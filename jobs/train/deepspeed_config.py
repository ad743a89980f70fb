"""The DeepSpeed JSON, generated from the typed job config (never kept by hand beside it), and
the batch arithmetic it rests on: how many micro-batches make one optimizer step at a world size."""

from __future__ import annotations

import dataclasses

from data_pipeline.batching import tokens_per_step
from jobs.run.config import JobConfig, deep_merge


def with_step_budget(job: JobConfig, saved_config: dict | None = None) -> JobConfig:
    """`train.tokens_per_step` made explicit: the given value, else the one a resumed run was
    started with (so a resize keeps the step size), else num_workers x stream.max_tokens."""
    if job.train.tokens_per_step:
        return job
    saved = (saved_config or {}).get("train", {}).get("tokens_per_step", 0)
    budget = saved or tokens_per_step(job.cluster.num_workers, job.stream.max_tokens)
    return dataclasses.replace(job, train=dataclasses.replace(job.train, tokens_per_step=budget))


def accumulation_steps(job: JobConfig, world_size: int) -> int:
    """Micro-batches per worker per optimizer step, so that world_size x this x stream.max_tokens
    is as close as it gets to train.tokens_per_step (at least one)."""
    budget = job.train.tokens_per_step or tokens_per_step(job.cluster.num_workers, job.stream.max_tokens)
    return max(1, round(budget / (world_size * job.stream.max_tokens)))


def deepspeed_config(job: JobConfig, world_size: int, *, load_universal: bool = False) -> dict:
    """Batches are token budgets, so DeepSpeed's sample-count batch size is nominal (1 per micro
    batch); the loss is normalised by the global token count in the training loop instead.
    `load_universal`: the engine will load a universal checkpoint (resuming at another world size)."""
    train = job.train
    accumulation = accumulation_steps(job, world_size)
    config: dict = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": accumulation * world_size,
        "gradient_clipping": job.optim.clip_norm,
        "zero_optimization": {
            "stage": train.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": False,  # gloo on CPU gains nothing and loses determinism
            "reduce_bucket_size": 5e7,
            "allgather_bucket_size": 5e7,
        },
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # we report metrics ourselves
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
        # The paper's Adam (§5.3), torch's fused kernel on every device: on a CPU it updates ZeRO's
        # flat fp32 partition in one pass instead of one per operation (a ZeRO-2 engine's step
        # at `small` 20 ms against 31, bench/step_levers.py, bench/results/). The base lr is
        # optim.lr whatever the schedule, which is a factor of it (jobs.train.engine.lr_factor).
        "optimizer": {"type": "Adam", "params": {
            "lr": job.optim.lr,
            "betas": list(job.optim.betas), "eps": job.optim.eps,
            "weight_decay": job.optim.weight_decay, "torch_adam": True, "adam_w_mode": False, "fused": True,
        }},
    }
    if train.zero_stage == 3:
        config["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=False)
    return deep_merge(config, job.deepspeed)
