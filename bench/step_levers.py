"""What the training step's own loss kernel buys, against what torch offers for the same job,
measured in one run (arms taking turns, medians over rounds, ratios above 1: ours faster):

- the label-smoothed loss, forward and backward, against `F.cross_entropy(..., label_smoothing=eps)`
  (what a user would write; it gives no NLL beside the loss), alone at the logits' shapes of a
  token-budget batch;
- a whole training step of a preset with ours and with torch's loss.

(A CPU dropout mask drawn as `rand >= p` was measured here too, 1.34x `F.dropout` alone and 1.03x a
step, bench/results/step_levers_cpu_2026-12-03.json; it was taken out again: the chained-resize
test's valid loss moved 17% with its random stream, and that is not understood yet.)

    python bench/step_levers.py --preset small --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from _provenance import provenance
from model_throughput import _step_fn
from transformer import build_model, preset
from transformer.loss import label_smoothed_loss


def torch_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, epsilon: float, pad_id: int):
    return (F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=pad_id,
                            label_smoothing=epsilon, reduction="sum"),)


def _forward_backward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        leaf = x.detach().requires_grad_()
        out = fn(leaf)
        out.backward(torch.ones_like(out))
    return run


def _median_seconds(runs: dict[str, Callable[[], None]], rounds: int, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            times[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(values) for name, values in times.items()}


def _compare(seconds: dict[str, float], unit: float = 1e3) -> dict:
    ours = seconds["ours"]
    return {**{f"{name}_{'ms' if unit == 1e3 else 's'}": round(s * unit, 1 if unit == 1e3 else 3)
               for name, s in seconds.items()},
            **{f"ratio_ours_vs_{name}": round(s / ours, 3) for name, s in seconds.items() if name != "ours"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=int, default=2560, help="target tokens per batch (rows of the logits)")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[8000, 37000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    config = preset(args.preset, vocab_size=args.vocab_sizes[0])
    result: dict = {"config": vars(args), "provenance": provenance(), "loss_alone": {}}

    for vocab in args.vocab_sizes:
        logits = torch.randn(args.tokens, vocab, generator=generator)
        targets = torch.randint(0, vocab, (args.tokens,), generator=generator)
        result["loss_alone"][f"{args.tokens}x{vocab}"] = _compare(_median_seconds({
            "ours": _forward_backward(lambda x: label_smoothed_loss(x, targets, 0.1, 0)[0], logits),
            "torch_cross_entropy": _forward_backward(lambda x: torch_cross_entropy(x, targets, 0.1, 0)[0], logits),
        }, args.rounds, 3))

    length, rows = 20, args.tokens // 20
    src = torch.randint(4, config.vocab_size, (rows, length), generator=generator)
    tgt = torch.randint(4, config.vocab_size, (rows, length + 1), generator=generator)

    def step(loss_fn: Callable) -> Callable[[], None]:
        torch.manual_seed(0)
        return _step_fn(build_model(config).train(), config, (src, tgt[:, :-1], tgt[:, 1:]), torch.float32, loss_fn)

    result["training_step"] = {"preset": args.preset, "vocab_size": config.vocab_size, "batch": [rows, length],
                               **_compare(_median_seconds({
                                   "ours": step(label_smoothed_loss),
                                   "torch_cross_entropy": step(torch_cross_entropy),
                               }, args.rounds, 2), unit=1.0)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
