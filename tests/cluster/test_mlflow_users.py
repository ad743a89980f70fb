"""A job's own MLflow user on a real `mlflow server` with its basic-auth app: it writes to what
its command names and can touch nothing else, least of all a registered model or another user."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException, RestException
from mlflow.server.auth.client import AuthServiceClient
from mlflow.tracking import MlflowClient

from cluster.credentials import mlflow_login
from cluster.mlflow_users import job_login
from cluster.services import start_mlflow_server


def _as(monkeypatch, login: dict[str, str]) -> None:
    for name, value in login.items():
        monkeypatch.setenv(name, value)


def test_a_job_user_writes_its_own_experiment_and_model_and_nothing_else(tmp_path, monkeypatch) -> None:
    admin = mlflow_login(tmp_path / "credentials")
    service, url = start_mlflow_server(tmp_path / "logs", tmp_path / "store", login=admin)
    try:
        _as(monkeypatch, admin.client_environment())
        client = MlflowClient(url)
        private = client.create_experiment("the owner's own")
        client.create_registered_model("someone-elses-model")

        first = job_login(url, admin, "first", "shared-experiment", "translator")
        second = job_login(url, admin, "second", "shared-experiment", "translator")
        other = job_login(url, admin, "other", "other-experiment")
        assert len({first["MLFLOW_TRACKING_USERNAME"], second["MLFLOW_TRACKING_USERNAME"]}) == 2
        assert not AuthServiceClient(url).get_user(first["MLFLOW_TRACKING_USERNAME"]).is_admin

        _as(monkeypatch, first)
        experiment = client.get_experiment_by_name("shared-experiment").experiment_id
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "train/loss", 1.5, step=1)
        client.set_registered_model_tag("translator", "bleu", "34.7")  # EDIT on its model
        for forbidden in (lambda: client.delete_registered_model("translator"),  # not MANAGE: it cannot replace it
                          lambda: client.set_registered_model_tag("someone-elses-model", "x", "y"),
                          lambda: client.get_experiment(private),
                          lambda: AuthServiceClient(url).create_user("mallory", "a-password-of-mine"),
                          lambda: AuthServiceClient(url).grant_user_permission(
                              first["MLFLOW_TRACKING_USERNAME"], "experiment", private, "MANAGE")):
            with pytest.raises((RestException, MlflowException), match="PERMISSION_DENIED|403|Permission denied"):
                forbidden()

        _as(monkeypatch, second)  # a later job of the same experiment resumes the run and adds to it
        client.log_metric(run.info.run_id, "train/loss", 1.2, step=2)
        _as(monkeypatch, other)  # a job of another experiment reads none of it
        with pytest.raises((RestException, MlflowException), match="PERMISSION_DENIED|403|Permission denied"):
            client.get_run(run.info.run_id)
        _as(monkeypatch, admin.client_environment())
        assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1.5, 1.2]
        assert client.get_registered_model("translator").tags == {"bleu": "34.7"}
    finally:
        service.stop()
