"""The run's reports: on the driver, MLflow failing never fails a run, and the console says what is
missing and where it is instead; in the workers, only rank 0's report reaches anyone."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from cluster.config import ClusterConfig
from cluster.services import free_port
from data_pipeline.stream import StreamPosition
from jobs.checkpoint import JobState
from jobs.report.goodput import GoodputLedger
from jobs.report.tracking import find_or_create_run
from jobs.run.config import TrainConfig
from jobs.run.layout import RunLayout
from jobs.run.lease import LeaseLost
from jobs.train.cadence import Cadence
from jobs.train.run_report import RankReport, RunReport
from jobs.train.start import Start


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


def test_rank_zero_reports_to_the_console_and_mlflow_other_ranks_to_no_one(tmp_path, capsys) -> None:
    """Rank 0's lines reach the console (printed without a relay) and its metrics, tags and the
    backlog of the checkpoint it started from reach MLflow; rank 1's calls deliver nothing."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = find_or_create_run(uri, "exp", "r1", {}, {})
    carried = [{"key": "train/loss", "value": 5.0, "timestamp": 1, "step": 1}]
    zero, one = (RankReport.of_rank(rank, None, uri, run_id, carried) for rank in (0, 1))
    assert zero.active and not one.active
    for report, rank in ((zero, 0), (one, 1)):
        report.line(f"hello from rank {rank}")
        report.log({"train/loss": 4.0 + rank}, step=2)
        report.set_tags({"world_size": 2 + rank})
    assert one.unsent() == []
    zero.close(timeout_s=30)
    one.close(timeout_s=30)
    assert capsys.readouterr().out == "hello from rank 0\n"
    client = MlflowClient(uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert history == [(1, 5.0), (2, 4.0)]
    assert client.get_run(run_id).data.tags["world_size"] == "2"


def test_rank_zero_announces_a_resized_restart_and_publishes_only_while_it_holds_the_lease(tmp_path, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = find_or_create_run(uri, "exp", "r1", {}, {})
    fenced: list[str] = []
    lease_held = True

    def fence(what: str) -> None:
        fenced.append(what)
        if not lease_held:
            raise LeaseLost(f"{what}: another driver holds this run")

    zero, one = (RankReport.of_rank(rank, None, uri, run_id, [], fence) for rank in (0, 1))
    start = Start(None, None, JobState(step=40), None, StreamPosition(), None, resumed_from_step=40, resized_from=4,
                  restarted_in_run=True)
    for report in (zero, one):
        report.started(start, world=2, zero_stage=2, nodes=["a/1", "b/2"], accumulation=2, peak=(1.5e12, "measured"))
    cadence = Cadence(TrainConfig(max_steps=100, max_minutes=0))
    window = {"train/loss": 3.5, "train/ppl": 30.0, "train/lr": 1e-3, "train/tokens_per_s": 900.0,
              "train/step_time_s": 0.5, "train/data_wait_s": 0.002}
    for report in (zero, one):
        report.publish(50, window, cadence, elapsed_s=25.0)
        report.publish(51, {}, cadence, elapsed_s=26.0)  # nothing to publish: no lease check either
    assert fenced == ["the metrics of step 50"]
    lease_held = False
    with pytest.raises(LeaseLost):
        zero.publish(60, {**window, "valid/loss": 3.0, "valid/ppl": 20.0}, cadence, elapsed_s=30.0)
    one.publish(60, window, cadence, elapsed_s=30.0)  # other ranks neither write nor check
    zero.close(timeout_s=30)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["step 40  resized: 4 -> 2 workers (capacity lost: a node left or failed)",
                         "training from step 40 on 2 workers (ZeRO-2, 2 nodes, 2 micro-batches per step, peak 1.50 "
                         "TFLOP/s per worker: measured)"]
    assert lines[2].startswith("step 50/100  loss 3.500") and lines[2].endswith("ETA 0m25s") and len(lines) == 3
    client = MlflowClient(uri)
    tags = client.get_run(run_id).data.tags
    assert tags["resize.step00000040"] == "4 -> 2 workers (capacity lost: a node left or failed)"
    assert (tags["resumed_from_step"], tags["node.rank1"], tags["world_size"]) == ("40", "b/2", "2")
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(50, 3.5)]
