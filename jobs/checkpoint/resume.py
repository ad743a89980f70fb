"""Resuming: which checkpoint a run starts from and what loading it implies, decided once on the
driver before any worker starts (`resume_source`, `plan_resume`), and the rules the workers follow to carry it out
(`attempt_source`, `reshard_of`, `rank_start`). Every rule about resuming lives here.

What may change on resume: everything not in `FIXED_ON_RESUME` (step and time limits, logging,
validation and checkpoint cadence, the number of workers, tracking...). A change to a fixed key is
refused with one line before any cluster resource is taken. Stream settings are fixed because the
saved data position indexes the batches they make: continuing an epoch under other settings would
break "every example exactly once" for that epoch, so aiayn refuses rather than guessing.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from data_pipeline.config import StreamConfig
from data_pipeline.errors import InputError
from data_pipeline.manifest import Manifest
from data_pipeline.stream import StreamPosition, redistribute
from jobs.checkpoint.files import (
    CheckpointError,
    JobState,
    load_rank_state,
    read_job_state,
    signed_checkpoints,
    step_of,
    verify,
)
from jobs.checkpoint.signing import Signer
from transformer.config import saved_model_section

# dotted key (or section) -> why it cannot change between a checkpoint and the run resuming it
FIXED_ON_RESUME: dict[str, str] = {
    **{f"model.{key}": "the saved weights have this shape" for key in (
        "architecture", "n_layers", "n_decoder_layers", "d_model", "d_ff", "n_heads", "d_k", "d_v", "positional",
        "max_positions", "norm", "share_embeddings", "attention_bias")},
    **{f"stream.{key}": "the saved data position indexes the batches these settings make (every example exactly "
                        "once per epoch)" for key in (
        "max_tokens", "max_sentences", "window_rows", "unit_rows", "seed", "packed_length", "sampling_alpha")},
    "optim": "the optimizer state and the learning-rate schedule were saved with these settings",
    "train.zero_stage": "DeepSpeed's files are laid out for this ZeRO stage",
    "train.precision": "the optimizer state was saved in this precision",
    "deepspeed": "DeepSpeed's files depend on these settings",
}


@dataclass(frozen=True)
class ResumePlan:
    """Where a run starts. `checkpoint` is None for a fresh start."""

    checkpoint: str | None = None
    step: int = 0
    saved_world_size: int = 0
    world_size: int = 0
    zero_stage: int = 0

    @property
    def resized(self) -> bool:
        return self.checkpoint is not None and self.saved_world_size != self.world_size

    def describe(self) -> str:
        if self.checkpoint is None:
            return f"starting fresh on {self.world_size} workers"
        line = f"resuming at step {self.step} from {self.checkpoint}"
        if self.resized:
            universal = reshards(self.saved_world_size, self.world_size, self.zero_stage)
            how = "through DeepSpeed's universal format" if universal else "as saved (stage 0 holds it whole)"
            line += (f"; {self.saved_world_size} -> {self.world_size} workers: ZeRO-{self.zero_stage} state resharded "
                     f"{how}, the epoch's remaining examples dealt to the new ranks")
        return line

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def reshards(saved_world_size: int, world_size: int, zero_stage: int) -> bool:
    """The one rule: a checkpoint loads through DeepSpeed's universal format when the world size
    changed and ZeRO 1-3 partitioned the optimizer state by rank; stage 0's files hold it whole and
    load as they are."""
    return saved_world_size != world_size and zero_stage > 0


_UNSET = "<unset>"


def _changed(saved: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    """Dotted keys whose values differ (a key only one side has counts as changed)."""
    changes: dict[str, tuple] = {}
    for key in sorted(saved.keys() | new.keys()):
        name = f"{prefix}.{key}" if prefix else key
        old_value, new_value = saved.get(key, _UNSET), new.get(key, _UNSET)
        if isinstance(old_value, dict) and isinstance(new_value, dict):
            changes.update(_changed(old_value, new_value, name))
        elif isinstance(new_value, dict) and old_value == _UNSET:
            changes.update(_changed({}, new_value, name))
        elif old_value != new_value:
            changes[name] = (old_value, new_value)
    return changes


def check_compatible(saved_config: dict, new_config: dict, where: str) -> None:
    """Refuse (InputError, one line) a config that changes a key fixed on resume. `saved_config`:
    as the checkpoint holds it (its model section read as the model it was written with)."""
    saved_config = {**saved_config, "model": saved_model_section(saved_config.get("model", {}))}
    for key, (old, new) in sorted(_changed(saved_config, new_config).items()):
        fixed = next((rule for rule in FIXED_ON_RESUME if key == rule or key.startswith(rule + ".")), None)
        if fixed is not None:
            raise InputError(
                f"{key}: {where} was written with {old!r}, this run sets {new!r}, and {FIXED_ON_RESUME[fixed]}; "
                f"set {key}={old!r} to resume, or give the run a new --name to start over"
            )


def resume_source(run_uri: str, resume_from: str, signer: Signer, say: Callable[[str], None]) -> str | None:
    """The checkpoint a run starts from, verified, or None. A run that has checkpoints continues
    from its newest one that verifies (as Ray Train restores it), saying why it passed over any
    newer one (planted by someone without the key, changed, or unsigned); `resume_from` starts a
    new run from another run's checkpoint."""
    signed, refused = signed_checkpoints(run_uri, signer)
    if (signed or refused) and resume_from:
        newest = max([*signed, *refused], key=step_of)
        raise InputError(f"--resume {resume_from}: run {run_uri} has checkpoints already and continues from "
                         f"{newest}; drop --resume to continue it, or give a new --name")
    if resume_from:
        try:
            verify(resume_from, signer)
        except CheckpointError as error:
            raise InputError(f"{resume_from}: not a complete, unchanged aiayn checkpoint of yours ({error})") from None
        return resume_from
    for candidate in reversed(signed):
        try:
            verify(candidate, signer)
        except CheckpointError as error:
            refused[candidate] = str(error)
            continue
        for newer in sorted((uri for uri in refused if step_of(uri) > step_of(candidate)), key=step_of):
            say(f"passing over {posixpath.basename(newer)}: {refused[newer]}")
        return candidate
    if refused:  # the newest's reason names the option that loads an older release's (signing.py)
        raise InputError(f"run {run_uri}: none of its {len(refused)} complete checkpoints verifies; "
                         f"{refused[max(refused, key=step_of)]}")
    return None


def plan_resume(source: str | None, config: dict, manifest: Manifest, world_size: int, zero_stage: int) -> ResumePlan:
    """The run's start from `source` (see `resume_source`), checked against the new `config`
    (public_config of the job) and dataset."""
    if source is None:
        return ResumePlan(world_size=world_size, zero_stage=zero_stage)
    saved = read_job_state(source)
    if saved.tokenizer_sha256 != manifest.tokenizer_sha256:
        raise InputError(f"{source}: trained with tokenizer {saved.tokenizer_sha256[:12]}, but the dataset "
                         f"{manifest.uri} uses {manifest.tokenizer_sha256[:12]}; resume on the checkpoint's dataset")
    if saved.dataset_fingerprint and saved.dataset_fingerprint != manifest.fingerprint:
        raise InputError(f"{source}: its data position indexes another prepared dataset than {manifest.uri} "
                         "(inputs or prepare settings changed); resume on the same data, or start a new --name")
    check_compatible(saved.config, config, source)
    if saved.zero_stage != zero_stage:  # checkpoints older than this check kept the stage only here
        raise InputError(f"train.zero_stage: {source} was written with ZeRO stage {saved.zero_stage}; "
                         f"set train.zero_stage={saved.zero_stage} to resume")
    return ResumePlan(source, saved.step, saved.world_size, world_size, zero_stage)


def attempt_source(plan: ResumePlan, registered: str | None) -> str | None:
    """What a worker group loads: the newer of Ray Train's latest registered checkpoint (a restart
    inside the run) and the driver's plan. The plan is newer when the last run failed after a
    checkpoint's upload completed but before Ray Train registered it: the driver resumes from it,
    and so must the workers, or the run would say one step and resume from another."""
    if plan.checkpoint is None or (registered is not None and step_of(registered) >= plan.step):
        return registered
    return plan.checkpoint


def reshard_of(saved: JobState, world_size: int) -> bool:
    """Whether this checkpoint loads through DeepSpeed's universal format at `world_size`."""
    return reshards(saved.world_size, world_size, saved.zero_stage)


def rank_start(directory: Path, saved: JobState, rank: int, world_size: int, manifest: Manifest,
               stream: StreamConfig) -> tuple[StreamPosition, torch.Tensor | None]:
    """This rank's data position and dropout RNG state after loading `saved`. At the saved world
    size each rank continues its own stream; at another, the epoch's remaining work is dealt anew
    and no old rank's RNG stream fits (None)."""
    if saved.world_size == world_size:
        state = load_rank_state(directory, rank)
        return state.position, state.rng_state
    old = [load_rank_state(directory, old_rank).position for old_rank in range(saved.world_size)]
    return redistribute(manifest, "train", stream, old, saved.epoch, world_size)[rank], None
