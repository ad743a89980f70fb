"""What DeepSpeed's ZeRO engine costs one rank's training step, against the bare loop, in one run.

`aiayn train` on one worker runs its step inside a DeepSpeed engine (ZeRO-2 by default), where
`bench/training_stack.py`'s bare loop steps the model with torch's Adam directly. Here both run in
this one process on the same token-budget batches of the prepared stream, taking turns:
- bare: `training_stack.bare_step` (the model, the label-smoothed loss, fused Adam, clipping);
- zero-S: training's own `build_engine` and `train_step` at `train.zero_stage=S`, world size 1
  (gloo), as a 1-worker run builds them.
Each round times every arm over the same `--steps` batches; medians over rounds; a ratio is the
bare loop's time over the arm's (below 1: the engine is slower). What ZeRO-1/2 add to a step by
design, on a rank with nothing to share: each gradient copied into a flat bucket and on into the
rank's fp32 partition, and the updated partition copied back into the model's weights (torch's
profiler puts 2-7x more time in those copies than the timed passes show, so none is reported).

    python bench/zero_single_rank.py --data data/multi30k-en-de --stages 0 2 --rounds 6
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch
from _provenance import provenance
from object_store import _single_process_distributed
from step_levers import _medians, _timed
from training_stack import bare_model, bare_step

from data_pipeline.config import StreamConfig
from data_pipeline.manifest import load_manifest
from data_pipeline.stream import ShardStream
from jobs.run.config import load_job_config
from jobs.train.cpu_allocator import keep_freed_memory
from jobs.train.engine import build_engine, train_step


def _engine_arm(stage: int, vocab_size: int, batches: list) -> Callable[[], None]:
    job = load_job_config(None, ["cluster.num_workers=1", f"train.zero_stage={stage}"])
    engine, scheduler = build_engine(job, job.model.replace(vocab_size=vocab_size), 1, load_universal=False)

    def run() -> None:
        for batch in batches:
            train_step(engine, [batch], float(batch.target_tokens), 1, job.model.label_smoothing)
            scheduler.step()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/multi30k-en-de", help="a prepared dataset")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--steps", type=int, default=10, help="batches per timed pass")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as a CPU worker's process is set up
    manifest = load_manifest(args.data)
    stream = ShardStream(manifest, "train", StreamConfig(max_tokens=args.max_tokens)).epoch_batches()
    batches = [batch for _, batch in zip(range(args.steps), stream)]

    model, optimizer = bare_model(manifest.vocab_size)

    def bare() -> None:
        for batch in batches:
            bare_step(model, optimizer, batch)

    _single_process_distributed()
    arms = {"bare": bare, **{f"zero-{stage}": _engine_arm(stage, manifest.vocab_size, batches) for stage in args.stages}}
    seconds = _medians({name: _timed(run, 1) for name, run in arms.items()}, args.rounds)
    print(json.dumps({
        "seconds_per_pass": {name: round(s, 3) for name, s in seconds.items()},
        "ratio_vs_bare": {name: round(seconds["bare"] / s, 3) for name, s in seconds.items() if name != "bare"},
        "target_tokens_per_pass": sum(batch.target_tokens for batch in batches),
        "config": vars(args), "torch_threads": torch.get_num_threads(), "provenance": provenance(),
    }, indent=2))


if __name__ == "__main__":
    main()
