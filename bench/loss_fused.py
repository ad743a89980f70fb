"""The label-smoothed loss, forward and backward, against torch's own: `F.cross_entropy(...,
label_smoothing=eps)`, what a user would write (it gives no NLL beside the loss). Alone at the
logits' shapes of a token-budget batch, and inside a whole training step of a preset; one run,
models and losses taking turns, medians over rounds, printed as ratios (above 1: ours faster).

    python bench/loss_fused.py --preset small --rounds 5
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


LOSSES: dict[str, Callable] = {"ours": label_smoothed_loss, "torch cross_entropy": torch_cross_entropy}


def _loss_alone(loss_fn: Callable, logits: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        leaf = logits.detach().requires_grad_()
        loss_fn(leaf, targets, 0.1, 0)[0].backward()
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
    result: dict = {"config": vars(args), "provenance": provenance(), "loss_alone": {}, "training_step": {}}

    for vocab in args.vocab_sizes:
        logits = torch.randn(args.tokens, vocab, generator=generator)
        targets = torch.randint(0, vocab, (args.tokens,), generator=generator)
        seconds = _median_seconds({name: _loss_alone(fn, logits, targets) for name, fn in LOSSES.items()},
                                  args.rounds, 3)
        result["loss_alone"][f"{args.tokens}x{vocab}"] = {
            **{f"{name}_ms": round(s * 1e3, 1) for name, s in seconds.items()},
            "ratio_ours_vs_torch": round(seconds["torch cross_entropy"] / seconds["ours"], 3)}

    config = preset(args.preset, vocab_size=args.vocab_sizes[0])
    length, rows = 20, args.tokens // 20
    src = torch.randint(4, config.vocab_size, (rows, length), generator=generator)
    tgt = torch.randint(4, config.vocab_size, (rows, length + 1), generator=generator)
    steps = {}
    for name, fn in LOSSES.items():
        torch.manual_seed(0)
        steps[name] = _step_fn(build_model(config).train(), config, (src, tgt[:, :-1], tgt[:, 1:]), torch.float32, fn)
    seconds = _median_seconds(steps, args.rounds, 2)
    result["training_step"] = {
        "preset": args.preset, "vocab_size": config.vocab_size, "batch": [rows, length],
        **{f"{name}_s": round(s, 3) for name, s in seconds.items()},
        "ratio_ours_vs_torch": round(seconds["torch cross_entropy"] / seconds["ours"], 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
