"""Secrets travel only when named, and never appear where aiayn prints, logs or stores config."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from cluster.job_environment import runtime_env
from data_pipeline.errors import InputError
from data_pipeline.storage import redact
from jobs.run.config import flatten, load_job_config, public_config


def test_a_job_gets_no_secret_unless_it_is_named(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdef")
    monkeypatch.setenv("AIAYN_TORCH_SPEC", "torch==2.6.0")
    plain = runtime_env([], "http://127.0.0.1:5000")["env_vars"]
    assert plain == {"AIAYN_TORCH_SPEC": "torch==2.6.0", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    named = runtime_env(["HF_TOKEN"])["env_vars"]
    assert named["HF_TOKEN"] == "hf_abcdef" and "AWS_SECRET_ACCESS_KEY" not in named
    with pytest.raises(InputError, match="--env NOT_SET_ANYWHERE"):
        runtime_env(["NOT_SET_ANYWHERE"])
    with pytest.raises(InputError, match="holds credentials"):
        runtime_env([], "https://alice:hunter2@mlflow.example.com")
    monkeypatch.setenv("AIAYN_TORCH_SPEC", "torch --index-url https://alice:hunter2@pypi.example.com/simple")
    assert "AIAYN_TORCH_SPEC" not in runtime_env([])["env_vars"]  # configuration, unless it carries a login


def test_credentials_in_uris_are_redacted() -> None:
    assert redact("https://alice:hunter2@mlflow.example.com/x") == "https://***@mlflow.example.com/x"
    assert redact("postgresql://u:p@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    signed = redact("https://bucket.s3.amazonaws.com/k?X-Amz-Signature=abc123&X-Amz-Credential=AKIA&part=2")
    assert "abc123" not in signed and "AKIA" not in signed and "part=2" in signed
    sas = redact("https://acct.blob.core.windows.net/c/x?sv=2024-05-04&sp=r&sig=Zm9vYmFy%3D&se=2026")
    assert "Zm9vYmFy" not in sas and "sp=r" in sas and "se=2026" in sas
    assert redact("s3://AKIAEXAMPLE:wJalrXUtn@bucket/runs") == "s3://***@bucket/runs"
    assert redact("s3://bucket/runs") == "s3://bucket/runs" and redact("data/corpus") == "data/corpus"
    assert redact("https://example.com/design?signoff=yes") == "https://example.com/design?signoff=yes"
    assert redact("https://alice:p@ss@mlflow.example.com/x") == "https://***@mlflow.example.com/x"  # `@` in it
    assert redact("https://app.example.com/cb#access_token=abc123&state=s") == \
        "https://app.example.com/cb#access_token=***&state=s"
    assert redact("http://host/x?auth=abc123&pwd=hunter2&page=2") == "http://host/x?auth=***&pwd=***&page=2"


def test_a_job_command_holding_a_credential_is_refused_before_any_cluster_contact() -> None:
    """Ray keeps a job's entrypoint in its record: a `key=value` override with a password would be
    readable through the Jobs API by anyone who can list jobs."""
    from jobs.submit import submit

    with pytest.raises(InputError, match=r"^tracking.uri=https://\*\*\*@mlflow.example.com: this argument holds "
                                         r"credentials.*--env NAME") as refused:
        submit("http://127.0.0.1:9", ["train", "tracking.uri=https://alice:hunter2@mlflow.example.com"])
    assert "hunter2" not in str(refused.value)


def test_the_public_config_holds_no_credential() -> None:
    job = load_job_config(None, ["tracking.uri=https://alice:hunter2@mlflow.example.com",
                                 "cluster.storage_path=s3://bucket/runs"])
    public = public_config(job)
    assert "hunter2" not in json.dumps(public) and "hunter2" not in json.dumps(flatten(public))
    assert public["cluster"]["storage_path"] == "s3://bucket/runs"


def test_a_cluster_process_inherits_no_credential_unless_named(monkeypatch, tmp_path) -> None:
    """`aiayn cluster up`'s nodes pass their environment to every job: the shell's credentials
    must not ride along, its settings must."""
    from cluster import services

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdef")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    monkeypatch.setenv("PIP_INDEX_URL", "https://ci:s3cr3t@pypi.example.com/simple")
    monkeypatch.setenv("AIAYN_TORCH_SPEC", "torch==2.6.0")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    service = services._spawn("env-probe", ["env", "-0"], tmp_path, env={"AWS_ACCESS_KEY_ID": "named-for-the-store"})
    assert service.process.wait(timeout=30) == 0
    seen = dict(item.split("=", 1) for item in service.log.read_text().split("\0") if "=" in item)
    for secret in ("wJalrXUtnFEMI", "hf_abcdef", "hunter2", "s3cr3t"):
        assert secret not in service.log.read_text()
    assert seen["AIAYN_TORCH_SPEC"] == "torch==2.6.0" and seen["LC_ALL"] == "C.UTF-8" and seen["HOME"]
    assert seen["AWS_ACCESS_KEY_ID"] == "named-for-the-store"  # what aiayn passes on purpose still goes
    assert seen["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_cluster_up_refuses_a_named_variable_that_is_not_set(monkeypatch, tmp_path) -> None:
    from cluster import local_cluster

    monkeypatch.setenv("AIAYN_HOME", str(tmp_path))
    with pytest.raises(InputError, match="--env NOT_SET_ANYWHERE: no such variable"):
        local_cluster.up(1, 1, named_env=["NOT_SET_ANYWHERE"])
    assert local_cluster.read_state() is None


def test_the_console_never_shows_a_credential(tmp_path) -> None:
    """Every driver line (the data's URI, a checkpoint's, an export's) goes through the console."""
    from jobs.report.progress import Console

    screen = io.StringIO()
    console = Console(tmp_path / "run.log", stream=screen)
    console("data s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/data/v1 and https://a.blob.core.windows.net/c?sv=1&sig=Zm9v")
    console.close()
    for shown in (screen.getvalue(), (tmp_path / "run.log").read_text()):
        assert "wJalrXUtnFEMI" not in shown and "Zm9v" not in shown and "s3://***@bucket/data/v1" in shown
