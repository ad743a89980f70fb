"""Where a submitted job's locations go: never into Ray's temporary copy of the project."""

from __future__ import annotations

import pytest

from cluster.job_environment import JOB_STORAGE, job_location, runtime_env
from data_pipeline.errors import InputError
from jobs.cli import main

IN_A_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # what Ray's job supervisor sets for the entrypoint


def test_outside_a_job_locations_are_unchanged(monkeypatch) -> None:
    monkeypatch.delenv(IN_A_JOB, raising=False)
    monkeypatch.setenv(JOB_STORAGE, "s3://aiayn")
    assert job_location("data.output_dir", "data") == "data"


def test_in_a_job_of_the_local_cluster_relative_locations_go_to_its_bucket(monkeypatch) -> None:
    monkeypatch.setenv(IN_A_JOB, "{}")
    monkeypatch.setenv(JOB_STORAGE, "s3://aiayn/")
    assert job_location("data.output_dir", "data") == "s3://aiayn/data"
    assert job_location("cluster.storage_path", "./runs/") == "s3://aiayn/runs"
    assert job_location("cluster.storage_path", "/mnt/shared/runs") == "/mnt/shared/runs"
    assert job_location("data.output_dir", "gs://other/data") == "gs://other/data"


def test_in_another_job_a_relative_location_is_refused_in_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv(IN_A_JOB, "{}")
    monkeypatch.delenv(JOB_STORAGE, raising=False)
    with pytest.raises(InputError, match=r"^cluster.storage_path=runs: a relative path inside a Ray job"):
        job_location("cluster.storage_path", "runs")
    assert main(["prepare", "data.output_dir=prepared"]) == 2  # before any cluster contact
    error = capsys.readouterr().err.strip()
    assert error.startswith("aiayn prepare: error: data.output_dir=prepared: a relative path") and "\n" not in error


def test_submit_tells_the_job_where_the_cluster_keeps_data() -> None:
    assert runtime_env([], "", "s3://aiayn")["env_vars"][JOB_STORAGE] == "s3://aiayn"
    assert JOB_STORAGE not in runtime_env([], "")["env_vars"]
