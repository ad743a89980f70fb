"""MLflow tracking through MlflowClient: one run per job name that survives every restart.

Exactly-once metrics: a resumed run recomputes the steps after its last checkpoint, and on CPU it
recomputes them exactly (tested), so the logger skips every (key, step) already in the run
instead of logging it twice.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

RUN_NAME_TAG = "aiayn.run_name"


def resolve_tracking_uri(configured: str) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a local SQLite store under ./mlruns.

    Inside a job submitted through the Jobs API the working directory is Ray's temporary copy of
    the project, so a default local store there would vanish with the job: refused."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        from data_pipeline.errors import InputError

        raise InputError("tracking.uri is empty inside a Ray job, where ./mlruns is a temporary copy that is deleted; "
                         "set tracking.uri or MLFLOW_TRACKING_URI to your MLflow server (aiayn submit sets it "
                         "for clusters started with `aiayn cluster up`)")
    store = Path("mlruns").resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def local_store_dir(tracking_uri: str) -> str | None:
    """The directory of a store that lives in files (SQLite, file:), which rank 0 opens on
    whatever node it runs; None for a tracking server or a database server."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///"):]).parent)
    if tracking_uri.startswith("file://"):
        return tracking_uri[len("file://"):]
    if "://" not in tracking_uri:
        return tracking_uri
    return None


def _artifact_root(tracking_uri: str) -> str | None:
    """Local stores keep artifacts beside the database, addressed absolutely so every process agrees."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def find_or_create_run(tracking_uri: str, experiment: str, run_name: str, params: dict, tags: dict) -> tuple[str, bool]:
    """(run id, created). The same run name finds the same run again."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=_artifact_root(tracking_uri)
    )
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if existing:
        run_id = existing[0].info.run_id
        client.set_terminated(run_id, "RUNNING")
        return run_id, False
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id, True


class MetricLogger:
    """Logs to one run, never the same (key, step) twice, whatever restarts happened.

    Writes are asynchronous (MLflow's own background queue) so a slow tracking server never
    stalls a training step; `flush()` waits for them and is called before every checkpoint, so
    everything up to a checkpoint's step is in the run before that checkpoint can be resumed.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(tracking_uri), run_id
        self._last_step: dict[str, int] = {}
        self._pending: list = []

    def _last(self, key: str) -> int:
        if key not in self._last_step:
            history = self.client.get_metric_history(self.run_id, key)
            self._last_step[key] = max((m.step for m in history), default=-1)
        return self._last_step[key]

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self._last(k)]
        if fresh:
            self._pending.append(self.client.log_batch(self.run_id, metrics=fresh, synchronous=False))
            for metric in fresh:
                self._last_step[metric.key] = step

    def flush(self) -> None:
        """Block until every metric logged so far is stored; raises what a failed write raised."""
        pending, self._pending = self._pending, []
        for operation in pending:
            operation.wait()

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
