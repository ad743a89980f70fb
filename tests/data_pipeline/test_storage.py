"""Storage through URIs against a real S3-compatible server and the local disk alike: what the
checkpoint, export and dataset code relies on when nodes share no disk."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from data_pipeline import storage
from data_pipeline.errors import InputError
from data_pipeline.manifest import CURRENT, MANIFEST, VERSIONS, commit_version, load_manifest, new_version_uri
from jobs import checkpoint as ckpt
from tests.jobs.helpers import newest_complete


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('object_store')}/{uuid.uuid4().hex[:8]}"


def _tree(directory: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return directory


def test_copy_round_trip_and_listing(root, tmp_path) -> None:
    source = _tree(tmp_path / "src", {"a.txt": b"alpha", "deep/b.bin": b"\x00" * 70_000})
    storage.copy_dir(str(source), storage.join(root, "tree"))
    assert storage.file_sizes(storage.join(root, "tree")) == {"a.txt": 5, "deep/b.bin": 70_000}
    assert storage.list_dirs(storage.join(root, "tree")) == ["deep"]
    storage.copy_dir(storage.join(root, "tree"), str(tmp_path / "back"))
    assert (tmp_path / "back" / "deep" / "b.bin").read_bytes() == b"\x00" * 70_000
    with storage.open_input(storage.join(root, "tree", "a.txt")) as handle:
        assert handle.read() == b"alpha"


def test_publish_replaces_only_what_aiayn_wrote(root, tmp_path) -> None:
    first = _tree(tmp_path / "v1", {"weights": b"1" * 10, "old-only": b"x", "export.json": b"{}"})
    second = _tree(tmp_path / "v2", {"weights": b"2" * 20, "export.json": b'{"v": 2}'})
    target = storage.join(root, "export")
    storage.publish_directory(first, target, "export.json")
    storage.publish_directory(second, target, "export.json")
    assert storage.read_text(storage.join(target, "export.json")) == '{"v": 2}'
    assert storage.file_sizes(target)["weights"] == 20
    foreign = storage.join(root, "someone-elses")
    storage.write_bytes_atomic(storage.join(foreign, "notes.txt"), b"keep")
    with pytest.raises(InputError, match="not aiayn's"):
        storage.publish_directory(second, foreign, "export.json")
    assert storage.read_text(storage.join(foreign, "notes.txt")) == "keep"


# The fake checkpoints below carry an older release's unsigned markers (signing: tests/jobs)
_OLDER_RELEASE = ckpt.Signer(b"k" * 32, accept_unsigned=True)


def _fake_checkpoint(directory: str, step: int, world_size: int) -> None:
    """The layout save_checkpoint wrote before signing: files, then each rank's marker with their
    size and sha256."""
    def entry(name: str) -> dict:
        uri = storage.join(directory, name)
        return {"size": storage.file_sizes(directory)[name], "sha256": storage.sha256_of(uri)}

    storage.write_bytes_atomic(storage.join(directory, ckpt.JOB_STATE), json.dumps({"step": step, "world_size": world_size}).encode())
    for rank in range(world_size):
        shard = f"deepspeed/state/shard_{rank}.pt"
        storage.write_bytes_atomic(storage.join(directory, shard), bytes(100 + rank))
        marker = {shard: entry(shard), ckpt.JOB_STATE: entry(ckpt.JOB_STATE)}
        storage.write_bytes_atomic(storage.join(directory, f"rank_{rank:05d}.complete"), json.dumps(marker).encode())


def test_checkpoint_completeness_and_listing_through_uris(root, tmp_path) -> None:
    run = storage.join(root, "run")
    for step in (5, 10, 15):
        _fake_checkpoint(storage.join(run, ckpt.checkpoint_dir_name(step)), step, world_size=2)
    newest = storage.join(run, ckpt.checkpoint_dir_name(15))
    storage.write_bytes_atomic(storage.join(newest, "deepspeed/state/shard_1.pt"), b"cut short")
    assert [u.rsplit("/", 1)[1] for u in ckpt.list_checkpoints(run)] == [ckpt.checkpoint_dir_name(s) for s in (5, 10, 15)]
    assert not ckpt.is_complete(newest)
    assert newest_complete(run) == storage.join(run, ckpt.checkpoint_dir_name(10))
    local = ckpt.local_copy(newest_complete(run), tmp_path / "scratch")
    assert ckpt.read_job_state(str(local)).step == 10 and (local / "deepspeed" / "state" / "shard_1.pt").stat().st_size == 101
    ckpt.verify(str(local), _OLDER_RELEASE)  # the download is byte for byte what the ranks recorded
    storage.write_bytes_atomic(storage.join(run, ckpt.checkpoint_dir_name(10), "deepspeed/state/shard_0.pt"), bytes([1]) * 100)
    with pytest.raises(ckpt.CheckpointError, match="has changed"):  # same size, other bytes: checked remotely too
        ckpt.verify(storage.join(run, ckpt.checkpoint_dir_name(10)), _OLDER_RELEASE)


def _write_version(dataset: str, fingerprint: str, complete: bool = True) -> str:
    version = new_version_uri(dataset, fingerprint)
    storage.write_bytes_atomic(storage.join(version, "train", "part-00000.parquet"), b"rows")
    if complete:
        manifest = {"schema_version": 1, "fingerprint": fingerprint, "tokenizer": {}, "splits": {}}
        storage.write_bytes_atomic(storage.join(version, MANIFEST), json.dumps(manifest).encode())
    return version


def test_versions_swap_atomically_and_old_ones_are_pruned(root) -> None:
    dataset = storage.join(root, "data", "corpus")
    made = []
    for number in range(4):
        made.append(_write_version(dataset, f"{number:02d}" * 6))
        commit_version(dataset, made[-1])
        assert load_manifest(dataset).uri == made[-1]
    kept = storage.list_dirs(storage.join(dataset, VERSIONS))
    assert kept == sorted(v.rsplit("/", 1)[1] for v in made[-2:])  # the current one and the one before
    assert load_manifest(made[-2]).data["fingerprint"] == "02" * 6  # a reader pinned to it still reads it
    in_flight = _write_version(dataset, "ff" * 6, complete=False)  # another prepare, still writing
    commit_version(dataset, _write_version(dataset, "aa" * 6))
    assert in_flight.rsplit("/", 1)[1] in storage.list_dirs(storage.join(dataset, VERSIONS))  # never removed while it may still be written
    assert json.loads(storage.read_text(storage.join(dataset, CURRENT)))["version"] in storage.list_dirs(
        storage.join(dataset, VERSIONS))


def test_an_unfinished_version_is_pruned_by_the_age_of_its_files_not_of_its_name(tmp_path) -> None:
    """A version's name carries the writer's clock; whether it was abandoned is judged by when its
    files were last written, by the store's clock (here the local disk's)."""
    dataset = str(tmp_path / "corpus")
    abandoned = _write_version(dataset, "ab" * 6, complete=False)
    recent_name_old_files = _write_version(dataset, "cd" * 6, complete=False)
    day_ago = time.time() - 25 * 3600
    for version in (abandoned, recent_name_old_files):
        for path in Path(version).rglob("*"):
            os.utime(path, (day_ago, day_ago))
    still_written = storage.join(dataset, VERSIONS, "20000101T000000Z-ef-000000")  # a name from a wrong clock
    storage.write_bytes_atomic(storage.join(still_written, "train", "part-00000.parquet"), b"rows")
    commit_version(dataset, _write_version(dataset, "aa" * 6))
    left = storage.list_dirs(storage.join(dataset, VERSIONS))
    assert Path(still_written).name in left
    assert Path(abandoned).name not in left and Path(recent_name_old_files).name not in left
    assert not [name for name in os.listdir(Path(dataset, VERSIONS)) if name.startswith(".clock")]


def test_a_failing_prune_leaves_the_committed_version_current_and_readable(root, monkeypatch, capsys) -> None:
    dataset = storage.join(root, "data", "corpus")
    for number in range(3):
        commit_version(dataset, _write_version(dataset, f"{number:02d}" * 6))

    def refuse(uri: str) -> None:
        raise PermissionError(f"{uri}: AccessDenied")

    monkeypatch.setattr(storage, "delete_dir", refuse)
    newest = _write_version(dataset, "ee" * 6)
    commit_version(dataset, newest)  # does not raise: the commit stands
    assert load_manifest(dataset).uri == newest and load_manifest(dataset).data["fingerprint"] == "ee" * 6
    assert "old versions not removed" in capsys.readouterr().err
