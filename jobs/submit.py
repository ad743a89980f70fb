"""`aiayn submit` and `aiayn jobs ...`: any aiayn command as a Ray job, through the Jobs API.

The job's runtime environment ships this project as its working_dir (without data, virtual
environments, run outputs or MLflow stores) and passes through the tracking URI and cloud
credentials that are set here. Credential values are never printed or logged, only their names.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from pathlib import Path

from data_pipeline.errors import InputError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", "data/", "runs/", "mlruns/", "mlartifacts/", "*.egg-info", "__pycache__",
    ".pytest_cache", "bench/results/", "wheelhouse/", ".aiayn/",
]
PASSED_THROUGH = [
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "GOOGLE_APPLICATION_CREDENTIALS", "HF_TOKEN", "AIAYN_TORCH_SPEC",
]


def dashboard_address(explicit: str) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS (http://), else the local cluster's."""
    if explicit:
        return explicit
    for variable in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(variable, "")
        if value.startswith("http"):
            return value
    from cluster.local_cluster import read_state

    state = read_state()
    if state is None:
        raise InputError("no cluster address: pass --address http://HOST:8265, or start one with `aiayn cluster up`")
    return state.dashboard_url


def runtime_env(extra_env: dict[str, str] | None = None) -> dict:
    env_vars = {name: os.environ[name] for name in PASSED_THROUGH if os.environ.get(name)}
    env_vars.update(extra_env or {})
    return {"working_dir": str(PROJECT_ROOT), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars}


def submit(address: str, command: list[str], *, name: str = "", tracking_uri: str = "") -> str:
    """Submit `aiayn <command>`; returns the submission id."""
    if command and command[0] == "aiayn":
        command = command[1:]
    if not command:
        raise InputError("nothing to submit: give an aiayn command after --, e.g. `aiayn submit -- train`")
    extra = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
    return client(address).submit_job(
        entrypoint=f"python -m jobs.cli {shlex.join(command)}",
        runtime_env=runtime_env(extra), submission_id=name or None,
    )


def passed_through_names() -> list[str]:
    return [name for name in PASSED_THROUGH if os.environ.get(name)]


def client(address: str):
    from cluster.runtime import use_token_auth_if_available

    use_token_auth_if_available()  # before Ray is imported: it reads the mode once, at import
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard_address(address))


def follow_logs(address: str, job_id: str) -> None:
    async def tail() -> None:
        async for chunk in client(address).tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
