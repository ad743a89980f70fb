"""End to end on a real 3-node local cluster: submit prepare and train through the Jobs API, kill
a worker node's raylet after the first checkpoint, and the job still succeeds; MLflow (over
HTTP) holds one run with contiguous steps and a final BLEU; `cluster down` leaves nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster.local_cluster import live_processes_in_group
from jobs.tracking import RUN_NAME_TAG
from tests.data_pipeline.synthetic import write_parallel_corpus
from tests.jobs.helpers import tiny_overrides

pytestmark = pytest.mark.slow


def _aiayn(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _wait_for_job(job_id: str, env: dict, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _aiayn("jobs", "status", job_id, env=env, timeout=60).stdout.strip()
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(2)
    raise TimeoutError(job_id)


def _registered(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return False


def _raylet_hosting_a_train_worker() -> int:
    """The raylet (not the head's) that is the parent of a running Ray Train worker."""
    workers = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
    for pid in workers:
        parent = int(Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[1])
        command = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "raylet" in command and "--head" not in command:
            return parent
    raise AssertionError("no Ray Train worker runs on a non-head node")


def test_submit_train_survive_node_loss_and_tear_down(tmp_path) -> None:
    env = {**os.environ, "AIAYN_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    corpus = {"train": write_parallel_corpus(tmp_path / "corpus", 800, seed=1, prefix="train"),
              "valid": write_parallel_corpus(tmp_path / "corpus", 40, seed=2, prefix="valid"),
              "test": write_parallel_corpus(tmp_path / "corpus", 30, seed=3, prefix="test"),
              "root": tmp_path / "corpus"}
    up = _aiayn("cluster", "up", "--nodes", "3", "--cpus-per-node", "2", env=env)
    assert up.returncode == 0, up.stderr[-2000:]
    state = json.loads(up.stdout)
    try:
        overrides = tiny_overrides(corpus, tmp_path, "e2e") + [
            "train.max_steps=60", "train.checkpoint_every_steps=10", "cluster.placement_strategy=STRICT_SPREAD",
            "cluster.max_failures=3", "tracking.uri=",  # the job's MLFLOW_TRACKING_URI: the cluster's server
        ]
        prepare = _aiayn("submit", "--", "prepare", *overrides, env=env)
        assert prepare.returncode == 0, prepare.stderr
        assert _wait_for_job(prepare.stdout.strip(), env) == "SUCCEEDED"
        train = _aiayn("submit", "--name", "e2e-train", "--", "train", *overrides, env=env)
        assert train.returncode == 0 and train.stdout.strip() == "e2e-train", train.stderr

        run_dir = tmp_path / "runs" / "e2e"
        deadline = time.monotonic() + 600
        while not _registered(run_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(_raylet_hosting_a_train_worker(), signal.SIGKILL)  # a worker node is lost

        assert _wait_for_job("e2e-train", env) == "SUCCEEDED", _aiayn("jobs", "logs", "e2e-train", env=env).stdout[-3000:]
        client = MlflowClient(state["mlflow"])
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.`{RUN_NAME_TAG}` = 'e2e'")
        assert len(runs) == 1
        steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
        assert steps == list(range(1, 61))
        assert "test/bleu" in runs[0].data.metrics and int(runs[0].data.tags["resumed_from_step"]) >= 10
        assert runs[0].data.tags["node.rank0"] != runs[0].data.tags["node.rank1"]  # STRICT_SPREAD
    finally:
        down = _aiayn("cluster", "down", env=env)
    assert down.returncode == 0, down.stderr
    port = state["ray_address"].rsplit(":", 1)[1]
    leftover = subprocess.run(["pgrep", "-f", f"127.0.0.1:{port}"], capture_output=True, text=True).stdout.split()
    assert leftover == []
    for group in state["process_groups"]:
        assert live_processes_in_group(group) == []
