"""MLflow tracking through MlflowClient: one run per job name that survives every restart.

Exactly-once metrics: a resumed run recomputes the steps after its last checkpoint, and on CPU it
recomputes them exactly (tested), so the logger skips every (key, step) already in the run
instead of logging it twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cluster import PROJECT_ROOT
from data_pipeline.errors import InputError
from data_pipeline.manifest import Manifest
from data_pipeline.storage import redact

RUN_NAME_TAG = "aiayn.run_name"
# MLflow prints the run's URL when a run ends, with the credentials of the tracking URI in it;
# aiayn prints the run's page itself, redacted.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
END_OF_RUN_WAIT_S = 30.0  # how long the end of a run waits for the metric backlog (what is left stays in the spool)


def resolve_tracking_uri(configured: str) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a local SQLite store under ./mlruns. A
    plain directory means a SQLite store in it (MLflow 3 no longer develops its file store).

    Inside a job submitted through the Jobs API the working directory is Ray's temporary copy of
    the project, so a default local store there would vanish with the job: refused."""
    configured = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if configured:
        return log_in(configured) if ":" in configured else _sqlite_store(configured)
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        raise InputError("tracking.uri is empty inside a Ray job, where ./mlruns is a temporary copy that is deleted; "
                         "set tracking.uri or MLFLOW_TRACKING_URI to your MLflow server (aiayn submit sets it "
                         "for clusters started with `aiayn cluster up`)")
    return _sqlite_store("mlruns")


def log_in(tracking_uri: str) -> str:
    """Give this process the login of this account's local cluster (`aiayn cluster up`) when
    `tracking_uri` is that cluster's MLflow and no login is set; returns the URI. Not inside a Ray
    job: a job logs in as the user `aiayn submit` made for it, never as the administrator."""
    if "MLFLOW_TRACKING_USERNAME" not in os.environ and "MLFLOW_TRACKING_TOKEN" not in os.environ:
        from cluster.local_cluster import mlflow_login_for  # the local cluster's code only where a login is needed

        administrator = mlflow_login_for(tracking_uri)
        if administrator and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            raise InputError(f"{tracking_uri}: this job has no MLflow login of its own; submit it with `aiayn "
                             "submit`, which makes one, or pass one with --env MLFLOW_TRACKING_USERNAME "
                             "--env MLFLOW_TRACKING_PASSWORD")
        os.environ.update(administrator)
    return tracking_uri


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
                              cwd=PROJECT_ROOT).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def request_budget(environment: dict[str, str]) -> Iterator[None]:
    """MLflow's client reads its per-request timeout and retries from the environment at every
    request. The driver sets them for as long as it runs; `train()` also runs inside other programs
    (tests, notebooks), whose own values come back afterwards."""
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def find_run(tracking_uri: str, experiment_id: str, run_name: str):
    """The MLflow run (mlflow.entities.Run) of the run named `run_name`, or None."""
    existing = MlflowClient(tracking_uri).search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return existing[0] if existing else None


def dataset_inputs(manifest: Manifest) -> list[DatasetInput]:
    """What the run trains on, as MLflow's run page shows it ("Datasets used"): the prepared
    dataset version, and for a mixture each corpus with its weight and its share of the rows and
    target tokens. Metadata only: MLflow reads none of the data."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    def source(uri: str):
        with warnings.catch_warnings():  # a local path matches two of MLflow's equal local sources; it says so
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(redact(uri))

    data, train = manifest.data, manifest.data["splits"]["train"]
    version = MetaDataset(source(manifest.uri), name=data["name"], digest=data["fingerprint"][:16])
    inputs = [DatasetInput(version._to_mlflow_entity(), [InputTag("mlflow.data.context", "training"),
                                                         InputTag("rows", str(train["rows"]))])]
    for described in data["inputs"]:
        if not described.get("corpus"):
            continue
        share = next(corpus for corpus in train["corpora"] if corpus["name"] == described["corpus"])
        corpus = MetaDataset(source(described["files"][0]["path"]), name=described["corpus"],
                             digest=hashlib.sha256("".join(f["sha256"] for f in described["files"]).encode()).hexdigest()[:16])
        inputs.append(DatasetInput(corpus._to_mlflow_entity(), [
            InputTag("mlflow.data.context", "training corpus"), InputTag("weight", str(described["weight"])),
            InputTag("rows", str(share["rows"])), InputTag("row_share", str(share["row_share"])),
            InputTag("token_share", str(share["token_share"]))]))
    return inputs


def find_or_create_run(tracking_uri: str, experiment: str, run_name: str, params: dict, tags: dict,
                       inputs: list[DatasetInput] | None = None) -> tuple[str, bool]:
    """(run id, created). The same run name finds the same run again; `inputs` go to a new run."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=_artifact_root(tracking_uri)
    )
    existing = find_run(tracking_uri, experiment_id, run_name)
    if existing is not None:
        run_id = existing.info.run_id
        client.set_terminated(run_id, "RUNNING")
        return run_id, False
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    if inputs:
        try:
            client.log_inputs(run.info.run_id, datasets=inputs)
        except MlflowException:
            # Runs of one experiment made at once (a sweep's trials) may both add the same dataset: the
            # store looks it up and inserts it apart, so one fails its unique key; again, it finds it.
            client.log_inputs(run.info.run_id, datasets=inputs)
    return run.info.run_id, True


class MetricLogger:
    """Logs to one run, never the same (key, step) twice, whatever restarts or outages happened.

    Tracking is a side channel: nothing here ever blocks or fails a training step or a checkpoint.
    `log` and `set_tags` only append to a backlog; a background thread sends it. While the server
    is unreachable the backlog grows, one console line says so, and another when it is back; past
    `max_backlog` values it keeps fewer steps, evenly, never cutting off its newest end. The
    backlog is saved with every checkpoint (`spool()`), so a
    restart sends it (`restore_spool`). Before values of a key are sent for the first time, or
    again after a failed send, the run's history is asked and steps it already holds are skipped
    (a write that timed out may still have landed, and a resumed run recomputes steps).
    """

    RETRY_S = (1.0, 30.0)  # first and longest pause between attempts while the server is unreachable

    def __init__(self, tracking_uri: str, run_id: str, say: Callable[[str], None] = print,
                 max_backlog: int = 100_000) -> None:
        self.client, self.run_id, self.say, self.max_backlog = MlflowClient(tracking_uri), run_id, say, max_backlog
        self.shown_uri = redact(tracking_uri)  # for console lines: never the credentials
        self._last_step: dict[str, int] = {}  # what this process has queued, per key
        self._backlog: list[Metric] = []
        self._tags: dict[str, str] = {}
        # The sender's own: per key, the last step the run held when its history was read (once
        # per key, and again after a failed send, which may have landed in part).
        self._run_last: dict[str, int] = {}
        self._stale: set[str] = set()
        self._stride = 1  # the backlog keeps steps that are multiples of this (`_enqueue`)
        self._down_since: float | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send_forever, name="aiayn-tracking", daemon=True)
        self._thread.start()

    # -- the training thread's side: never waits on the server -------------------------------------
    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self._last_step.get(k, -1)]
        with self._lock:
            for metric in batch:
                self._last_step[metric.key] = step
            self._enqueue(batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        with self._lock:
            self._tags.update({key: str(value) for key, value in tags.items()})
            self._idle.clear()
            self._wake.notify()

    def spool(self) -> list[dict]:
        """What is not yet known to be in MLflow, for the checkpoint: plain data."""
        with self._lock:
            return [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self._backlog]

    def restore_spool(self, spooled: list[dict]) -> None:
        restored = [Metric(d["key"], float(d["value"]), int(d["timestamp"]), int(d["step"])) for d in spooled]
        with self._lock:
            self._enqueue(restored)

    def pending(self) -> int:
        with self._lock:
            return len(self._backlog)

    def drain(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the backlog to be sent (the end of a run); the values still
        pending."""
        self._idle.wait(timeout_s)
        return self.pending()

    def close(self, timeout_s: float) -> int:
        """Drain, then stop the sender; the values that could not be sent."""
        left = self.drain(timeout_s)
        with self._lock:
            self._closed = True
            self._stop.set()
            self._wake.notify()
        return left

    def _enqueue(self, metrics: list[Metric]) -> None:
        """Queue `metrics` at the backlog's resolution: past `max_backlog` values only every
        `_stride`-th step is kept, the stride doubling each time it fills, so that a long outage
        keeps the whole of every curve evenly, its newest stretch included (the checkpoint copies
        the backlog, so it must stay bounded)."""
        self._backlog.extend(m for m in metrics if m.step % self._stride == 0)
        while len(self._backlog) > self.max_backlog:
            if self._stride == 1:
                self.say(f"[aiayn] MLflow backlog reached {self.max_backlog} values: keeping every second step of "
                         "each metric (then every fourth, ...) until the server takes them")
            self._stride *= 2
            thinned = [m for m in self._backlog if m.step % self._stride == 0]
            if len(thinned) == len(self._backlog):  # nothing left to thin by step: the oldest go
                thinned = thinned[len(thinned) - self.max_backlog:]
            self._backlog = thinned
        if self._backlog:
            self._idle.clear()
            self._wake.notify()

    # -- the sender thread -------------------------------------------------------------------------
    def _send_forever(self) -> None:
        pause = self.RETRY_S[0]
        while True:
            with self._lock:
                while not self._closed and not self._backlog and not self._tags:
                    self._idle.set()
                    self._wake.wait()
                if self._closed:
                    return
                metrics, tags = list(self._backlog), dict(self._tags)
            try:
                self._send(metrics, tags)
            except Exception as error:  # noqa: BLE001 - unreachable: kept, and tried again
                self._stale.update(m.key for m in metrics)  # part of it may have landed
                with self._lock:
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        self.say(f"[aiayn] MLflow at {self.shown_uri} is unreachable ({redact(str(error).splitlines()[0][:160])}); "
                                 "training goes on, metrics are kept (with every checkpoint) and sent when it is back")
                self._stop.wait(pause)  # new metrics do not shorten the pause: they wait with the rest
                pause = min(pause * 2, self.RETRY_S[1])
                continue
            pause = self.RETRY_S[0]
            with self._lock:
                sent = {id(m) for m in metrics}  # by identity: the backlog may have been thinned meanwhile
                self._backlog = [m for m in self._backlog if id(m) not in sent]
                for key, value in tags.items():
                    if self._tags.get(key) == value:
                        del self._tags[key]
                if self._down_since is not None:
                    self.say(f"[aiayn] MLflow is reachable again after {time.monotonic() - self._down_since:.0f} s; "
                             f"the metrics held meanwhile are sent ({len(self._backlog)} still queued)")
                    self._down_since, self._stride = None, 1

    def _send(self, metrics: list[Metric], tags: dict[str, str]) -> None:
        for key in {m.key for m in metrics}:
            if key not in self._run_last or key in self._stale:
                self._run_last[key] = self._history_last(key)
                self._stale.discard(key)
        fresh = [m for m in metrics if m.step > self._run_last[m.key]]
        for start in range(0, len(fresh), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=fresh[start : start + 1000])
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _history_last(self, key: str) -> int:
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
