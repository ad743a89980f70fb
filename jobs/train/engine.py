"""The model inside a DeepSpeed engine, and one exact optimizer step on it.

Exactness: the loss is normalised by the *global* target-token count of the whole accumulated
batch (all ranks, all micro-batches), so the update does not depend on how batches fall on ranks.
A rank without data steps a zero-weight dummy batch so that every rank joins every collective.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from data_pipeline.batching import Batch
from data_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID
from jobs.report.metrics import ForwardClock
from jobs.run.config import JobConfig
from jobs.train.deepspeed_config import deepspeed_config
from transformer import ModelConfig, build_model
from transformer.loss import label_smoothed_loss
from transformer.schedule import decay_factor, inverse_sqrt_lr, noam_lr

# What a rank without data feeds the model, with zero weight, so that it joins the collectives
# of every forward (ZeRO-3 gathers parameters in it) and backward.
DUMMY_BATCH = Batch(src=torch.tensor([[EOS_ID]]), tgt_in=torch.tensor([[BOS_ID]]), tgt_out=torch.tensor([[EOS_ID]]))


class NonFiniteTraining(RuntimeError):
    """The loss or the weights stopped being finite."""


def lr_factor(job: JobConfig, step: int) -> float:
    """Multiplier of the optimizer's base lr at optimizer step `step` (1-based). The base lr is
    `optim.lr` for every schedule (`deepspeed_config`), so a schedule is a shape, peaking at 1
    (noam's peak is below 1: `optim.lr` is then the paper's scale factor)."""
    if job.optim.schedule == "noam":
        factor = noam_lr(step, job.model.d_model, job.optim.warmup_steps)
    else:
        factor = inverse_sqrt_lr(step, 1.0, job.optim.warmup_steps)
    return factor * decay_factor(step, job.train.max_steps, job.optim.decay_steps)


def compiles(job: JobConfig, on_gpu: bool) -> bool:
    """Whether the engine is compiled: train.compile, by default on GPUs only (on a CPU the
    compile takes longer than it saves in a run of this size)."""
    return on_gpu if job.train.compile is None else job.train.compile


def build_engine(job: JobConfig, model_config: ModelConfig, world_size: int, *, load_universal: bool):
    """(engine, lr scheduler) with identical initial weights on every rank."""
    import deepspeed

    torch.manual_seed(job.train.seed)
    model = build_model(model_config)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(),
        config=deepspeed_config(job, world_size, load_universal=load_universal),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(job, s + 1)),
    )
    if compiles(job, torch.cuda.is_available()):
        # In place (the module's state_dict keys stay those of the checkpoints). Token-budget batches
        # change shape every step: after the first recompile, dynamo marks those sizes dynamic.
        engine.compile()
    return engine, scheduler


def forward_loss(engine, batch: Batch, epsilon: float, corpora: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed loss, NLL), summed over the batch's target tokens; with `corpora` (a
    mixture's number of corpora) the NLL is summed per corpus, a (corpora,) tensor.

    Everything that depends on where the padding is (target positions, whether the source needs
    a mask, each target's corpus) is decided on the host before the batch moves, so the device
    never waits on the host."""
    positions = batch.target_positions()
    targets = batch.tgt_out.flatten().index_select(0, positions)
    groups = None
    if corpora:  # a stand-in batch has no corpus: its weight is 0, so any will do
        groups = batch.target_corpora(positions) if batch.corpus is not None else torch.zeros_like(positions)
    kwargs = {} if batch.src is None else {"src_padded": batch.src_padded}
    device = engine.device
    positions, targets = positions.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    groups = None if groups is None else groups.to(device, non_blocking=True)
    batch = batch.to(device)
    inputs = (batch.tgt_in, positions) if batch.src is None else (batch.src, batch.tgt_in, positions)
    return label_smoothed_loss(engine(*inputs, **kwargs), targets, epsilon, PAD_ID, compiled=engine.is_compiled,
                               groups=groups, group_count=corpora)


@dataclass(frozen=True)
class StepSums:
    """A rank's sums over one optimizer step's real target tokens."""

    loss: float
    nll: float
    corpus_nll: tuple[float, ...] = ()  # a mixture's NLL per corpus, in the manifest's order


def train_step(engine, micro: list[Batch | None], global_tokens: float, world_size: int,
               epsilon: float, forward_clock: ForwardClock | None = None, corpora: int = 0) -> StepSums:
    """One optimizer step over this rank's micro-batches (None: no data left); returns this rank's
    sums. DeepSpeed averages gradients over ranks and micro-batches, hence the scale. The sums
    stay on the device until the step's end: one host synchronisation per step.
    `forward_clock` times the forward passes of real batches (straggler detection); `corpora`: a
    mixture's number of corpora, whose NLL is summed apart."""
    scale = world_size * len(micro) / max(global_tokens, 1.0)
    sums = []
    for batch in micro:
        weight = 0.0 if batch is None else 1.0
        timed = forward_clock is not None and batch is not None  # a stand-in batch is no work to compare
        with forward_clock.timing() if timed else contextlib.nullcontext():
            loss, nll = forward_loss(engine, batch or DUMMY_BATCH, epsilon, corpora)
        engine.backward(loss * (scale * weight))
        with _skip_if_not_finite(engine):
            engine.step()
        sums.append(torch.cat([loss.detach().float().view(1), nll.float().sum().view(1), nll.float().view(-1)[:corpora]])
                    * weight)
    loss_sum, nll_sum, *corpus_nll = torch.stack(sums).sum(0).tolist()
    return StepSums(loss_sum, nll_sum, tuple(corpus_nll))


@contextlib.contextmanager
def _skip_if_not_finite(engine):
    """ZeRO 1-3 and DeepSpeed's 16-bit optimizers skip an update whose gradients are not finite:
    they report an `overflow`, and the engine then counts a skipped step, leaves the lr schedule
    where it is and `was_step_applied()` says False. ZeRO-0 in fp32 steps a plain torch optimizer,
    which has no such report and would make every weight NaN. For it the gradients, already
    averaged over ranks (so every rank decides alike), are checked at the update, and a
    non-finite one makes that optimizer report an overflow and step nothing, for this step only.
    Costs ZeRO-0 fp32 one host sync per step."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "overflow") or not engine.is_gradient_accumulation_boundary():
        yield
        return
    gradients = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if bool(torch.isfinite(torch.nn.utils.get_total_norm(gradients, error_if_nonfinite=False))):
        yield
        return
    optimizer.overflow, optimizer.step = True, lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.overflow, optimizer.step


@dataclass
class DivergenceGuard:
    """Every ZeRO stage skips, on every rank alike, an update whose global gradient norm is not
    finite (see `train_step`). A few are survivable; `limit` in a row mean the run has diverged."""

    limit: int
    in_a_row: int = 0

    def after_step(self, engine, step: int) -> bool:
        """True if the step's update was skipped; raises once `limit` were skipped in a row."""
        if engine.was_step_applied():
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteTraining(
                f"step {step}: the last {self.in_a_row} updates had non-finite gradients and were skipped; "
                "the run has diverged: lower optim.lr, raise optim.warmup_steps or check the data"
            )
        return True


def check_finite_weights(engine, zero_stage: int, step: int) -> None:
    """Never write a checkpoint with non-finite weights (it would rotate the good ones out)."""
    if zero_stage == 3:
        return  # parameters are partitioned; their updates were already guarded by DivergenceGuard
    if not all(bool(torch.isfinite(p).all()) for p in engine.module.parameters()):
        raise NonFiniteTraining(f"step {step}: the weights are not finite; not saving this checkpoint")
