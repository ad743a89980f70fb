"""A rank's start from a checkpoint directory (jobs/train/start.py): which kind of start it
is and the state it continues, with a stand-in engine (the real one: tests/jobs/test_training.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_pipeline.stream import StreamPosition
from jobs import checkpoint as ckpt
from jobs.run.config import load_job_config
from jobs.train.start import Place, Start, start_rank

MANIFEST = SimpleNamespace(tokenizer_sha256="tok", fingerprint="data-v2")
ONE_RANK = Place(rank=0, world=1, local_rank=0)
SIGNER = ckpt.Signer(b"the account's own signing key, 32+ bytes")


class _Engine:
    """DeepSpeed's engine where start_rank touches it: its own files, written and read back."""

    def __init__(self) -> None:
        self.loaded_from = None

    def save_checkpoint(self, directory, tag, save_latest) -> None:
        (Path(directory) / tag).mkdir(parents=True)

    def load_checkpoint(self, directory, tag, **_) -> tuple[str, dict]:
        self.loaded_from = directory
        return directory, {}


@pytest.fixture
def engine(monkeypatch) -> _Engine:
    built = _Engine()
    monkeypatch.setattr("jobs.train.start.build_engine", lambda *args, load_universal: (built, "scheduler"))
    return built


def _checkpoint(tmp_path, position: StreamPosition, rng: torch.Tensor):
    saved = ckpt.JobState(step=30, epoch=1, world_size=1, launch_id="launch-1", mlflow_run_id="run-1",
                          pending_metrics=[{"key": "train/loss", "value": 3.0, "step": 30}], dataset_fingerprint="data-v1")
    ckpt.save_checkpoint(_Engine(), tmp_path / "checkpoint", 0, saved, ckpt.RankState(position, rng), SIGNER)
    return tmp_path / "checkpoint"


def test_a_fresh_start(engine) -> None:
    start = start_rank(load_job_config(None, []), MANIFEST, ONE_RANK, "launch-1", "run-1", None, "", SIGNER)
    assert (start.resumed_from_step, start.resized_from, start.restarted_in_run, start.rng) == (None, None, False, None)
    assert start.position == StreamPosition() and start.state.step == 0 and start.state.mlflow_run_id == "run-1"
    assert engine.loaded_from is None


def test_a_restart_inside_the_same_run_continues_its_state(tmp_path, engine) -> None:
    position = StreamPosition(epoch=1, window=2, batch=3, plan=((4, 5),), plan_window_units=6)
    rng = torch.random.manual_seed(5).get_state()
    start = start_rank(load_job_config(None, []), MANIFEST, ONE_RANK, "launch-1", "run-1",
                       _checkpoint(tmp_path, position, rng), "checkpoint", SIGNER)
    assert (start.resumed_from_step, start.resized_from, start.restarted_in_run) == (30, None, True)
    assert start.position == position and torch.equal(start.rng, rng)
    assert engine.loaded_from.startswith(str(tmp_path / "checkpoint"))
    assert start.state.pending_metrics and start.state.dataset_fingerprint == "data-v2"


def test_a_later_train_into_a_new_mlflow_run_drops_the_old_runs_unsent_metrics(tmp_path, engine) -> None:
    start = start_rank(load_job_config(None, []), MANIFEST, ONE_RANK, "launch-2", "run-2",
                       _checkpoint(tmp_path, StreamPosition(), torch.get_rng_state()), ckpt.checkpoint_dir_name(30),
                       SIGNER)
    assert (start.resumed_from_step, start.restarted_in_run) == (30, False)
    assert (start.state.launch_id, start.state.mlflow_run_id, start.state.pending_metrics) == ("launch-2", "run-2", [])


def test_a_checkpoint_changed_after_it_was_written_is_refused_before_loading(tmp_path, engine) -> None:
    directory = _checkpoint(tmp_path, StreamPosition(), torch.get_rng_state())
    part = directory / "rank_00000.pt"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size: only its sha256 tells
    part.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="has changed since it was written"):
        start_rank(load_job_config(None, []), MANIFEST, ONE_RANK, "launch-1", "run-1", directory, "checkpoint", SIGNER)
    assert engine.loaded_from is None


def _rewrite_marker(directory, change) -> None:
    """What someone with write access to the storage but not the key can do: change the marker."""
    marker = directory / "rank_00000.complete"
    record = json.loads(marker.read_text())
    change(record)
    marker.write_text(json.dumps(record))


def test_only_a_checkpoint_signed_with_the_accounts_key_under_its_own_step_is_loaded(tmp_path, engine) -> None:
    directory = _checkpoint(tmp_path, StreamPosition(), torch.get_rng_state())
    job = load_job_config(None, [])
    with pytest.raises(ckpt.CheckpointError, match="signed with another key"):
        start_rank(job, MANIFEST, ONE_RANK, "launch-1", "run-1", directory, "checkpoint",
                   ckpt.Signer(b"another account's signing key, 32+ bytes"))
    with pytest.raises(ckpt.CheckpointError, match="holds step 30, not the step its name says"):  # replayed later
        start_rank(job, MANIFEST, ONE_RANK, "launch-1", "run-1", directory, "checkpoint_step00000099", SIGNER)
    assert engine.loaded_from is None
    # a job state that claims no ranks, so that no marker would be checked: incomplete
    state_file = directory / ckpt.JOB_STATE
    saved = state_file.read_text()
    state_file.write_text(saved.replace('"world_size": 1', '"world_size": 0'))
    with pytest.raises(ckpt.CheckpointError, match="is incomplete"):
        start_rank(job, MANIFEST, ONE_RANK, "launch-1", "run-1", directory, "checkpoint", SIGNER)
    state_file.write_text(saved)
    # a planted payload with its sha256 and size rewritten in the marker: integrity holds, authorship not
    part = directory / "rank_00000.pt"
    part.write_bytes(b"a pickle of someone else's" + part.read_bytes()[26:])
    forged = {"size": part.stat().st_size, "sha256": hashlib.sha256(part.read_bytes()).hexdigest()}
    _rewrite_marker(directory, lambda record: record["files"].update({"rank_00000.pt": forged}))
    with pytest.raises(ckpt.CheckpointError, match="signature does not match"):
        start_rank(job, MANIFEST, ONE_RANK, "launch-1", "run-1", directory, "checkpoint", SIGNER)
    # an older release's unsigned marker: refused, naming the one option that loads it
    _rewrite_marker(directory, lambda record: (record.clear(), record.update({"rank_00000.pt": forged})))
    with pytest.raises(ckpt.CheckpointError, match="is not signed .*train.accept_unsigned_checkpoints=true"):
        start_rank(job, MANIFEST, ONE_RANK, "launch-1", "run-1", directory, "checkpoint", SIGNER)
    assert engine.loaded_from is None


def test_an_older_releases_unsigned_checkpoint_loads_with_the_option(tmp_path, engine) -> None:
    directory = _checkpoint(tmp_path, StreamPosition(), torch.get_rng_state())
    _rewrite_marker(directory, lambda record: (record.update(record.pop("files")), record.pop("signature")))
    start = start_rank(load_job_config(None, ["train.accept_unsigned_checkpoints=true"]), MANIFEST, ONE_RANK,
                       "launch-1", "run-1", directory, "checkpoint", ckpt.Signer(SIGNER.key, accept_unsigned=True))
    assert start.resumed_from_step == 30 and engine.loaded_from is not None


def test_a_resize_says_which_kind_it_is() -> None:
    def start(resized_from, restarted_in_run):
        return Start(None, None, ckpt.JobState(), None, StreamPosition(), None, resumed_from_step=30,
                     resized_from=resized_from, restarted_in_run=restarted_in_run)

    assert start(None, True).resize(2) is None
    assert start(4, True).resize(2) == "4 -> 2 workers (capacity lost: a node left or failed)"
    assert start(2, True).resize(4) == "2 -> 4 workers (capacity returned)"
    assert start(2, False).resize(1) == "2 -> 1 workers (resumed with another cluster.num_workers)"
