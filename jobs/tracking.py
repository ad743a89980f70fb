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
    """The config's URI, else $MLFLOW_TRACKING_URI, else a local SQLite store under ./mlruns. A
    plain directory means a SQLite store in it (MLflow 3 no longer develops its file store).

    Inside a job submitted through the Jobs API the working directory is Ray's temporary copy of
    the project, so a default local store there would vanish with the job: refused."""
    configured = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if configured:
        return configured if ":" in configured else _sqlite_store(configured)
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        from data_pipeline.errors import InputError

        raise InputError("tracking.uri is empty inside a Ray job, where ./mlruns is a temporary copy that is deleted; "
                         "set tracking.uri or MLFLOW_TRACKING_URI to your MLflow server (aiayn submit sets it "
                         "for clusters started with `aiayn cluster up`)")
    return _sqlite_store("mlruns")


def _sqlite_store(directory: str) -> str:
    store = Path(directory).resolve()
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
    """Logs to one run, never the same (key, step) twice, whatever restarts or outages happened.

    Tracking is a side channel: nothing here ever fails a training step or a checkpoint. Writes
    are asynchronous (MLflow's own background queue). `flush()`, called before every checkpoint,
    waits for them; what could not be sent stays pending, is resent at every later flush, and is
    saved with the checkpoint (`spool()`), so a restart sends it (`restore_spool`). Before pending
    metrics are sent, the run's history is asked again and steps it already holds are skipped
    (a write that timed out may still have landed).
    """

    def __init__(self, tracking_uri: str, run_id: str, warn=print):
        self.client, self.run_id, self.warn = MlflowClient(tracking_uri), run_id, warn
        self._last_step: dict[str, int] = {}
        self._in_flight: list[tuple[object, list[Metric]]] = []
        self._unsent: list[Metric] = []
        self._unsent_tags: dict[str, str] = {}

    def _history_last(self, key: str) -> int:
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self._last_step.get(k, -1)]
        if not batch:
            return
        try:
            for metric in batch:  # once per key: what an earlier attempt of this run already logged
                if metric.key not in self._last_step:
                    self._last_step[metric.key] = self._history_last(metric.key)
            batch = [m for m in batch if m.step > self._last_step[m.key]]
            if batch:
                self._in_flight.append((self.client.log_batch(self.run_id, metrics=batch, synchronous=False), batch))
        except Exception:  # noqa: BLE001 - the server is unreachable: keep the metrics
            self._unsent.extend(batch)
        for metric in batch:
            self._last_step[metric.key] = max(self._last_step.get(metric.key, -1), step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._unsent_tags.update({key: str(value) for key, value in tags.items()})
        self._send_tags()

    def _send_tags(self) -> None:
        if not self._unsent_tags:
            return
        try:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self._unsent_tags.items()])
            self._unsent_tags = {}
        except Exception:  # noqa: BLE001 - sent at a later flush
            pass

    def flush(self) -> int:
        """Wait for the writes in flight, then try to send what is pending. Never raises; returns
        the number of metric values still pending (and warns about them)."""
        in_flight, self._in_flight = self._in_flight, []
        for operation, batch in in_flight:
            try:
                operation.wait()
            except Exception:  # noqa: BLE001 - kept, and resent below or later
                self._unsent.extend(batch)
        self._send_tags()
        if self._unsent:
            self._resend()
        if self._unsent:
            self.warn(f"[aiayn] MLflow is unreachable: {len(self._unsent)} metric values pending; they are kept with "
                      "the checkpoints and sent once it is back")
        return len(self._unsent)

    def _resend(self) -> None:
        try:
            known = {key: self._history_last(key) for key in {m.key for m in self._unsent}}
            fresh = [m for m in self._unsent if m.step > known[m.key]]
            for start in range(0, len(fresh), 1000):  # MLflow's limit per batch
                self.client.log_batch(self.run_id, metrics=fresh[start : start + 1000])
            self._unsent = []
        except Exception:  # noqa: BLE001 - still unreachable
            pass

    def spool(self) -> list[dict]:
        """What is pending, for the checkpoint: plain data."""
        return [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self._unsent]

    def restore_spool(self, spooled: list[dict]) -> None:
        self._unsent.extend(Metric(d["key"], float(d["value"]), int(d["timestamp"]), int(d["step"])) for d in spooled)
