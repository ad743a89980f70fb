"""`aiayn submit` and `aiayn jobs ...`: any aiayn command as a Ray job, through the Jobs API.

The job's runtime environment ships this project as its working_dir (without data, virtual
environments, run outputs or MLflow stores) and sets the tracking URI. Ray keeps a job's
environment variables in its record (readable through the Jobs API) and in its logs, so no secret
travels unless the user names it (`--env NAME`); instance roles and workload identity need none.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from pathlib import Path

from data_pipeline.errors import InputError
from data_pipeline.storage import redact

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", "data/", "runs/", "mlruns/", "mlartifacts/", "*.egg-info", "__pycache__",
    ".pytest_cache", "bench/results/", "wheelhouse/", ".aiayn/",
]
NOT_SECRET = ["AIAYN_TORCH_SPEC"]  # passed on when set: configuration, not credentials


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


def runtime_env(named: list[str], tracking_uri: str = "") -> dict:
    """The job's runtime environment: the project, the tracking URI, the non-secret settings that
    are set here and exactly the variables the user named."""
    missing = [name for name in named if name not in os.environ]
    if missing:
        raise InputError(f"--env {missing[0]}: no such variable is set here")
    if tracking_uri and redact(tracking_uri) != tracking_uri:
        raise InputError("the tracking URI holds credentials, which Ray would keep in the job's record: put them in "
                         "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or a token) and pass those with --env")
    env_vars = {name: os.environ[name] for name in NOT_SECRET if os.environ.get(name)}
    env_vars.update({name: os.environ[name] for name in named})
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    return {"working_dir": str(PROJECT_ROOT), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars}


def submit(address: str, command: list[str], *, name: str = "", tracking_uri: str = "",
           named_env: list[str] | None = None) -> str:
    """Submit `aiayn <command>`; returns the submission id."""
    if command and command[0] == "aiayn":
        command = command[1:]
    if not command:
        raise InputError("nothing to submit: give an aiayn command after --, e.g. `aiayn submit -- train`")
    environment = runtime_env(named_env or [], tracking_uri)
    return client(address).submit_job(
        entrypoint=f"python -m jobs.cli {shlex.join(command)}", runtime_env=environment, submission_id=name or None,
    )


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
