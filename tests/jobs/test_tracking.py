"""One MLflow run per run name; a restarted logger never logs a (key, step) twice."""

from __future__ import annotations

import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from cluster.services import free_port, start_mlflow_server
from jobs.report.tracking import MetricLogger, find_or_create_run


def test_same_name_finds_the_same_run_and_steps_are_logged_once(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, created = find_or_create_run(uri, "exp", "my-run", {"train.max_steps": 10}, {"zero_stage": "2"})
    again, created_again = find_or_create_run(uri, "exp", "my-run", {"train.max_steps": 10}, {})
    assert created and not created_again and again == run_id
    other, _ = find_or_create_run(uri, "exp", "other-run", {}, {})
    assert other != run_id

    first = MetricLogger(uri, run_id)
    for step in range(1, 8):
        first.log({"train/loss": 10.0 - step}, step)
    assert first.close(timeout_s=30) == 0
    # The process dies after step 7; the checkpoint was at step 5, so steps 6..10 run again.
    resumed = MetricLogger(uri, run_id)
    resumed.restore_spool([{"key": "train/loss", "value": 50.0, "timestamp": 0, "step": 5}])  # sent before the crash
    for step in range(6, 11):
        resumed.log({"train/loss": 100.0 + step, "valid/loss": 1.0}, step)
    assert resumed.close(timeout_s=30) == 0
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    values = {m.step: m.value for m in history}
    assert values[7] == 3.0 and values[8] == 108.0  # the first value of each step is kept
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "valid/loss")] == [6, 7, 8, 9, 10]
    assert MlflowClient(uri).get_run(run_id).data.params["train.max_steps"] == "10"


@pytest.fixture
def silent_server(monkeypatch):
    """The URL of a server that takes connections and never answers (each request would block for
    the client's 30 s timeout)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        yield f"http://127.0.0.1:{silent.getsockname()[1]}"


def test_logging_never_waits_for_a_server_that_does_not_answer(silent_server) -> None:
    """The training thread's calls return at once and everything stays queued."""
    said: list[str] = []
    logger = MetricLogger(silent_server, "0" * 32, say=said.append)
    started = time.monotonic()
    for step in range(1, 201):
        logger.log({"train/loss": 1.0, "train/lr": 0.1}, step)
    logger.set_tags({"world_size": "2"})
    assert time.monotonic() - started < 10  # the sender's first request alone waits 30 s
    assert logger.pending() == 400 and said == []  # still waiting for the first answer
    assert [m["step"] for m in logger.spool()][:3] == [1, 1, 2]  # what a checkpoint now would keep
    logger.close(timeout_s=0)


def test_a_long_outage_thins_the_backlog_and_keeps_the_newest_values(silent_server) -> None:
    """Past its cap the backlog keeps every 2nd, then 4th, ... step of each metric: the whole
    outage evenly, its newest stretch included."""
    said: list[str] = []
    logger = MetricLogger(silent_server, "0" * 32, say=said.append, max_backlog=100)
    for step in range(1, 1001):
        logger.log({"train/loss": float(step), "train/lr": 0.1}, step)
    spooled = logger.spool()
    logger.close(timeout_s=0)
    assert 50 <= len(spooled) <= 100 and len(said) == 1 and "keeping every second step" in said[0]
    for key in ("train/loss", "train/lr"):
        steps = [m["step"] for m in spooled if m["key"] == key]
        stride = steps[1] - steps[0]
        assert steps == list(range(stride, 1001, stride)), steps  # evenly over the whole outage
        assert steps[-1] > 1000 - stride and steps[0] <= stride  # its newest stretch and its start kept
    assert all(m["value"] == float(m["step"]) for m in spooled if m["key"] == "train/loss")


@pytest.mark.slow
def test_an_outage_loses_no_metric_and_logs_none_twice(tmp_path, monkeypatch) -> None:
    """The server goes down, the trainer dies during the outage and restarts from its checkpoint
    (whose spool holds what was not sent), the server comes back: every step exactly once, and the
    console is told when the server went and when it came back."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a short client budget: tracking.http_retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")  # a stopped server refuses at once
    monkeypatch.setattr(MetricLogger, "RETRY_S", (0.2, 1.0))  # and short pauses between attempts
    port, store = free_port(), tmp_path / "store"
    server, url = start_mlflow_server(tmp_path / "logs", store, port=port)
    try:
        run_id, _ = find_or_create_run(url, "exp", "outage", {}, {})
        said: list[str] = []
        first = MetricLogger(url.replace("http://", "http://aiayn:s3cret@"), run_id, say=said.append)  # ignored by the server
        for step in range(1, 6):
            first.log({"train/loss": float(step)}, step)
        assert first.drain(timeout_s=30) == 0
        server.stop()  # the outage begins
        for step in range(6, 11):
            first.log({"train/loss": float(step)}, step)
        assert first.drain(timeout_s=3) == 5
        assert len(said) == 1 and "is unreachable" in said[0] and "training goes on" in said[0]
        assert "s3cret" not in said[0]  # the URI is shown without its credentials
        spooled = first.spool()  # saved with the checkpoint of step 10; then the trainer dies
        first.close(timeout_s=0)
        restarted = MetricLogger(url, run_id, say=said.append)
        restarted.restore_spool(spooled)
        for step in range(11, 13):
            restarted.log({"train/loss": float(step)}, step)
        assert restarted.drain(timeout_s=3) == 7
        server, _ = start_mlflow_server(tmp_path / "logs", store, port=port)  # the server is back
        assert restarted.close(timeout_s=60) == 0
        assert "reachable again" in said[-1]
        history = MlflowClient(url).get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 13))
        assert all(m.value == float(m.step) for m in history)
    finally:
        server.stop()
