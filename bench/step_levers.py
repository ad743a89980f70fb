"""What each of the training step's own kernels buys, against what torch offers for the same job,
measured in one run (arms taking turns, medians over rounds, ratios above 1: ours faster):

- the label-smoothed loss, forward and backward, against `F.cross_entropy(..., label_smoothing=eps)`
  (what a user would write; it gives no NLL beside the loss), alone at the logits' shapes of a
  token-budget batch;
- dropout's CPU path (mask drawn as `rand >= p`) against `F.dropout` (mask by `bernoulli_`), alone
  at one sub-layer output's shape;
- a whole training step of a preset with ours, with torch's loss, and with `F.dropout`.

    python bench/step_levers.py --preset small --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

import transformer.layers
import transformer.model
from _provenance import provenance
from model_throughput import _step_fn
from transformer import build_model, preset
from transformer.dropout import dropout
from transformer.loss import label_smoothed_loss


def torch_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, epsilon: float, pad_id: int):
    return (F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=pad_id,
                            label_smoothing=epsilon, reduction="sum"),)


@contextlib.contextmanager
def _torch_dropout() -> Iterator[None]:
    """The model's dropouts through `F.dropout` for the duration (the arm without our CPU path)."""
    saved = transformer.model.dropout, transformer.layers.dropout
    transformer.model.dropout = transformer.layers.dropout = F.dropout
    try:
        yield
    finally:
        transformer.model.dropout, transformer.layers.dropout = saved


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

    hidden = torch.randn(args.tokens, config.d_model, generator=generator)
    result["dropout_alone"] = {"shape": list(hidden.shape), "p": config.dropout, **_compare(_median_seconds({
        "ours": _forward_backward(lambda x: dropout(x, config.dropout, True), hidden),
        "F.dropout": _forward_backward(lambda x: F.dropout(x, config.dropout, True), hidden),
    }, args.rounds, 10))}

    length, rows = 20, args.tokens // 20
    src = torch.randint(4, config.vocab_size, (rows, length), generator=generator)
    tgt = torch.randint(4, config.vocab_size, (rows, length + 1), generator=generator)

    def step(loss_fn: Callable, torch_dropout: bool = False) -> Callable[[], None]:
        torch.manual_seed(0)
        run = _step_fn(build_model(config).train(), config, (src, tgt[:, :-1], tgt[:, 1:]), torch.float32, loss_fn)

        def arm() -> None:
            with _torch_dropout() if torch_dropout else contextlib.nullcontext():
                run()
        return arm

    result["training_step"] = {"preset": args.preset, "vocab_size": config.vocab_size, "batch": [rows, length],
                               **_compare(_median_seconds({
                                   "ours": step(label_smoothed_loss),
                                   "torch_cross_entropy": step(torch_cross_entropy),
                                   "F.dropout": step(label_smoothed_loss, torch_dropout=True),
                                   "both_torch": step(torch_cross_entropy, torch_dropout=True),
                               }, args.rounds, 2), unit=1.0)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
