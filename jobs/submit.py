"""`aiayn submit` and `aiayn jobs ...`: any aiayn command as a Ray job, through the Jobs API.
What the job carries (code, variables) is cluster/job_environment.py's decision."""

from __future__ import annotations

import asyncio
import os
import shlex

from cluster.job_environment import runtime_env
from data_pipeline.errors import InputError
from data_pipeline.storage import redact


def dashboard_address(explicit: str) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS (http://), else the local cluster's."""
    if explicit:
        return explicit
    for variable in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(variable, "")
        if value.startswith("http"):
            return value
    from cluster.local_cluster import read_state  # the local cluster's state, only when no address is given

    state = read_state()
    if state is None:
        raise InputError("no cluster address: pass --address http://HOST:8265, or start one with `aiayn cluster up`")
    return state.dashboard_url


def submit(address: str, command: list[str], *, name: str = "", tracking_uri: str = "",
           named_env: list[str] | None = None, cluster_storage: str = "", mlflow_login: dict | None = None) -> str:
    """Submit `aiayn <command>`; returns the submission id. `cluster_storage`: where the job's
    relative locations go (the local cluster's bucket); `mlflow_login`: the job's own MLflow user."""
    if command and command[0] == "aiayn":
        command = command[1:]
    if not command:
        raise InputError("nothing to submit: give an aiayn command after --, e.g. `aiayn submit -- train`")
    holding = next((argument for argument in command if redact(argument) != argument), None)
    if holding is not None:
        raise InputError(f"{redact(holding)}: this argument holds credentials, which Ray would keep in the job's "
                         "record; put them in a variable the job reads (MLFLOW_TRACKING_PASSWORD, "
                         "AWS_SECRET_ACCESS_KEY, ...) and pass it with --env NAME")
    environment = runtime_env(named_env or [], tracking_uri, cluster_storage, mlflow_login or {})
    return client(address).submit_job(
        entrypoint=f"python -m jobs.cli {shlex.join(command)}", runtime_env=environment, submission_id=name or None,
    )


def client(address: str):
    from cluster.ray_connection import use_token_auth_if_available  # it sets what Ray reads at import

    use_token_auth_if_available()  # before Ray is imported: it reads the mode once, at import
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard_address(address))


def follow_logs(address: str, job_id: str) -> None:
    async def tail() -> None:
        async for chunk in client(address).tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
