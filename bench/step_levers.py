"""What the training step's own loss and dropout kernels and its optimizer choice buy, against what
torch offers by default for the same job, measured in one run (arms taking turns, medians over
rounds, ratios above 1: ours faster):

- the label-smoothed loss, forward and backward, against `F.cross_entropy(..., label_smoothing=eps)`
  (what a user would write; it gives no NLL beside the loss), alone at the logits' shapes of a
  token-budget batch, eager and compiled (`ours_compiled`: the path training takes with a
  compiled model);
- dropout's CPU path (four 16-bit mask draws per 64-bit random number) against `F.dropout` (one
  `bernoulli_` draw per element), forward and backward, alone at one sub-layer output's shape;
- a whole training step of a preset with ours, with torch's loss, and with `F.dropout`;
- the optimizer step: torch's fused Adam (ours) against torch's default Adam (on a CPU, one pass
  over the weights per operation), over the preset's weights as the benchmarks' loops hold them,
  and as `engine.step()` of a real single-process DeepSpeed ZeRO-2 engine built by training's
  own code, whose Adam updates one flat fp32 partition.

(A first CPU dropout mask, drawn as `rand >= p`, one draw per element as `bernoulli_`, gave 1.34x
`F.dropout` alone and 1.03x a step, bench/results/step_levers_cpu_2026-12-03.json.)

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
from _provenance import provenance
from model_throughput import _step_fn
from object_store import _single_process_distributed

import transformer.layers
import transformer.model
from transformer import ModelConfig, build_model, preset
from transformer.elementwise import dropout
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


def _timed(run: Callable[[], None], repeats: int) -> Callable[[], float]:
    """A measurement: seconds per call of `run`, over `repeats` calls."""
    def measure() -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        return (time.perf_counter() - start) / repeats
    return measure


def _medians(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Each measurement once to warm up, then `rounds` rounds of all of them in turn; medians."""
    times: dict[str, list[float]] = {name: [] for name in measures}
    for measure in measures.values():
        measure()
    for _ in range(rounds):
        for name, measure in measures.items():
            times[name].append(measure())
    return {name: statistics.median(values) for name, values in times.items()}


def _compare(seconds: dict[str, float], unit: float = 1e3) -> dict:
    ours = seconds["ours"]
    return {**{f"{name}_{'ms' if unit == 1e3 else 's'}": round(s * unit, 1 if unit == 1e3 else 3)
               for name, s in seconds.items()},
            **{f"ratio_ours_vs_{name}": round(s / ours, 3) for name, s in seconds.items() if name != "ours"}}


def _adam_step(config: ModelConfig, batch: tuple[torch.Tensor, ...], *, fused: bool,
               zero2: bool) -> Callable[[], float]:
    """A measurement of one optimizer step alone, torch's fused Adam or its default: on the
    model's own tensors with fixed gradients, or `engine.step()` of a DeepSpeed ZeRO-2 engine built
    from training's config, after an untimed forward and backward (it needs fresh gradients)."""
    torch.manual_seed(0)
    model = build_model(config)
    if not zero2:
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        return _timed(torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=fused).step, 3)

    import deepspeed

    from jobs.run.config import load_job_config
    from jobs.train.deepspeed_config import deepspeed_config

    job = load_job_config(None, ["cluster.num_workers=1", f"deepspeed.optimizer.params.fused={str(fused).lower()}"])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=deepspeed_config(job, 1))
    src, tgt_in, tgt_out = batch
    at = (tgt_out != config.pad_id).flatten().nonzero().squeeze(1)

    def measure() -> float:
        loss, *_ = label_smoothed_loss(engine(src, tgt_in, at, src_padded=False), tgt_out.flatten()[at],
                                       config.label_smoothing, config.pad_id)
        engine.backward(loss / len(at))
        start = time.perf_counter()
        engine.step()
        return time.perf_counter() - start
    return measure


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
        losses = {"ours": lambda x: label_smoothed_loss(x, targets, 0.1, 0)[0],
                  "ours_compiled": lambda x: label_smoothed_loss(x, targets, 0.1, 0, compiled=True)[0],
                  "torch_cross_entropy": lambda x: torch_cross_entropy(x, targets, 0.1, 0)[0]}
        result["loss_alone"][f"{args.tokens}x{vocab}"] = _compare(_medians(
            {name: _timed(_forward_backward(loss, logits), 3) for name, loss in losses.items()}, args.rounds))

    length, rows = 20, args.tokens // 20
    src = torch.randint(4, config.vocab_size, (rows, length), generator=generator)
    tgt = torch.randint(4, config.vocab_size, (rows, length + 1), generator=generator)

    batch = (src, tgt[:, :-1], tgt[:, 1:])
    hidden = torch.randn(rows, length, config.d_model, generator=generator)
    result["dropout_alone"] = {"shape": list(hidden.shape), "p": config.dropout, **_compare(_medians({
        "ours": _timed(_forward_backward(lambda x: dropout(x, config.dropout, True), hidden), 3),
        "F.dropout": _timed(_forward_backward(lambda x: F.dropout(x, config.dropout, True), hidden), 3),
    }, args.rounds))}

    def step(loss_fn: Callable, torch_dropout: bool = False) -> Callable[[], float]:
        torch.manual_seed(0)
        run = _step_fn(build_model(config).train(), config, batch, torch.float32, loss_fn)

        def arm() -> None:
            with _torch_dropout() if torch_dropout else contextlib.nullcontext():
                run()
        return _timed(arm, 2)

    result["training_step"] = {"preset": args.preset, "vocab_size": config.vocab_size, "batch": [rows, length],
                               **_compare(_medians({
                                   "ours": step(label_smoothed_loss),
                                   "torch_cross_entropy": step(torch_cross_entropy),
                                   "F.dropout": step(label_smoothed_loss, torch_dropout=True),
                                   "both_torch": step(torch_cross_entropy, torch_dropout=True),
                               }, args.rounds), unit=1.0)}
    _single_process_distributed()  # for the ZeRO-2 engines
    result["optimizer_step"] = {
        where: _compare(_medians({"ours": _adam_step(config, batch, fused=True, zero2=zero2),
                                  "torch_default": _adam_step(config, batch, fused=False, zero2=zero2)}, args.rounds))
        for where, zero2 in (("model_tensors", False), ("zero2_engine", True))}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
