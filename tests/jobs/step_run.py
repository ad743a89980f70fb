"""A few real optimizer steps through `jobs.train.engine` (one process, a gloo group, DeepSpeed's CPU
accelerator), printed as JSON. Tests run it as a subprocess so that no process group outlives it:

    python -m tests.jobs.step_run STEPS KEY=VALUE...
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

VOCAB = 64


def padded_batches(count: int, seed: int) -> list:
    """Batches of random sentences as the stream makes them: the first has no source padding (so
    attention runs without a mask), the others have uneven lengths."""
    from data_pipeline.batching import Window, collate
    from data_pipeline.tokenizer import EOS_ID

    rng = np.random.default_rng(seed)
    batches = []
    for index in range(count):
        rows = 6
        src = [np.append(rng.integers(4, VOCAB, 8 if index == 0 else rng.integers(3, 12)), EOS_ID)
               for _ in range(rows)]
        tgt = [np.append(rng.integers(4, VOCAB, rng.integers(3, 12)), EOS_ID) for _ in range(rows)]
        offsets = lambda parts: np.concatenate([[0], np.cumsum([len(p) for p in parts])])  # noqa: E731
        window = Window(np.concatenate(src), offsets(src), np.concatenate(tgt), offsets(tgt))
        batches.append(collate(window, np.arange(rows)))
    return batches


def main(steps: int, overrides: list[str]) -> None:
    import deepspeed
    import torch

    from cluster.services import free_port
    from jobs.run.config import load_job_config
    from jobs.train.engine import build_engine, train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    job = load_job_config(None, ["model.preset=tiny", "model.dropout=0", "optim.warmup_steps=4", "optim.lr=0.003",
                                 "stream.max_tokens=200", "cluster.num_workers=1", *overrides])
    engine, _ = build_engine(job, job.model.replace(vocab_size=VOCAB), 1, load_universal=False)
    losses, applied = [], []
    for batch in padded_batches(steps, seed=7):
        loss = train_step(engine, [batch], batch.target_tokens, 1, job.model.label_smoothing).loss
        losses.append(loss / batch.target_tokens)
        applied.append(engine.was_step_applied())
    weights_finite = None if job.train.zero_stage == 3 else all(  # ZeRO-3's are partitioned away
        bool(torch.isfinite(p).all()) for p in engine.module.parameters())
    adam = getattr(engine.optimizer, "optimizer", engine.optimizer)  # torch's, inside ZeRO's wrapper if any
    print(json.dumps({"losses": losses, "applied": applied, "weights_finite": weights_finite,
                      "dtype": str(next(engine.module.parameters()).dtype), "compiled": engine.is_compiled,
                      "fused_adam": bool(adam.defaults.get("fused"))}))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
