"""The runtime environment of a submitted Ray job: what it carries to the cluster.

It ships this project as the job's working_dir (without data, virtual environments, run outputs
or MLflow stores) and sets the tracking URI. Ray keeps a job's environment variables in its record
(readable through the Jobs API) and in its logs, so no secret travels unless the user names it
(`aiayn submit --env NAME`); instance roles and workload identity need none.
"""

from __future__ import annotations

import os
from pathlib import Path

from cluster import PROJECT_ROOT
from data_pipeline.errors import InputError
from data_pipeline.storage import redact

WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", "data/", "runs/", "mlruns/", "mlartifacts/", "*.egg-info", "__pycache__",
    ".pytest_cache", "bench/results/", "wheelhouse/", ".aiayn/",
]
NOT_SECRET = ["AIAYN_TORCH_SPEC"]  # passed on when set: configuration, not credentials
# What the processes of a cluster (`aiayn cluster up`'s nodes and services, and through the nodes
# every job) inherit from the shell that starts them: the machine's, Python's, Ray's, aiayn's and
# the accelerators' settings. Credentials travel only when named (`cluster up --env NAME`).
INHERITED = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "VIRTUAL_ENV",
             "LD_LIBRARY_PATH"}
INHERITED_PREFIXES = ("LC_", "XDG_", "PYTHON", "PIP_", "RAY_", "AIAYN_", "HF_", "CUDA_", "NVIDIA_", "NCCL_", "OMP_",
                      "MKL_", "TORCH_")
_SECRET_NAME = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL")


def inherited_environment() -> dict[str, str]:
    """This process's variables that a cluster's processes may inherit: none whose name looks
    like a credential's, none whose value holds one (https://user:password@...)."""
    return {name: value for name, value in os.environ.items()
            if (name in INHERITED or name.startswith(INHERITED_PREFIXES))
            and not any(word in name.upper() for word in _SECRET_NAME) and redact(value) == value}


def named_variables(named: list[str]) -> dict[str, str]:
    """The variables the user named with --env, which must be set here."""
    missing = [name for name in named if name not in os.environ]
    if missing:
        raise InputError(f"--env {missing[0]}: no such variable is set here")
    return {name: os.environ[name] for name in named}


# Set by `aiayn submit` for a cluster of `aiayn cluster up` that has an object store: its bucket,
# where a job's relative locations go.
JOB_STORAGE = "AIAYN_JOB_STORAGE"


def job_location(key: str, location: str) -> str:
    """Where a location of the config goes when it runs as a Ray job. There the working directory
    is Ray's temporary copy of the project, another one on each node and deleted with the job, so
    a relative path goes to the cluster's own storage when the job was given one and is refused
    otherwise. Outside a job, and for absolute paths and URIs, unchanged."""
    if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "://" in location or Path(location).is_absolute():
        return location
    cluster_storage = os.environ.get(JOB_STORAGE, "")
    if cluster_storage:
        return f"{cluster_storage.rstrip('/')}/{Path(location).as_posix().strip('/')}"
    raise InputError(f"{key}={location}: a relative path inside a Ray job lies in Ray's temporary copy of the project, "
                     "another one on each node and deleted with the job; give an object-store URI or an absolute "
                     "path that every node reaches")


def runtime_env(named: list[str], tracking_uri: str = "", cluster_storage: str = "",
                mlflow_login: dict[str, str] | None = None) -> dict:
    """The job's runtime environment: the project, the tracking URI, the cluster's own storage (if
    it has one), the non-secret settings that are set here, exactly the variables the user named,
    and on the local cluster the job's own MLflow user (cluster/mlflow_users.py), whose password is
    in the job's record for holders of the cluster's Ray token alone."""
    chosen = named_variables(named)
    if tracking_uri and redact(tracking_uri) != tracking_uri:
        raise InputError("the tracking URI holds credentials, which Ray would keep in the job's record: put them in "
                         "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or a token) and pass those with --env")
    env_vars = {name: os.environ[name] for name in NOT_SECRET if os.environ.get(name)
                and redact(os.environ[name]) == os.environ[name]}  # an index URL with a login stays here
    env_vars.update(chosen)
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    if cluster_storage:
        env_vars[JOB_STORAGE] = cluster_storage
    env_vars.update(mlflow_login or {})
    return {"working_dir": str(PROJECT_ROOT), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars}
