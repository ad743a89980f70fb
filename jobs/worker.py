"""The per-worker training function that Ray Train runs on every rank.

restore -> build model -> DeepSpeed engine -> stream this rank's batches -> step -> metrics
(rank 0 -> MLflow) -> every N steps or T minutes each rank saves its shard and data position
-> ray.train.report. It knows nothing of clusters: only the Ray Train session API.

Exactness: the loss is normalised by the *global* target-token count of the whole accumulated
batch (all ranks, all micro-batches), so the update does not depend on how batches fall on ranks.
Ranks can have different numbers of batches in an epoch; a rank that ran out steps with a
zero-weight dummy batch until every rank has, then all start the next epoch together.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from data_pipeline.batching import Batch
from data_pipeline.manifest import load_manifest
from data_pipeline.stream import ShardStream, StreamPosition, redistribute
from data_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID
from jobs import checkpoint as ckpt
from jobs.config import JobConfig, build_section, public_config
from jobs.deepspeed_config import deepspeed_config
from jobs.evaluation import bleu, detokenize, load_processor, read_eval_split, translate_ids
from jobs.throughput import batch_training_flops, device_peak_flops
from jobs.tracking import MetricLogger
from transformer import build_model
from transformer.loss import label_smoothed_loss
from transformer.schedule import inverse_sqrt_lr, noam_lr


class NonFiniteTraining(RuntimeError):
    """The loss or the weights stopped being finite."""


_DUMMY = Batch(src=torch.tensor([[EOS_ID]]), tgt_in=torch.tensor([[BOS_ID]]), tgt_out=torch.tensor([[EOS_ID]]))


def lr_factor(job: JobConfig, step: int) -> float:
    """Multiplier of the optimizer's base lr at optimizer step `step` (1-based)."""
    if job.optim.schedule == "noam":
        return noam_lr(step, job.model.d_model, job.optim.warmup_steps, scale=job.optim.lr)
    return inverse_sqrt_lr(step, 1.0, job.optim.warmup_steps)


def _forward_loss(engine, batch: Batch, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch = batch.to(engine.device)
    at = batch.tgt_out != PAD_ID
    inputs = (batch.tgt_in, at) if batch.src is None else (batch.src, batch.tgt_in, at)
    return label_smoothed_loss(engine(*inputs), batch.tgt_out[at], epsilon, PAD_ID)


def _all_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


@dataclass
class _Window:
    """Sums since the last log line."""

    loss: float = 0.0
    nll: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    steps: int = 0
    data_wait: float = 0.0
    started: float = field(default_factory=time.perf_counter)


class Trainer:
    def __init__(self, loop_config: dict):
        import ray.train

        self.job: JobConfig = build_section(JobConfig, loop_config["job"], "")
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.local_rank = context.get_local_rank()
        torch.set_num_threads(self.job.train.threads_per_worker)
        self.manifest = load_manifest(loop_config["dataset_uri"])
        self.model_config = self.job.model.replace(vocab_size=self.manifest.vocab_size)
        self.tracking_uri, self.run_id = loop_config["tracking_uri"], loop_config["run_id"]
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

        if self.job.cluster.staging_dir:  # this worker's scratch: checkpoint staging and downloads
            Path(self.job.cluster.staging_dir).mkdir(parents=True, exist_ok=True)
            tempfile.tempdir = self.job.cluster.staging_dir
        restored = ray.train.get_checkpoint()
        if restored is None and loop_config.get("resume_from"):
            restored = ray.train.Checkpoint(loop_config["resume_from"])  # a local path or a URI
        if restored is not None:
            with restored.as_directory() as directory:  # downloaded to local scratch if remote
                position = self._build(Path(directory))
        else:
            position = self._build(None)
        self.stream = ShardStream(self.manifest, "train", self.job.stream, rank=self.rank, world_size=self.world,
                                  position=position, max_length=self.model_config.max_positions)
        self.logger = None
        if self.rank == 0:
            os.environ.update(self.job.tracking.environment())
            self.logger = MetricLogger(self.tracking_uri, self.run_id)
            self.logger.restore_spool(self.state.pending_metrics)
        self.peak_flops, self.peak_source = device_peak_flops(self.device, self.job.train.precision)
        # The dropout stream of this rank, set last so that nothing above can draw from it.
        if self._saved_rng is not None:
            torch.set_rng_state(self._saved_rng)
        else:  # a fresh run, or a resume at another world size (no old rank's stream fits)
            torch.manual_seed(self.job.train.seed * 1000 + self.rank + 1 + 7919 * self.state.step)

    def _build(self, checkpoint: Path | None) -> StreamPosition:
        """Build the engine, restoring `checkpoint` if given; returns this rank's data position."""
        import deepspeed

        job = self.job
        saved = self._check(checkpoint) if checkpoint is not None else None
        resized = saved is not None and saved.world_size != self.world
        # At another world size ZeRO 1-3 load DeepSpeed's universal format; stage 0's files hold
        # the whole optimizer state and load as they are.
        universal = self._universal_copy(checkpoint) if resized and job.train.zero_stage > 0 else None
        torch.manual_seed(job.train.seed)  # identical initial weights on every rank
        model = build_model(self.model_config)
        ds_config = deepspeed_config(job, self.world, load_universal=universal is not None)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(job, s + 1)),
        )
        self.resumed_from_step: int | None = None
        self._saved_rng: torch.Tensor | None = None
        self.consecutive_skips = 0
        if saved is None:
            self.state = ckpt.JobState(
                mlflow_run_id=self.run_id, world_size=self.world, zero_stage=job.train.zero_stage,
                tokenizer_sha256=self.manifest.tokenizer_sha256, config=public_config(job),
            )
            return StreamPosition()
        ckpt.load_engine_state(self.engine, checkpoint, saved, job.train.zero_stage, universal)
        if universal is not None:
            dist.barrier()  # every rank of the node has loaded it
            shutil.rmtree(universal, ignore_errors=True)
        self.state, self.resumed_from_step = saved, saved.step
        self.state.mlflow_run_id, self.state.world_size = self.run_id, self.world
        if not resized:
            rank_state = ckpt.load_rank_state(checkpoint, self.rank)
            self._saved_rng = rank_state.rng_state
            return rank_state.position
        old = [state.position for state in ckpt.load_rank_states(checkpoint, saved.world_size)]
        return redistribute(self.manifest, "train", job.stream, old, saved.epoch, self.world)[self.rank]

    def _universal_copy(self, checkpoint: Path) -> Path:
        """The checkpoint in DeepSpeed's universal format, in node-local scratch: converted once per
        node by local rank 0. Ray groups local ranks by node IP, which need not mean one disk, so a
        rank that does not see its local rank 0's copy after the barrier converts its own."""
        target = Path(tempfile.gettempdir()) / f"aiayn-universal-{hashlib.sha256(str(checkpoint).encode()).hexdigest()[:16]}"
        if self.local_rank == 0:
            ckpt.universal_copy(checkpoint, target)
        dist.barrier()
        ckpt.universal_copy(checkpoint, target)
        return target

    def _check(self, directory: Path) -> ckpt.JobState:
        ckpt.verify(str(directory))  # before DeepSpeed unpickles anything in it
        saved = ckpt.read_job_state(str(directory))
        if saved.tokenizer_sha256 != self.manifest.tokenizer_sha256:
            raise ckpt.CheckpointError(f"{directory} was trained with another tokenizer than the dataset's")
        return saved

    # -- one optimizer step ----------------------------------------------------------------------
    def _train_step(self, micro: list[Batch | None], global_tokens: float, window: _Window) -> None:
        scale = self.world * self.job.train.grad_accum / max(global_tokens, 1.0)
        for batch in micro:
            weight = 0.0 if batch is None else 1.0
            batch = batch or _DUMMY
            loss, nll = _forward_loss(self.engine, batch, self.model_config.label_smoothing)
            self.engine.backward(loss * (scale * weight))
            self.engine.step()
            window.loss += float(loss.detach()) * weight
            window.nll += float(nll) * weight
        self._count_skipped()

    def _count_skipped(self) -> None:
        """ZeRO 1-3 skip, on every rank alike, an update whose global gradient norm is not finite
        (NaN or inf loss). A few are survivable; many in a row mean the run has diverged."""
        if self.engine.was_step_applied():
            self.consecutive_skips = 0
            return
        self.state.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.job.train.max_consecutive_skips:
            raise NonFiniteTraining(
                f"step {self.state.step + 1}: the last {self.consecutive_skips} updates had non-finite gradients and "
                f"were skipped; the run has diverged: lower optim.lr, raise optim.warmup_steps or check the data"
            )

    def _check_finite_weights(self) -> None:
        """Never write a checkpoint with non-finite weights (it would rotate the good ones out)."""
        if self.job.train.zero_stage == 3:
            return  # parameters are partitioned; their updates were already guarded by the skip above
        if not all(bool(torch.isfinite(p).all()) for p in self.engine.module.parameters()):
            raise NonFiniteTraining(f"step {self.state.step}: the weights are not finite; not saving this checkpoint")

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if not self.manifest.has_split("valid"):
            return {}
        self.engine.eval()
        stream = ShardStream(self.manifest, "valid", self.job.stream, rank=self.rank, world_size=self.world,
                             shuffle=False, max_length=self.model_config.max_positions)
        sums = [0.0, 0.0, 0.0]
        for batch in stream.epoch_batches():
            loss, nll = _forward_loss(self.engine, batch, self.model_config.label_smoothing)
            sums = [sums[0] + float(loss), sums[1] + float(nll), sums[2] + batch.target_tokens]
        self.engine.train()
        loss, nll, tokens = _all_sum(sums)
        if tokens == 0:
            return {}  # nothing in valid fits the budget
        return {"valid/loss": loss / tokens, "valid/nll": nll / tokens, "valid/ppl": math.exp(min(nll / tokens, 50))}

    @torch.no_grad()
    def validation_bleu(self) -> dict[str, float]:
        """Beam-search BLEU on the first sentences of valid, each rank translating a slice."""
        if self.manifest.monolingual or not self.manifest.has_split("valid"):
            return {}
        import deepspeed

        split = read_eval_split(self.manifest, "valid", self.job.train.bleu_valid_sentences)
        mine = list(range(self.rank, len(split.src_ids), self.world))
        with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()),
                                               enabled=self.job.train.zero_stage == 3):
            hyps = translate_ids(self.engine.module, [split.src_ids[i] for i in mine],
                                 beam_size=self.job.train.beam_size, alpha=self.job.train.length_penalty)
        self.engine.train()
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, list(zip(mine, hyps)))
        ordered = sorted(pair for part in gathered for pair in part)
        processor = load_processor(self.manifest.tokenizer_uri)
        score = bleu(detokenize(processor, [h for _, h in ordered]), split.references)
        return {"valid/bleu": score.score}

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, metrics: dict[str, float]) -> None:
        import ray.train

        self._check_finite_weights()
        with tempfile.TemporaryDirectory(prefix=f"aiayn-ckpt-r{self.rank}-") as local:
            directory = Path(local)
            try:
                ckpt.save_checkpoint(
                    self.engine, directory, self.rank, self.state if self.rank == 0 else None,
                    ckpt.RankState(self.stream.position, torch.get_rng_state()),
                )
            except (OSError, RuntimeError) as error:  # torch reports a full disk as an iostream error
                free = shutil.disk_usage(local).free
                raise ckpt.CheckpointError(
                    f"step {self.state.step}: writing this rank's checkpoint part to {local} failed with "
                    f"{free / 2**20:.0f} MiB free on that disk ({str(error).splitlines()[0][:120]}); "
                    "set cluster.staging_dir to a local disk with room for one checkpoint shard"
                ) from error
            ray.train.report(
                {**metrics, "step": self.state.step},
                checkpoint=ray.train.Checkpoint.from_directory(local),
                checkpoint_dir_name=ckpt.checkpoint_dir_name(self.state.step),
            )

    # -- the loop --------------------------------------------------------------------------------
    def _batches(self) -> Iterator[Batch]:
        if self.stream.position.epoch == self.state.epoch:
            return self.stream.epoch_batches()
        return iter(())  # this rank finished the epoch before the checkpoint; others had not

    def _record_placement(self) -> None:
        """Tags: which node each rank runs on, world size, ZeRO stage, and any resume."""
        import ray

        where = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
        nodes: list = [None] * self.world
        dist.all_gather_object(nodes, where)
        if self.logger is not None:
            self.logger.set_tags({"world_size": self.world, "zero_stage": self.job.train.zero_stage,
                                  "peak_flops_source": self.peak_source,
                                  **{f"node.rank{r}": n for r, n in enumerate(nodes)}})
            if self.resumed_from_step is not None:
                self.logger.set_tags({"resumed_from_step": self.resumed_from_step})

    def run(self) -> None:
        train = self.job.train
        self._record_placement()
        started, elapsed_before = time.monotonic(), self.state.elapsed_seconds
        last_save = time.monotonic()
        batches, window, stop = self._batches(), _Window(), False
        while not stop:
            if train.max_steps and self.state.step >= train.max_steps:
                break
            fetch = time.perf_counter()
            micro = [next(batches, None) for _ in range(train.grad_accum)]
            window.data_wait += time.perf_counter() - fetch
            real = [b for b in micro if b is not None]
            # One collective per step: the token/FLOP sums, and rank 0's clock decisions (the
            # other ranks add zeros) so that every rank stops and saves at the same step.
            elapsed = elapsed_before + time.monotonic() - started
            clock = [float(bool(train.max_minutes) and elapsed >= train.max_minutes * 60),
                     float(time.monotonic() - last_save >= train.checkpoint_every_minutes * 60)]
            global_tokens, ranks_with_data, global_flops, time_up, save_due = _all_sum([
                sum(b.target_tokens for b in real), float(bool(real)),
                sum(batch_training_flops(self.model_config, b) for b in real),
                *(clock if self.rank == 0 else [0.0, 0.0]),
            ])
            if ranks_with_data == 0:  # every rank finished the epoch
                self.state.epoch += 1
                if train.max_epochs and self.state.epoch >= train.max_epochs:
                    stop = True
                else:
                    batches = self._batches()
                    continue
            else:
                self._train_step(micro, global_tokens, window)
                self.state.step += 1
                self.state.tokens_seen += int(global_tokens)
                window.tokens += global_tokens
                window.flops += global_flops
                window.steps += 1
            self.state.elapsed_seconds = elapsed_before + time.monotonic() - started
            step = self.state.step
            stop = stop or bool(time_up) or bool(train.max_steps and step >= train.max_steps)
            metrics: dict[str, float] = {}
            if window.steps and (step % train.log_every == 0 or step == 1 or stop):  # step 1: start-up time
                metrics.update(self._window_metrics(window))
                window = _Window()
            if train.validate_every and step % train.validate_every == 0 or stop:
                metrics.update(self.validate())
                stop = self._patience(metrics) or stop
            if train.bleu_every and step % train.bleu_every == 0:
                metrics.update(self.validation_bleu())
            if self.logger is not None and metrics:
                self.logger.log(metrics, step)
            if stop or save_due or (train.checkpoint_every_steps and step % train.checkpoint_every_steps == 0):
                if self.logger is not None:
                    self.logger.flush()
                    self.state.pending_metrics = self.logger.spool()  # kept with the checkpoint
                self.save(metrics)
                last_save = time.monotonic()

    def _patience(self, metrics: dict[str, float]) -> bool:
        if "valid/loss" not in metrics:
            return False
        if metrics["valid/loss"] < self.state.best_valid_loss:
            self.state.best_valid_loss = metrics["valid/loss"]
            self.state.validations_without_improvement = 0
        else:
            self.state.validations_without_improvement += 1
        return bool(self.job.train.patience) and self.state.validations_without_improvement >= self.job.train.patience

    def _window_metrics(self, window: _Window) -> dict[str, float]:
        loss, nll = _all_sum([window.loss, window.nll])
        seconds = time.perf_counter() - window.started
        tokens = max(window.tokens, 1.0)
        metrics = {
            "train/loss": loss / tokens, "train/nll": nll / tokens, "train/ppl": math.exp(min(nll / tokens, 50)),
            "train/lr": float(self.scheduler.get_last_lr()[0]),
            "train/tokens_per_s": window.tokens / seconds, "train/step_time_s": seconds / window.steps,
            "train/data_wait_s": window.data_wait / window.steps, "train/epoch": float(self.state.epoch),
            "train/tokens_seen": float(self.state.tokens_seen),
            "train/skipped_steps": float(self.state.skipped_steps),
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if self.peak_flops:
            metrics["train/mfu"] = window.flops / seconds / (self.peak_flops * self.world)
        return metrics


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point given to TorchTrainer."""
    Trainer(loop_config).run()
