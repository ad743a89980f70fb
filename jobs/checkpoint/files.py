"""The checkpoint format: each rank's DeepSpeed shard plus the state that makes a resume exact.

A checkpoint directory (Ray Train merges every rank's files into one):
    deepspeed/state/...          DeepSpeed's own files (model, ZeRO optimizer partitions, scheduler)
    job_state.json               rank 0: step, epoch, tokens, elapsed time, MLflow run id, config...
    ema.safetensors              rank 0, with train.ema_decay: the moving average of the weights
    rank_00001.pt                each rank: its data position and RNG state
    rank_00001.complete          each rank, written last: size and sha256 of every file it wrote,
                                 signed with the author's key (signing.py)
A checkpoint is complete only if job_state.json exists and every rank's marker matches the sizes
on disk; anything else (a write that was interrupted) is never loaded. Before anything in it is
deserialized (DeepSpeed's loaders unpickle), `verify` checks each marker's signature (who wrote
it) and every file against the sha256 in the markers, and refuses a changed file or one that no
rank wrote. Resuming at another world size
converts the ZeRO shards to DeepSpeed's universal format in node-local scratch, never beside them.

Checkpoints live wherever `cluster.storage_path` points (a shared path or an object store): the
functions that read them take URIs. Each rank writes its part into a node-local staging
directory (`cluster.staging_dir`) from which Ray Train uploads it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import pickle
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_pipeline import storage
from data_pipeline.stream import StreamPosition
from jobs.checkpoint.signing import SignatureError, Signer
from transformer.ema import WeightAverage

DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"
JOB_STATE = "job_state.json"
AVERAGE = "ema.safetensors"  # rank 0: the moving average of the weights (train.ema_decay)
_STEP_NAME = re.compile(r"checkpoint_step(\d+)$")


class CheckpointError(RuntimeError):
    pass


@dataclass
class JobState:
    """What every rank agrees on; saved once, by rank 0."""

    step: int = 0
    epoch: int = 0
    tokens_seen: int = 0  # global target tokens trained on
    elapsed_seconds: float = 0.0  # training time across restarts, for train.max_minutes
    mlflow_run_id: str = ""
    world_size: int = 1
    zero_stage: int = 0
    tokenizer_sha256: str = ""
    best_valid_loss: float = math.inf
    validations_without_improvement: int = 0
    config: dict = field(default_factory=dict)
    pending_metrics: list = field(default_factory=list)  # not yet in MLflow when saved (an outage)
    skipped_steps: int = 0  # updates skipped for non-finite gradients
    dataset_fingerprint: str = ""  # the prepared data the positions index into (manifest fingerprint)
    launch_id: str = ""  # the `aiayn train` invocation that wrote it: tells a restart inside a run from a resume
    goodput: dict = field(default_factory=dict)  # the time ledger so far (jobs/report/goodput.py)
    saved_at: float = 0.0  # wall clock (time.time()) when it was saved: a restart's lost time starts here


@dataclass
class RankState:
    position: StreamPosition
    rng_state: torch.Tensor


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_step{step:08d}"


def step_of(directory: str) -> int:
    """The step a checkpoint directory (URI or path) was saved at, from its name."""
    match = _STEP_NAME.search(str(directory).rstrip("/"))
    if match is None:
        raise CheckpointError(f"{directory}: not a checkpoint directory of aiayn's (checkpoint_stepNNNNNNNN)")
    return int(match.group(1))


def _rank_files(rank: int) -> tuple[str, str]:
    return f"rank_{rank:05d}.pt", f"rank_{rank:05d}.complete"


def save_checkpoint(engine, directory: Path, rank: int, job_state: JobState | None, rank_state: RankState,
                    signer: Signer, average: WeightAverage | None = None) -> None:
    """Write this rank's part of a checkpoint into a local directory (collective: all ranks
    call it), its marker signed by `signer`. Rank 0 also writes the job state and the weights'
    moving average, if the run keeps one."""
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
    state_file, marker = _rank_files(rank)
    torch.save({"position": rank_state.position.to_dict(), "rng_state": rank_state.rng_state}, directory / state_file)
    if average is not None:
        save_file(average.weights, str(directory / AVERAGE),
                  metadata={"decay": repr(average.decay), "updates": str(average.updates)})
    if job_state is not None:
        # Its fields are plain JSON already: `asdict`'s deep copy and indenting took 1.1 s of the training
        # thread for an outage's 100k-value metric backlog; this takes 0.1 s.
        (directory / JOB_STATE).write_text(json.dumps(vars(job_state)))
    files = {
        path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": storage.sha256_of(str(path))}
        for path in sorted(directory.rglob("*")) if path.is_file() and not path.name.endswith(".complete")
    }
    signature = signer.sign(_KIND, _signed_part(rank), files)
    (directory / marker).write_text(json.dumps({_FILES: files, _SIGNATURE: signature}, indent=1))


def read_job_state(directory: str) -> JobState:
    data = storage.read_json(storage.join(str(directory), JOB_STATE))
    if data is None:
        raise CheckpointError(f"{directory}: no {JOB_STATE}")
    return JobState(**data)


_KIND, _FILES, _SIGNATURE = "checkpoint", "files", "signature"


def _signed_part(rank: int) -> str:
    return f"rank {rank}"


def _markers(directory: str, world_size: int) -> list[tuple[dict, dict | None]] | None:
    """Each rank's marker: ({file: {size, sha256}}, its signature or None for an older release's
    unsigned marker), or None if one is missing or unreadable."""
    markers = []
    for rank in range(world_size):
        try:
            marker = storage.read_json(storage.join(directory, _rank_files(rank)[1]))
        except ValueError:
            return None
        if not isinstance(marker, dict):
            return None
        files, signature = (marker.get(_FILES), marker.get(_SIGNATURE)) if _SIGNATURE in marker else (marker, None)
        if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
            return None
        markers.append((files, signature))
    return markers


def is_complete(directory: str) -> bool:
    """True if every rank finished writing its files (sizes match the markers)."""
    directory = str(directory)
    try:
        job_state = read_job_state(directory)
    except (CheckpointError, OSError, ValueError, TypeError):
        return False
    markers = _markers(directory, job_state.world_size)
    if not markers:  # one missing, or a job state that claims no ranks (nothing would be checked)
        return False
    on_disk = storage.file_sizes(directory)
    return all(on_disk.get(name) == entry.get("size") for files, _ in markers for name, entry in files.items())


def check_signed(directory: str, signer: Signer, name: str = "") -> None:
    """Refuse (CheckpointError) a checkpoint that is incomplete, whose markers `signer`'s key did
    not sign, or whose signed job state holds another step than its name (`name`: the
    checkpoint's, where `directory` is a local copy; a name that is not a step's is not compared).
    Reads the markers and the job state only: cheap enough to sort a run's checkpoints."""
    directory = str(directory)
    if not is_complete(directory):
        raise CheckpointError(f"{directory} is incomplete (interrupted while being written, or not aiayn's); "
                              "not loading it")
    job_state = read_job_state(directory)
    markers = _markers(directory, job_state.world_size) or []
    for rank, (files, signature) in enumerate(markers):
        try:
            signer.check(_KIND, _signed_part(rank), files, signature, storage.join(directory, _rank_files(rank)[1]))
        except SignatureError as error:
            raise CheckpointError(str(error)) from None
    _check_file(directory, JOB_STATE, markers[0][0].get(JOB_STATE, {}).get("sha256"))
    named = _STEP_NAME.search(name or posixpath.basename(directory.rstrip("/")))
    if named and int(named.group(1)) != job_state.step:
        raise CheckpointError(f"{directory} holds step {job_state.step}, not the step its name says "
                              "(renamed after it was written); not loading it")


def _check_file(directory: str, name: str, recorded: str | None) -> None:
    if recorded is None:
        raise CheckpointError(f"{directory}/{name} was not written by aiayn with this checkpoint; not loading it")
    if storage.sha256_of(storage.join(directory, name)) != recorded:
        raise CheckpointError(f"{directory}/{name} has changed since it was written (sha256 differs); not loading it")


def verify(directory: str, signer: Signer, name: str = "") -> None:
    """Refuse (CheckpointError) a checkpoint its author's key did not sign (`check_signed`), any of
    whose files differs from what its ranks recorded, or that holds a file no rank wrote: its
    files are unpickled when loaded."""
    directory = str(directory)
    check_signed(directory, signer, name)
    recorded: dict[str, str] = {}
    for files, _ in _markers(directory, read_job_state(directory).world_size) or []:
        recorded.update({name: entry["sha256"] for name, entry in files.items()})
    for name in storage.file_sizes(directory):
        if not name.endswith(".complete"):
            _check_file(directory, name, recorded.get(name))


def saved_weight_average(directory: Path) -> tuple[dict[str, torch.Tensor], int] | None:
    """(weights, number of updates) of the checkpoint's moving average of the weights; None if it
    has none (saved before the run kept one)."""
    path = directory / AVERAGE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, int(handle.metadata()["updates"])


def load_weight_average(directory: Path, decay: float) -> WeightAverage | None:
    """The checkpoint's moving average of the weights, to be continued with `decay`."""
    saved = saved_weight_average(directory)
    return WeightAverage(decay, *saved) if saved is not None else None


def load_rank_state(directory: Path, rank: int) -> RankState:
    data = torch.load(directory / _rank_files(rank)[0], weights_only=True)  # tensors and plain data only
    return RankState(StreamPosition.from_dict(data["position"]), data["rng_state"])


def universal_copy(directory: Path, target: Path) -> None:
    """Convert the (verified) checkpoint's ZeRO shards into DeepSpeed's universal format in
    `target`, an empty directory the caller made for it."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ds_to_universal(argparse.Namespace(
        input_folder=str(directory / DEEPSPEED_DIR / DEEPSPEED_TAG), output_folder=str(target / DEEPSPEED_TAG),
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
        inject_missing_state=True,  # our model has no tensor-parallel layout to describe
    ))


# What DeepSpeed's own files hold besides tensors and plain data (ZeRO's optimizer state, stages
# 1-3 in fp32 and bf16; fp16's dynamic loss scaler): allowed by name, and nothing else unpickles.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.utils.tensor_fragment.fragment_address",
)


@contextlib.contextmanager
def weights_only_loads(directory: Path) -> Iterator[None]:
    """Every torch.load inside reads tensors, plain data and `DEEPSPEED_GLOBALS` only, DeepSpeed's
    own loads too (they pass weights_only=False; torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides
    that): a checkpoint that names anything else is refused in one line, never run. A second wall
    behind the signature (`verify`)."""
    allowed = [getattr(importlib.import_module(module), name)
               for module, name in (qualified.rsplit(".", 1) for qualified in DEEPSPEED_GLOBALS)]
    saved = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{directory}: DeepSpeed's files hold an object that is not plain data "
                              f"({str(error).splitlines()[0][:200]}); not loading it") from None
    finally:
        if saved is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = saved


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def load_engine_state(engine, directory: Path, universal: Path | None) -> None:
    """Load DeepSpeed's state: from `universal` (a universal-format copy, for another world size
    under ZeRO 1-3) or from the checkpoint's own files, reading plain data only."""
    with weights_only_loads(directory):
        load_path, _ = engine.load_checkpoint(
            str(universal if universal is not None else directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
    if load_path is None:
        raise CheckpointError(f"{directory}: DeepSpeed found no checkpoint to load")


def list_checkpoints(run_uri: str) -> list[str]:
    """Checkpoint directories of a run, oldest first, as URIs."""
    run_uri = str(run_uri)
    found = [(int(m.group(1)), name) for name in storage.list_dirs(run_uri) if (m := _STEP_NAME.search(name))]
    return [storage.join(run_uri, name) for _, name in sorted(found)]


def signed_checkpoints(run_uri: str, signer: Signer) -> tuple[list[str], dict[str, str]]:
    """The run's complete checkpoints signed with `signer`'s key, oldest first, and the other
    complete ones with why each is refused (planted, or from before signing)."""
    signed, refused = [], {}
    for candidate in list_checkpoints(run_uri):
        if not is_complete(candidate):
            continue
        try:
            check_signed(candidate, signer)
            signed.append(candidate)
        except CheckpointError as error:
            refused[candidate] = str(error)
    return signed, refused


def local_copy(directory: str, scratch: Path) -> Path:
    """The checkpoint as a local directory: itself when it is local, else a download into `scratch`."""
    if storage.is_local(directory):
        return storage.local_path(directory)
    target = scratch / directory.rstrip("/").rsplit("/", 1)[1]
    storage.copy_dir(directory, str(target))
    return target
