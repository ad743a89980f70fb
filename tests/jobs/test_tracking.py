"""One MLflow run per run name; a restarted logger never logs a (key, step) twice."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from jobs.tracking import MetricLogger, find_or_create_run


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
    first.flush()
    # The process dies after step 7; the checkpoint was at step 5, so steps 6..10 run again.
    resumed = MetricLogger(uri, run_id)
    for step in range(6, 11):
        resumed.log({"train/loss": 100.0 + step, "valid/loss": 1.0}, step)
    resumed.flush()
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    values = {m.step: m.value for m in history}
    assert values[7] == 3.0 and values[8] == 108.0  # the first value of each step is kept
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "valid/loss")] == [6, 7, 8, 9, 10]
    assert MlflowClient(uri).get_run(run_id).data.params["train.max_steps"] == "10"
