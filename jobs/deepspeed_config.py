"""The DeepSpeed JSON, generated from the typed job config (never kept by hand beside it)."""

from __future__ import annotations

from jobs.config import JobConfig, deep_merge


def deepspeed_config(job: JobConfig, world_size: int, *, load_universal: bool = False) -> dict:
    """Batches are token budgets, so DeepSpeed's sample-count batch size is nominal (1 per micro
    batch); the loss is normalised by the global token count in the training loop instead.
    `load_universal`: the engine will load a universal checkpoint (resuming at another world size)."""
    train = job.train
    config: dict = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.grad_accum * world_size,
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
        # The paper's Adam (§5.3). With the noam schedule the LambdaLR factor is the whole learning
        # rate, so the base lr is 1.
        "optimizer": {"type": "Adam", "params": {
            "lr": job.optim.lr if job.optim.schedule == "inverse_sqrt" else 1.0,
            "betas": list(job.optim.betas), "eps": job.optim.eps,
            "weight_decay": job.optim.weight_decay, "torch_adam": True, "adam_w_mode": False,
        }},
    }
    if train.zero_stage == 3:
        config["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=False)
    return deep_merge(config, job.deepspeed)
