"""Building small but real training jobs for the tests."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from jobs import checkpoint as ckpt
from jobs.report.tracking import RUN_NAME_TAG
from jobs.run.config import JobConfig, load_job_config


def _alive_train_workers() -> dict[str, int]:
    """Ray Train worker actors alive now (actor id -> pid); none before Ray is connected."""
    import ray
    from ray.util.state import list_actors

    if not ray.is_initialized():
        return {}
    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
    return {actor.actor_id: actor.pid for actor in actors}


class TrainWorkers:
    """The worker processes of the run about to start, as Ray reports them, looked up in the
    background as soon as `count` of them are alive: Ray's state API takes seconds to answer, too
    long for a fault timed to a checkpoint. (Matching process titles, `pgrep -f RayTrainWorker`,
    also finds an earlier run's workers that are still exiting.)"""

    def __init__(self, count: int = 2):
        self.pids: list[int] = []
        self.found = threading.Event()
        earlier = set(_alive_train_workers())  # an earlier run's, not yet reaped
        threading.Thread(target=self._look, args=(count, earlier), daemon=True).start()

    def _look(self, count: int, earlier: set[str]) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                alive = {actor: pid for actor, pid in _alive_train_workers().items() if actor not in earlier}
            except Exception:  # noqa: BLE001 - the dashboard not answering yet
                alive = {}
            if len(alive) >= count:
                self.pids = sorted(alive.values())
                self.found.set()
                return
            time.sleep(0.5)

    def first(self) -> int:
        assert self.found.wait(timeout=600), "the run's Ray Train workers never came up"
        return self.pids[0]


# A separate Ray driver that takes every CPU of the 2-node test cluster, as another job would, and
# gives them back a fixed time after another job's placement group starts waiting for them: the
# wait is then the same however long that job's driver took before it asked.
_HOLDER = """
import sys, time, ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
ray.init(address=sys.argv[1], logging_level="ERROR")
group = placement_group([{"CPU": 2}, {"CPU": 2}], strategy="STRICT_SPREAD")
ray.get(group.ready(), timeout=60)
print("held", flush=True)
deadline = time.monotonic() + 600
while time.monotonic() < deadline and not any(
        entry["state"] == "PENDING" for entry in placement_group_table().values()):
    time.sleep(0.1)
time.sleep(float(sys.argv[2]))
remove_placement_group(group)
"""


@contextlib.contextmanager
def cluster_busy_for(address: str, seconds: float):
    """The cluster's CPUs are all taken by another job until `seconds` after a placement group of
    another job (the one run in the block) starts waiting for them."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, address, str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", "the holder could not take the cluster's CPUs"
        yield
    finally:
        if holder.wait(timeout=660) != 0:
            raise AssertionError("the holder of the cluster's CPUs failed")


CHECKPOINT_EVERY = 5  # steps between the tiny job's checkpoints


def tiny_overrides(corpus: dict, root: Path, name: str, *, address: str = "", tracking: str = "") -> list[str]:
    overrides = [
        f"name={name}",
        "model.preset=tiny", "model.dropout=0.1", "model.max_positions=64",
        "data.source.format=text", f"data.source.train={corpus['train']}",
        f"data.source.valid={corpus['valid']}", f"data.source.test={corpus['test']}",
        "data.tokenizer.vocab_size=64", "data.tokenizer.sample_sentences=2000",
        f"data.output_dir={corpus['root'] / 'prepared'}", "data.shard_rows=400",
        "stream.max_tokens=300", "stream.window_rows=256", "stream.unit_rows=64",
        "optim.lr=0.003", "optim.warmup_steps=5", "optim.decay_steps=0",
        "train.max_steps=30", "train.max_minutes=0", "train.log_every=1", "train.validate_every=10",
        f"train.checkpoint_every_steps={CHECKPOINT_EVERY}", "train.checkpoint_every_minutes=1000", "train.keep_checkpoints=3",
        "train.average_checkpoints=1", "train.beam_size=2",
        "cluster.num_workers=2", f"cluster.storage_path={root / 'runs'}", "cluster.max_failures=2",
        f"tracking.uri={tracking or 'sqlite:///' + str(root / 'mlflow.db')}",
    ]
    if address:
        overrides.append(f"cluster.address={address}")
    return overrides


def tiny_job(corpus: dict, root: Path, name: str, *, address: str = "", tracking: str = "",
             extra: tuple[str, ...] = ()) -> JobConfig:
    return load_job_config(None, tiny_overrides(corpus, root, name, address=address, tracking=tracking) + list(extra))


def runs_named(tracking_uri: str, name: str) -> list:
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")


def steps(tracking_uri: str, run_id: str, key: str = "train/loss") -> list[int]:
    return [m.step for m in sorted(MlflowClient(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def time_ledger(tracking_uri: str, run_id: str) -> tuple[dict[str, float], float]:
    """The run's final time ledger as MLflow holds it (goodput/*), and the sum of its seconds."""
    ledger = {key: value for key, value in MlflowClient(tracking_uri).get_run(run_id).data.metrics.items()
              if key.startswith("goodput/")}
    return ledger, sum(value for key, value in ledger.items() if key.endswith("_s"))


def registered(run_dir: Path, name: str) -> bool:
    """Ray Train has registered the checkpoint (its snapshot names it), so a restart will load it."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return any(entry.get("checkpoint_dir_name") == name for entry in snapshot.get("checkpoint_results", []))


def when(condition, action) -> threading.Thread:
    """Run `action` as soon as `condition()` holds (polled every 20 ms, for at most 10 minutes)."""
    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if condition():
                action()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def when_checkpoint_exists(run_dir: Path, step: int, action) -> threading.Thread:
    """Run `action` as soon as the checkpoint of `step` is complete and registered."""
    name = ckpt.checkpoint_dir_name(step)
    return when(lambda: registered(run_dir, name) and ckpt.is_complete(run_dir / name), action)


def when_checkpoint_upload_begins(run_dir: Path, step: int, action) -> threading.Thread:
    """Run `action` as soon as the checkpoint of `step` has a directory in the storage: its upload
    has begun, and Ray Train has usually not registered it yet."""
    return when(lambda: (run_dir / ckpt.checkpoint_dir_name(step)).exists(), action)


def newest_complete(run_dir) -> str | None:
    """The run's newest complete checkpoint, signed or not (what a test planted included)."""
    complete = [uri for uri in ckpt.list_checkpoints(run_dir) if ckpt.is_complete(uri)]
    return complete[-1] if complete else None
