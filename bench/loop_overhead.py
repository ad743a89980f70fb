"""What the watchdog's heartbeat and the time ledger cost a training step, in one run.

The loop's bookkeeping per step is one `Heartbeat.beat` (rank 0 sends every step to the
`ProgressMonitor` actor: the worst case) and seven `GoodputLedger.charge` calls. Here the same
optimizer step of our Transformer runs in interleaved rounds without and with that bookkeeping
(a real monitor actor on a local Ray), and the per-call cost is timed alone as well. Printed:
the step-time ratio with / without (goal <= 1.01) and the bookkeeping's microseconds per step,
so that the share can be read against any step time (a GPU's is shorter).

    python bench/loop_overhead.py --preset small --tokens 2000 --rounds 5 --steps 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _optimizer import paper_adam

from transformer import build_model, preset
from transformer.loss import label_smoothed_loss

CHARGES = ("data_wait", "training", "tracking", "validation", "tracking", "checkpoint", "training")


def _step(model, optimizer, src, tgt) -> None:
    logits = model(src, tgt[:, :-1])
    loss, _ = label_smoothed_loss(logits, tgt[:, 1:], 0.1, model.config.pad_id)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _bookkeeping(heartbeat, ledger, step: int) -> None:
    from jobs.train.watchdog import STEP

    heartbeat.beat(step, STEP)
    for category in CHARGES:
        ledger.charge(category)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=int, default=2000, help="target tokens per step")
    parser.add_argument("--length", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and arm")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import ray

    from jobs.report.goodput import GoodputLedger
    from jobs.train.watchdog import Heartbeat, ProgressMonitor

    torch.set_num_threads(args.threads)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        monitor = ray.remote(num_cpus=0)(ProgressMonitor).remote()
        heartbeat, ledger = Heartbeat(monitor, rank=0), GoodputLedger()
        config = preset(args.preset, vocab_size=8000, dropout=0.1)
        model = build_model(config).train()
        optimizer = paper_adam(model.parameters(), lr=1e-4)
        rows = max(args.tokens // args.length, 1)
        src = torch.randint(4, config.vocab_size, (rows, args.length))
        tgt = torch.randint(4, config.vocab_size, (rows, args.length + 1))
        _step(model, optimizer, src, tgt)  # warm-up
        seconds: dict[str, list[float]] = {"without": [], "with": []}
        step = 0
        for _ in range(args.rounds):
            for arm in ("without", "with"):
                started = time.perf_counter()
                for _ in range(args.steps):
                    step += 1
                    _step(model, optimizer, src, tgt)
                    if arm == "with":
                        _bookkeeping(heartbeat, ledger, step)
                seconds[arm].append((time.perf_counter() - started) / args.steps)
        calls = 2000
        started = time.perf_counter()
        for i in range(calls):
            _bookkeeping(heartbeat, ledger, step + i)
        per_step_us = (time.perf_counter() - started) / calls * 1e6
        ray.get(monitor.snapshot.remote())  # every beat was taken
    finally:
        ray.shutdown()
    without, with_ = statistics.median(seconds["without"]), statistics.median(seconds["with"])
    print(json.dumps({
        "step_time_ratio_with_vs_without": round(with_ / without, 4),
        "bookkeeping_us_per_step": round(per_step_us, 1),
        "bookkeeping_share_of_step": round(per_step_us / 1e6 / without, 5),
        "median_step_s": {"without": round(without, 4), "with": round(with_, 4)},
        "rounds": args.rounds, "steps_per_round": args.steps, "preset": args.preset, "tokens": args.tokens,
        "threads": args.threads,
    }, indent=2))


if __name__ == "__main__":
    main()
