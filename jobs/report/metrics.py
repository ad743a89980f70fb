"""Training metrics, computed in one place: the log window's loss, perplexity, tokens/s, data wait
and MFU. FLOPs come from transformer.flops (see its docstring for what is counted); the peak is the
device's dense peak for the precision in use."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from data_pipeline.batching import Batch
from data_pipeline.tokenizer import PAD_ID
from jobs.checkpoint import JobState
from jobs.report.stragglers import skew
from jobs.run.metric_names import (
    OWN_MS_MAX,
    OWN_MS_MEDIAN,
    OWN_MS_MIN,
    RANK_SKEW,
    SLOWEST_RANK,
    TRAIN_DATA_WAIT_S,
    TRAIN_LOSS,
    TRAIN_LR,
    TRAIN_MFU,
    TRAIN_PPL,
    TRAIN_STEP_TIME_S,
    TRAIN_TOKENS_PER_S,
)
from transformer.config import ModelConfig
from transformer.flops import decoder_only_training_flops, encoder_decoder_training_flops

# Dense (no sparsity) peaks, FLOP/s: bf16/fp16 tensor cores, and fp32 without TF32.
_GPU_PEAKS = {
    "H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12), "L4": (121e12, 30.3e12), "A10": (125e12, 31.2e12), "V100": (125e12, 15.7e12),
}


def measured_cpu_peak(trials: int = 12, trial_s: float = 0.05) -> float:
    """FLOP/s of a large fp32 matmul with this process's threads: the CPU's practical peak. The
    best of short trials, so that a moment of load (the other workers starting, Ray's daemons)
    does not lower it: a peak read low showed MFU above 100% on a loaded machine."""
    a, b = torch.full((512, 512), 0.5), torch.full((512, 512), 0.25)  # no draw from the global RNG
    a @ b
    best = 0.0
    for _ in range(trials):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < trial_s:
            a @ b
            runs += 1
        best = max(best, runs * 2 * 512**3 / (time.perf_counter() - start))
    return best


def device_peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, single) in _GPU_PEAKS.items():
            if key in name:
                return (single if precision == "fp32" else half), f"{name} datasheet"
        return 0.0, f"{name}: unknown peak"
    return measured_cpu_peak(), "measured fp32 matmul"


def batch_training_flops(config: ModelConfig, batch: Batch) -> float:
    """Training FLOPs of one batch, from each row's real lengths."""
    tgt_len = (batch.tgt_out != PAD_ID).sum(1).numpy().astype(np.float64)
    if batch.src is None:
        return float(decoder_only_training_flops(config, tgt_len).sum())
    src_len = (batch.src != PAD_ID).sum(1).numpy().astype(np.float64)
    return float(encoder_decoder_training_flops(config, src_len, tgt_len).sum())


class ForwardClock:
    """This rank's time in forward passes over its real batches, which no other rank waits in
    (`jobs.report.stragglers`). On a GPU it is timed by CUDA events, read when the step's one host
    synchronisation has passed."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            started = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - started

    def take(self) -> float:
        """Seconds since the last take (after the step's synchronisation: no wait here)."""
        seconds = self.seconds + sum(start.elapsed_time(end) for start, end in self.events) / 1000
        self.seconds, self.events = 0.0, []
        return seconds


@dataclass
class MetricsWindow:
    """Sums since the last log line; `summary` turns them into the logged metrics. Loss and NLL
    are this rank's sums, so `summary` adds them over ranks with `all_sum`; tokens and FLOPs are
    global already (they come from the step's collective)."""

    loss: float = 0.0
    nll: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    steps: int = 0
    data_wait: float = 0.0
    forward: float = 0.0  # this rank's forward passes over its real batches (ForwardClock)
    own_tokens: float = 0.0  # this rank's real target tokens
    corpora: tuple[str, ...] = ()  # a mixture's corpora: the NLL and target tokens of each, this rank's
    corpus_nll: np.ndarray = field(default_factory=lambda: np.zeros(0))
    corpus_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.corpus_nll, self.corpus_tokens = np.zeros(len(self.corpora)), np.zeros(len(self.corpora))

    def add_step(self, loss: float, nll: float, global_tokens: float, global_flops: float, data_wait: float,
                 forward: float = 0.0, own_tokens: float = 0.0, corpus_nll: tuple[float, ...] = (),
                 corpus_tokens: tuple[float, ...] = ()) -> None:
        self.loss += loss
        self.nll += nll
        if self.corpora:
            self.corpus_nll += corpus_nll
            self.corpus_tokens += corpus_tokens
        self.tokens += global_tokens
        self.flops += global_flops
        self.data_wait += data_wait
        self.forward += forward
        self.own_tokens += own_tokens
        self.steps += 1

    def own_ms_per_1k_tokens(self) -> float | None:
        """What this rank spent alone (forward passes and data wait) per 1,000 of its own target
        tokens; None when it had no data in the window. See jobs.report.stragglers."""
        return 1e6 * (self.forward + self.data_wait) / self.own_tokens if self.own_tokens else None

    def summary(self, all_sum: Callable[[list[float]], list[float]], peak_flops_per_rank: float,
                world_size: int) -> dict[str, float]:
        """Collective: every rank calls it at the same step."""
        loss, nll, *per_corpus = all_sum([self.loss, self.nll, *self.corpus_nll, *self.corpus_tokens])
        seconds = time.perf_counter() - self.started
        tokens, steps = max(self.tokens, 1.0), max(self.steps, 1)
        metrics = {
            TRAIN_LOSS: loss / tokens, "train/nll": nll / tokens, TRAIN_PPL: math.exp(min(nll / tokens, 50)),
            TRAIN_TOKENS_PER_S: self.tokens / seconds, TRAIN_STEP_TIME_S: seconds / steps,
            TRAIN_DATA_WAIT_S: self.data_wait / steps,
        }
        if peak_flops_per_rank:
            metrics[TRAIN_MFU] = self.flops / seconds / (peak_flops_per_rank * world_size)
        count = len(self.corpora)
        for name, corpus_nll, corpus_tokens in zip(self.corpora, per_corpus[:count], per_corpus[count:]):
            metrics[f"train/corpus/{name}/tokens"] = corpus_tokens  # its target tokens in the window, all ranks
            if corpus_tokens:
                metrics[f"train/corpus/{name}/nll"] = corpus_nll / corpus_tokens
        return metrics


def rank_time_metrics(own_ms: list[float | None]) -> dict[str, float]:
    """The ranks' own time per 1,000 target tokens (forward passes and data wait; none for a rank
    without data in the window) as a fixed set of names whatever the world size: the fastest,
    the median and the slowest rank's, which rank that is, and the skew (jobs.report.stragglers).
    One series per rank would be thousands of keys on a large run, which MLflow's store and
    charts do not carry; every rank's figure goes to the run's per-rank table instead
    (`RankReport.rank_figures`)."""
    measured = {rank: ms for rank, ms in enumerate(own_ms) if ms is not None}
    if not measured:
        return {RANK_SKEW: 1.0}
    slowest = max(measured, key=measured.get)
    return {OWN_MS_MIN: min(measured.values()), OWN_MS_MEDIAN: statistics.median(measured.values()),
            OWN_MS_MAX: measured[slowest], SLOWEST_RANK: float(slowest), RANK_SKEW: skew(own_ms)}


def run_metrics(state: JobState, world_size: int, lr: float, grad_norm: float | None) -> dict[str, float]:
    """Where the run stands, logged with each window (no gradient norm where DeepSpeed has none)."""
    metrics = {TRAIN_LR: float(lr), "train/epoch": float(state.epoch), "train/world_size": float(world_size),
               "train/tokens_seen": float(state.tokens_seen), "train/skipped_steps": float(state.skipped_steps)}
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    return metrics
