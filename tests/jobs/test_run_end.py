"""`aiayn end`: a run whose driver was killed, and that will not be resumed, is marked ended in
MLflow without training; never while a driver still trains it."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from data_pipeline import storage
from jobs.cli import main
from jobs.report.tracking import find_or_create_run
from jobs.run.lease import acquire


@pytest.fixture
def killed_run(tmp_path) -> tuple[list[str], str, str]:
    """A run left RUNNING in MLflow, as a driver SIGKILLed mid-run leaves it: (overrides, tracking
    URI, its MLflow run id)."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage.write_bytes_atomic(str(tmp_path / "runs" / "abandoned" / "aiayn.log"), b"step 10 ...\n")
    run_id, _ = find_or_create_run(tracking, "aiayn", "abandoned", {}, {})
    return [f"cluster.storage_path={tmp_path / 'runs'}", f"tracking.uri={tracking}"], tracking, run_id


def test_a_killed_run_is_marked_ended_once(killed_run, capsys) -> None:
    overrides, tracking, run_id = killed_run
    assert MlflowClient(tracking).get_run(run_id).info.status == "RUNNING"
    assert main(["end", "--name", "abandoned", *overrides]) == 0
    assert MlflowClient(tracking).get_run(run_id).info.status == "KILLED"
    assert f"MLflow run {run_id} marked KILLED" in capsys.readouterr().out
    assert main(["end", "--name", "abandoned", "--status", "FAILED", *overrides]) == 0
    assert "already KILLED in MLflow; nothing to do" in capsys.readouterr().out
    assert MlflowClient(tracking).get_run(run_id).info.status == "KILLED"


def test_a_run_that_a_driver_still_trains_is_not_ended(killed_run, tmp_path, capsys) -> None:
    overrides, tracking, run_id = killed_run
    acquire(str(tmp_path / "runs" / "abandoned"), "abandoned", ttl_s=60)  # a live driver: this process
    assert main(["end", "--name", "abandoned", *overrides]) == 2
    assert "run abandoned is being trained by another driver" in capsys.readouterr().err
    assert MlflowClient(tracking).get_run(run_id).info.status == "RUNNING"


def test_a_run_that_is_not_there_is_named(tmp_path, capsys) -> None:
    assert main(["end", "--name", "never-ran", f"cluster.storage_path={tmp_path / 'runs'}",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    assert "run never-ran: nothing at" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "never-ran").exists()
