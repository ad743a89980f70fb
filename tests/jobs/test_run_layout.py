"""The run's layout: every path of a run from one object, local or in an object store."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from cluster.config import ClusterConfig
from data_pipeline.errors import InputError
from jobs.run.layout import RunLayout


def test_a_local_run_keeps_everything_under_its_directory(tmp_path) -> None:
    layout = RunLayout.of(ClusterConfig(storage_path=str(tmp_path)), "r1")
    assert Path(layout.uri) == tmp_path / "r1"
    assert Path(layout.export_uri).parent == tmp_path / "r1"
    assert Path(layout.hang_stacks_uri("h.txt")).parent.parent == tmp_path / "r1"
    assert layout.log_path.parent == tmp_path / "r1"


def test_an_object_store_run_keeps_its_log_on_this_machine() -> None:
    layout = RunLayout.of(ClusterConfig(storage_path="s3://bucket/runs"), "r1")
    assert layout.uri == "s3://bucket/runs/r1" and layout.export_uri == "s3://bucket/runs/r1/export"
    log_dir = layout.log_path.parent  # object stores take no appends: this machine's, this account's alone
    assert log_dir.is_relative_to(tempfile.gettempdir()) and log_dir.stat().st_uid == os.getuid()
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700


def test_a_relative_root_is_refused_workers_run_elsewhere() -> None:
    with pytest.raises(ValueError, match="not absolute yet"):
        RunLayout.of(ClusterConfig(storage_path="runs"), "r1")


def test_the_workers_receive_the_same_layout(tmp_path) -> None:
    layout = RunLayout.of(ClusterConfig(storage_path=str(tmp_path), staging_dir=str(tmp_path / "st")), "r1")
    assert RunLayout.from_dict(layout.to_dict()) == layout


def test_an_unwritable_root_names_the_key(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cluster.storage_path"):
        RunLayout.of(ClusterConfig(storage_path=str(blocker / "runs")), "r1").check_writable()


def test_scratch_lands_on_the_staging_disk_and_goes(tmp_path) -> None:
    layout = RunLayout.of(ClusterConfig(storage_path=str(tmp_path), staging_dir=str(tmp_path / "staging")), "r1")
    (tmp_path / "staging").mkdir()
    with layout.scratch("aiayn-test-") as scratch:
        assert scratch.parent == tmp_path / "staging"
        (scratch / "part").write_text("x")
    assert not scratch.exists()
