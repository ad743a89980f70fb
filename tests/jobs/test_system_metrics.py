"""Each node's system figures go to the run, and a monitor that stopped is started again."""

from __future__ import annotations

import socket
import time

from mlflow.tracking import MlflowClient

from jobs.report.system_metrics import NodeSystemMetrics
from jobs.report.tracking import find_or_create_run


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_node_reports_its_figures_under_its_label_and_a_stopped_monitor_resumes(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = find_or_create_run(uri, "exp", "system", {}, {})
    client = MlflowClient(uri)
    node = NodeSystemMetrics(run_id, uri, "0123456789abcdef", interval_s=0.5)
    key = f"system/{socket.gethostname()}-01234567/system_memory_usage_megabytes"
    try:
        _wait_for(lambda: len(_steps(client, run_id, key)) >= 2)
        node.monitor.finish()  # as MLflow's own monitor does once the server cannot be reached
        before = _steps(client, run_id, key)
        _wait_for(lambda: len(_steps(client, run_id, key)) >= len(before) + 2)
    finally:
        node.finish()
    after = _steps(client, run_id, key)
    assert after == sorted(set(after)) and after[: len(before)] == before  # numbering goes on, no step twice
    assert client.get_metric_history(run_id, key)[0].value > 0
