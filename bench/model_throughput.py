"""Training tokens/s of our Transformer against torch.nn.Transformer (and MarianMTModel if installed).

Same sizes, same batch, same optimizer (the paper's Adam), same label-smoothed loss (compiled with
the models under --compile, as training compiles it with the model), same machine, one run: the
models take turns, and each figure is the median over rounds so that machine noise hits all of
them alike. Printed as ratios to torch.nn.Transformer.

The step's share in its own matrix multiplies: the GEMMs one step of the model as trained runs
(forward and backward, recorded by the profiler with their shapes) are replayed alone in the same
rounds; `share_of_step_in_its_gemms` is its tokens/s over theirs (1.0: nothing but GEMMs).

Dropout is matched: torch.nn.Transformer(dropout=p) also drops attention probabilities and the FFN
hidden layer, so `aiayn` here sets `attention_dropout` and `activation_dropout` to p as well (the
same work, and both off any dropout-free fast path alike); `aiayn (residual dropout only)` is the
model as the recipes train it. Under --compile, `aiayn (residual dropout only), its loss not
compiled` is that compiled model with the eager loss: what compiling the loss buys.

    python bench/model_throughput.py --preset small            # CPU, the ANCHORS.md size
    python bench/model_throughput.py --preset small --compile  # every model torch.compile'd
    python bench/model_throughput.py --preset base --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from typing import Callable

import torch
from _optimizer import paper_adam
from _provenance import provenance
from torch import nn

from jobs.train.cpu_allocator import keep_freed_memory
from transformer import ModelConfig, build_model, preset
from transformer.flops import training_flops_per_token
from transformer.loss import label_smoothed_loss


class TorchTransformerSeq2Seq(nn.Module):
    """torch.nn.Transformer with the same embeddings, positions and tied output layer as ours."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        ours = build_model(config)  # borrow the embedding/positional modules so only the core differs
        self.src_embed, self.tgt_embed, self.output = ours.src_embed, ours.tgt_embed, ours.output
        self.core = nn.Transformer(
            config.d_model, config.n_heads, config.n_layers, config.decoder_layers, config.d_ff,
            dropout=config.dropout, batch_first=True, norm_first=config.norm == "pre",
        )
        self.pad_id = config.pad_id

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, logits_at: torch.Tensor | None = None,
                src_padded: bool = True):
        length = tgt_in.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=src.device)
        src_pad = (src == self.pad_id) if src_padded else None  # no mask without padding, as ours
        hidden = self.core(
            self.src_embed(src), self.tgt_embed(tgt_in), tgt_mask=mask, tgt_is_causal=True,
            src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad,
        )
        return self.output(hidden, logits_at)


def _marian(config: ModelConfig) -> nn.Module | None:
    try:
        from transformers import MarianConfig, MarianMTModel
    except ImportError:
        return None
    marian = MarianMTModel(MarianConfig(
        vocab_size=config.vocab_size, d_model=config.d_model, encoder_layers=config.n_layers,
        decoder_layers=config.decoder_layers, encoder_attention_heads=config.n_heads,
        decoder_attention_heads=config.n_heads, encoder_ffn_dim=config.d_ff, decoder_ffn_dim=config.d_ff,
        dropout=config.dropout, activation_function="relu", pad_token_id=config.pad_id,
        decoder_start_token_id=config.bos_id, max_position_embeddings=config.max_positions,
    ))

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = marian

        def forward(self, src, tgt_in, logits_at=None, src_padded=True):
            mask = (src != config.pad_id) if src_padded else None
            logits = self.inner(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in).logits
            return logits if logits_at is None else logits.flatten(0, 1).index_select(0, logits_at)

    return Wrapped()


def _step_fn(model: nn.Module, config: ModelConfig, batch, dtype: torch.dtype,
             loss_fn: Callable = label_smoothed_loss) -> Callable[[], None]:
    """One training step: forward, `loss_fn` (logits, targets, epsilon, pad id -> summed loss, ...),
    backward, the paper's Adam."""
    optimizer = paper_adam(model.parameters(), lr=1e-4)
    src, tgt_in, tgt_out = batch
    at = (tgt_out != config.pad_id).flatten().nonzero().squeeze(1)
    targets = tgt_out.flatten()[at]
    padded = bool((src == config.pad_id).any())  # known on the host, as the stream knows it
    autocast = torch.autocast(src.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            logits = model(src, tgt_in, at, src_padded=padded)
        loss, *_ = loss_fn(logits, targets, config.label_smoothing, config.pad_id)
        optimizer.zero_grad(set_to_none=True)
        (loss / len(at)).backward()
        optimizer.step()

    return step


EAGER_LOSS = "aiayn (residual dropout only), its loss not compiled"
DTYPES = {"float": torch.float32, "c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16}
GEMMS = {"aten::mm": (torch.mm, 2), "aten::addmm": (torch.addmm, 3), "aten::bmm": (torch.bmm, 2),
         "aten::baddbmm": (torch.baddbmm, 3)}  # each with its number of matrix operands


def _gemm_replay(step: Callable[[], None], device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """The matrix multiplies one training step runs (forward and backward, as the profiler records
    them with their shapes and dtypes), replayed alone on fresh contiguous tensors: the time the
    step would take if it were nothing but its GEMMs. Where this torch's profiler records no
    dtypes (2.11 does not), they are the step's autocast `dtype`, in which autocast runs GEMMs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as recorded:
        step()
    calls = []
    for event in recorded.events():
        if event.name in GEMMS:
            gemm, operands = GEMMS[event.name]
            names = getattr(event, "input_dtypes", None) or [None] * len(event.input_shapes)
            shapes = [(shape, name) for shape, name in zip(event.input_shapes, names) if shape]
            tensors = [torch.randn(shape, device=device).to(DTYPES.get(name, dtype))
                       for shape, name in shapes[:operands]]  # not alpha, beta, nor a compiled graph's out=
            calls.append((gemm, tensors))
    assert calls, "the profiler recorded no matrix multiply"

    def replay() -> None:
        for gemm, tensors in calls:
            gemm(*tensors)

    return replay


def _top_ops(step: Callable[[], None], device: torch.device, count: int) -> list[dict]:
    """Where one step's time goes: the `count` operators (kernels, on a GPU) with the most self
    time over one profiled step, with their share of the step's total. Compiled graphs show their
    generated kernels by name."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as recorded:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    field = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [event for event in recorded.key_averages() if getattr(event, field) > 0]
    total = sum(getattr(event, field) for event in events)
    ranked = sorted(events, key=lambda event: getattr(event, field), reverse=True)[:count]
    return [{"op": event.key[:120], "ms": round(getattr(event, field) / 1e3, 3), "calls": event.count,
             "share": round(getattr(event, field) / total, 4)} for event in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--src-len", type=int, default=20)
    parser.add_argument("--tgt-len", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0: not printed)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (inductor)")
    parser.add_argument("--no-marian", action="store_true", help="leave MarianMTModel out (its compile is slow)")
    parser.add_argument("--top-ops", type=int, default=0,
                        help="also profile one step of ours as trained and list its N costliest operators")
    args = parser.parse_args()

    config = preset(args.preset, vocab_size=args.vocab_size)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        keep_freed_memory()  # as CPU training workers do, for every model alike
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, args.vocab_size, (args.batch, args.src_len), generator=generator).to(device)
    tgt = torch.randint(4, args.vocab_size, (args.batch, args.tgt_len + 1), generator=generator).to(device)
    batch = (src, tgt[:, :-1], tgt[:, 1:])
    target_tokens = args.batch * args.tgt_len

    candidates: dict[str, nn.Module] = {}
    torch.manual_seed(0)
    candidates["aiayn"] = build_model(config.replace(attention_dropout=config.dropout,
                                                      activation_dropout=config.dropout))
    torch.manual_seed(0)
    candidates["aiayn (residual dropout only)"] = build_model(config)
    torch.manual_seed(0)
    candidates["torch.nn.Transformer"] = TorchTransformerSeq2Seq(config)
    marian = None if args.no_marian else _marian(config)
    if marian is not None:
        candidates["MarianMTModel"] = marian
    if args.compile:
        for model in candidates.values():
            model.compile()  # in place, as `train.compile` does
    loss_fn = functools.partial(label_smoothed_loss, compiled=args.compile)  # as training pairs them
    steps = {name: _step_fn(model.to(device).train(), config, batch, dtype, loss_fn)
             for name, model in candidates.items()}
    if args.compile:  # what compiling the loss with the model buys, in the same run
        steps[EAGER_LOSS] = _step_fn(candidates["aiayn (residual dropout only)"], config, batch, dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for step in steps.values():  # warm-up
        for _ in range(2):
            step()
    sync()
    # The same GEMMs as the model as trained, alone: how much of its step is anything else.
    steps["GEMMs of aiayn (residual dropout only), replayed"] = _gemm_replay(steps["aiayn (residual dropout only)"], device, dtype)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            rates[name].append(args.steps * target_tokens / (time.perf_counter() - start))

    peer = statistics.median(rates["torch.nn.Transformer"])
    flops = training_flops_per_token(config, args.src_len, args.tgt_len)
    result = {"config": vars(args), "torch_threads": torch.get_num_threads(), "models": {}, "provenance": provenance()}
    for name, values in rates.items():
        median = statistics.median(values)
        row = {"target_tokens_per_s": round(median, 1), "ratio_vs_torch_nn_transformer": round(median / peer, 3)}
        if args.peak_tflops:
            row["mfu"] = round(median * flops / (args.peak_tflops * 1e12), 4)
        result["models"][name] = row
    gemms = statistics.median(rates["GEMMs of aiayn (residual dropout only), replayed"])
    result["share_of_step_in_its_gemms"] = round(statistics.median(rates["aiayn (residual dropout only)"]) / gemms, 3)
    result["spread_across_rounds"] = {name: [round(min(v) / statistics.median(v), 3), round(max(v) / statistics.median(v), 3)]
                                      for name, v in rates.items()}
    if args.top_ops:
        result["top_ops_of_aiayn_as_trained"] = _top_ops(steps["aiayn (residual dropout only)"], device, args.top_ops)
    if marian is None:
        result["note"] = "MarianMTModel not measured: " + ("--no-marian" if args.no_marian else "transformers is not installed")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
