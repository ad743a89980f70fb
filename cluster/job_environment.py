"""The runtime environment of a submitted Ray job: what it carries to the cluster.

It ships this project as the job's working_dir (without data, virtual environments, run outputs
or MLflow stores) and sets the tracking URI. Ray keeps a job's environment variables in its record
(readable through the Jobs API) and in its logs, so no secret travels unless the user names it
(`aiayn submit --env NAME`); instance roles and workload identity need none.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_pipeline.errors import InputError
from data_pipeline.storage import redact

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", "data/", "runs/", "mlruns/", "mlartifacts/", "*.egg-info", "__pycache__",
    ".pytest_cache", "bench/results/", "wheelhouse/", ".aiayn/",
]
NOT_SECRET = ["AIAYN_TORCH_SPEC"]  # passed on when set: configuration, not credentials


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
