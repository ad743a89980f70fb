"""The driver's report: MLflow failing never fails a run, and the console says what is missing and
where it is instead."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig
from cluster.services import free_port
from jobs.goodput import GoodputLedger
from jobs.run_layout import RunLayout
from jobs.run_report import RunReport


@pytest.fixture
def unreachable_mlflow(monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_a_hangs_stacks_are_kept_in_the_run_when_mlflow_is_down(tmp_path, unreachable_mlflow) -> None:
    lines: list[str] = []
    layout = RunLayout.of(ClusterConfig(storage_path=str(tmp_path)), "r1")
    RunReport(lines.append, unreachable_mlflow, "0" * 32, layout).hang("rank 1 is hung", "Thread 1: wait()")
    kept = list((tmp_path / "r1" / "hangs").iterdir())
    assert len(kept) == 1 and kept[0].read_text() == "Thread 1: wait()"
    assert lines[0] == "rank 1 is hung"
    assert lines[-1].startswith("MLflow did not take the stacks (") and lines[-1].endswith(f"they are in {kept[0]}")


def test_the_ledger_not_sent_is_one_console_line_not_a_failed_run(tmp_path, unreachable_mlflow) -> None:
    lines: list[str] = []
    layout = RunLayout.of(ClusterConfig(storage_path=str(tmp_path)), "r1")
    ledger = GoodputLedger()
    ledger.add("training", 10.0)
    RunReport(lines.append, unreachable_mlflow, "0" * 32, layout).ledger(ledger, step=5)
    assert len(lines) == 1 and lines[0].startswith("logging the end of the run to MLflow failed (")
    assert "\n" not in lines[0]
