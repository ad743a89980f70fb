"""End to end on a shared-nothing cluster: 3 isolated Ray nodes (each with its own /tmp, home and
working directory), an S3-compatible object store and an MLflow server over HTTP.

The corpus, the prepared data, the checkpoints and the export all live in the bucket. Prepare and
train are submitted through the Jobs API; the raylet of a node that runs a training worker is
SIGKILLed after the first registered checkpoint and the job still completes. The export is in the
bucket and in MLflow, `aiayn evaluate --model runs:/<id>/export` from a fresh directory prints the
job's BLEU, a second prepare does nothing, the job wrote nothing outside the bucket, MLflow's store
and the nodes' private directories, and `cluster down` leaves no process or mount namespace.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import requests
from mlflow.server.auth.client import AuthServiceClient
from mlflow.tracking import MlflowClient

from cluster.services import live_processes_in_group
from data_pipeline import storage
from jobs.report.tracking import RUN_NAME_TAG
from tests.data_pipeline.synthetic import write_parallel_corpus

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 60


def _aiayn(*args: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**env, "PYTHONPATH": str(ROOT)}, cwd=cwd)


def _wait_for_job(job_id: str, env: dict, cwd: Path, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _aiayn("jobs", "status", job_id, env=env, cwd=cwd, timeout=60).stdout.strip()
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(2)
    raise TimeoutError(job_id)


def _registered(run_uri: str) -> bool:
    snapshot = storage.read_json(storage.join(run_uri, "checkpoint_manager_snapshot.json")) if storage.exists(run_uri) else None
    return bool(snapshot and snapshot.get("checkpoint_results"))


def _raylet_hosting_a_train_worker() -> int:
    """The raylet (not the head's) that is the parent of a running Ray Train worker."""
    workers = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
    for pid in workers:
        parent = int(Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[1])
        command = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "raylet" in command and "--head" not in command:
            return parent
    raise AssertionError("no Ray Train worker runs on a non-head node")


def _mount_namespaces() -> set[str]:
    found = set()
    for entry in Path("/proc").glob("[0-9]*/ns/mnt"):
        try:
            found.add(os.readlink(entry))
        except OSError:
            pass
    return found


# What the job's libraries name their files and directories: aiayn's own, Python's tempfile, Ray,
# MLflow, DeepSpeed and torch. Other processes on a developer's machine may write /tmp meanwhile.
_JOB_WRITERS = ("aiayn", "tmp", "ray", "checkpoint", "mlflow", "deepspeed", "torch", ".aiayn")


def _listing(directory: Path, depth: int = 2, names: tuple[str, ...] = ("",)) -> set[str]:
    """Paths under `directory` to `depth` levels whose top-level name starts with one of `names`."""
    found: set[str] = set()
    for path in directory.glob("*"):
        if not path.name.startswith(names):
            continue
        found.add(str(path))
        if depth > 1 and path.is_dir() and not path.is_symlink():
            try:
                found |= _listing(path, depth - 1)
            except OSError:
                pass
    return found


def _cluster_processes_holding(groups: list[int], secret: str) -> list[int]:
    """The live processes of these process groups whose environment holds `secret`."""
    holding = []
    for group in groups:
        for pid in live_processes_in_group(group):
            try:
                if secret.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                    holding.append(pid)
            except OSError:
                continue  # gone meanwhile
    return holding


def test_shared_nothing_cluster_object_store_end_to_end(tmp_path) -> None:
    started = time.monotonic()
    workdir, fresh = tmp_path / "work", tmp_path / "fresh"
    workdir.mkdir()
    fresh.mkdir()
    env = {**os.environ, "AIAYN_HOME": str(tmp_path / "home")}
    for variable in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(variable, None)
    namespaces_before = _mount_namespaces()
    up = _aiayn("cluster", "up", "--nodes", "3", "--cpus-per-node", "2", "--isolated", env=env, cwd=workdir)
    assert up.returncode == 0, up.stderr[-2000:]
    state = json.loads(up.stdout)
    assert state["isolated"] and state["object_store"]["bucket_uri"] == "s3://aiayn"
    assert len(_mount_namespaces() - namespaces_before) == 3  # one per node
    status = json.loads(_aiayn("cluster", "status", "--json", env=env, cwd=workdir).stdout)
    assert status["object_store"]["endpoint_url"] == state["object_store"]["endpoint_url"]
    assert status["mlflow_url"].startswith("http://127.0.0.1:")
    # MLflow admits the cluster's own login alone, kept in a file of mode 0600 that `up` and
    # `status` name without showing what it holds.
    login_file = Path(state["credentials"]["mlflow_login"])
    login = json.loads(login_file.read_text())
    assert stat.S_IMODE(login_file.stat().st_mode) == 0o600 and status["credentials"] == state["credentials"]
    assert login["password"] not in up.stdout + up.stderr + json.dumps(status)
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"{state['mlflow']}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
    # The bucket admits the cluster's own key alone, kept like MLflow's login.
    store_login_file = Path(state["credentials"]["object_store_login"])
    store_login = json.loads(store_login_file.read_text())
    assert stat.S_IMODE(store_login_file.stat().st_mode) == 0o600
    assert store_login["secret_key"] not in up.stdout + up.stderr + json.dumps(status)
    store_env = {**state["object_store"]["env"], "AWS_ACCESS_KEY_ID": store_login["access_key"],
                 "AWS_SECRET_ACCESS_KEY": store_login["secret_key"]}
    client_env = {**env, **store_env}  # this shell's view of the bucket, as a user would configure it
    os.environ.update(store_env)
    os.environ.update(MLFLOW_TRACKING_USERNAME=login["username"], MLFLOW_TRACKING_PASSWORD=login["password"])
    try:
        bucket = "s3://aiayn"
        for split, rows, seed in (("train", 800, 1), ("valid", 40, 2), ("test", 30, 3)):
            prefix = write_parallel_corpus(tmp_path / "corpus", rows, seed=seed, prefix=split)
            for lang in ("en", "de"):
                storage.write_bytes_atomic(f"{bucket}/corpus/{split}.{lang}", Path(f"{prefix}.{lang}").read_bytes())
        overrides = [
            "name=e2e", "model.preset=tiny", "model.dropout=0.1", "model.max_positions=64",
            "data.source.format=text", *(f"data.source.{s}={bucket}/corpus/{s}" for s in ("train", "valid", "test")),
            "data.tokenizer.vocab_size=64", "data.tokenizer.sample_sentences=2000",
            "data.shard_rows=400", "data.encode_actors=1",
            "data.encode_batch_rows=256",  # train is 2 shards: written by Ray Data's actors on the cluster
            "stream.max_tokens=300", "stream.window_rows=256", "stream.unit_rows=64",
            "optim.lr=0.003", "optim.warmup_steps=5", "optim.decay_steps=0", f"train.max_steps={STEPS}", "train.max_minutes=0",
            "train.log_every=1", "train.validate_every=20", "train.checkpoint_every_steps=10",
            "train.checkpoint_every_minutes=1000", "train.keep_checkpoints=3", "train.average_checkpoints=1",
            "train.beam_size=2", "cluster.num_workers=2", "tracking.registered_model=e2e-translator",
            "cluster.placement_strategy=STRICT_SPREAD", "cluster.max_failures=3",
        ]
        # data.output_dir and cluster.storage_path are left at their relative defaults, as in the
        # README's submit examples: a job of this cluster keeps them in its bucket (s3://aiayn/data,
        # s3://aiayn/runs), never in Ray's temporary copy of the project.
        # Prepare onto a path only the driver's node sees: refused in one line, before Ray Data runs.
        refused = _aiayn("submit", "--", "prepare", *overrides, "data.output_dir=/tmp/aiayn-node-local", env=env,
                         cwd=workdir)
        assert _wait_for_job(refused.stdout.strip(), env, workdir) == "FAILED"
        refused_log = _aiayn("jobs", "logs", refused.stdout.strip(), env=env, cwd=workdir).stdout
        assert "data.output_dir=/tmp/aiayn-node-local is not reachable from node" in refused_log, refused_log[-2000:]
        assert "Traceback" not in refused_log
        listing_before = _listing(Path("/tmp"), names=_JOB_WRITERS) | _listing(workdir) | _listing(ROOT)

        prepare = _aiayn("submit", "--", "prepare", *overrides, env=env, cwd=workdir)
        assert prepare.returncode == 0, prepare.stderr
        assert _wait_for_job(prepare.stdout.strip(), env, workdir) == "SUCCEEDED", \
            _aiayn("jobs", "logs", prepare.stdout.strip(), env=env, cwd=workdir).stdout[-3000:]
        versions = storage.list_dirs(f"{bucket}/data/text-en-de/versions")
        assert len(versions) == 1

        train = _aiayn("submit", "--name", "e2e-train", "--", "train", *overrides, env=env, cwd=workdir)
        assert train.returncode == 0 and train.stdout.strip() == "e2e-train", train.stderr
        deadline = time.monotonic() + 400
        while not _registered(f"{bucket}/runs/e2e") and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(_raylet_hosting_a_train_worker(), signal.SIGKILL)  # a node that runs a worker is lost
        assert _wait_for_job("e2e-train", env, workdir) == "SUCCEEDED", \
            _aiayn("jobs", "logs", "e2e-train", env=env, cwd=workdir).stdout[-3000:]
        logs = _aiayn("jobs", "logs", "e2e-train", env=env, cwd=workdir).stdout
        (tmp_path / "train-job.log").write_text(logs)  # kept with the test's files, to read when it fails
        printed_bleu = float(re.search(r"test BLEU (\d+\.\d+)", logs).group(1))

        assert storage.is_file(f"{bucket}/runs/e2e/export/export.json")  # the export is in the bucket
        client = MlflowClient(state["mlflow"])
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.`{RUN_NAME_TAG}` = 'e2e'")
        assert len(runs) == 1
        run = runs[0]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(1, STEPS + 1))  # every step once, across the restart
        assert int(run.data.tags["resumed_from_step"]) >= 10
        assert run.data.tags["node.rank0"] != run.data.tags["node.rank1"]  # STRICT_SPREAD
        assert {a.path for a in client.list_artifacts(run.info.run_id, "export")} >= {"export/model.safetensors",
                                                                                       "export/export.json"}
        # The job logged all that in as a user of its own (cluster/mlflow_users.py): no process of
        # the cluster holds the administrator's password, and the job's user may edit the run's
        # experiment and registered model, not delete the model (MANAGE stays with the administrator).
        assert _cluster_processes_holding(state["process_groups"], login["password"]) == []
        users = requests.get(f"{state['mlflow']}/api/2.0/mlflow/users/list", timeout=30,
                             auth=(login["username"], login["password"])).json()["users"]
        job_user = next(u["username"] for u in users if u["username"].startswith("job-e2e-train-"))
        assert not next(u for u in users if u["username"] == job_user)["is_admin"]
        auth = AuthServiceClient(state["mlflow"])
        assert auth.get_user_permission(job_user, "experiment", run.info.experiment_id).permission == "EDIT"
        assert auth.get_user_permission(job_user, "registered_model", "e2e-translator").permission == "EDIT"
        assert client.get_model_version("e2e-translator", "1").run_id == run.info.run_id
        # MLflow's artifacts beside its records in the cluster's state directory, kept across `down`
        assert (Path(env["AIAYN_HOME"]) / "mlflow" / "artifacts").is_dir()

        evaluate = _aiayn("evaluate", "--model", f"runs:/{run.info.run_id}/export", "--data", f"{bucket}/data/text-en-de",
                          "--beam", "2", env={**client_env, "MLFLOW_TRACKING_URI": state["mlflow"]}, cwd=fresh)
        assert evaluate.returncode == 0, evaluate.stderr[-2000:]
        assert json.loads(evaluate.stdout)["bleu"] == pytest.approx(printed_bleu, abs=0.005)
        assert run.data.metrics["test/bleu"] == pytest.approx(printed_bleu, abs=0.005)
        assert run.data.metrics["test/chrf"] == pytest.approx(json.loads(evaluate.stdout)["chrf"], abs=0.005)

        again = _aiayn("submit", "--", "prepare", *overrides, env=env, cwd=workdir)
        assert _wait_for_job(again.stdout.strip(), env, workdir) == "SUCCEEDED"
        assert "nothing to do" in _aiayn("jobs", "logs", again.stdout.strip(), env=env, cwd=workdir).stdout
        assert storage.list_dirs(f"{bucket}/data/text-en-de/versions") == versions

        listing_after = _listing(Path("/tmp"), names=_JOB_WRITERS) | _listing(workdir) | _listing(ROOT)
        assert sorted(listing_after - listing_before) == []
        assert list(fresh.iterdir()) == [] and list(workdir.iterdir()) == []
    finally:
        for variable in (*store_env, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(variable, None)
        down = _aiayn("cluster", "down", env=env, cwd=workdir)
    assert down.returncode == 0, down.stderr
    port = state["ray_address"].rsplit(":", 1)[1]
    leftover = subprocess.run(["pgrep", "-f", f"127.0.0.1:{port}"], capture_output=True, text=True).stdout.split()
    assert leftover == []
    for group in state["process_groups"]:
        assert live_processes_in_group(group) == []
    deadline = time.monotonic() + 30
    while _mount_namespaces() - namespaces_before and time.monotonic() < deadline:
        time.sleep(0.5)  # SIGKILLed processes are being reaped
    assert _mount_namespaces() - namespaces_before == set()

    # The bucket keeps the run across `down` and `up` (its store keeps its objects on disk).
    up = _aiayn("cluster", "up", "--nodes", "1", "--isolated", "--no-mlflow", env=env, cwd=workdir)
    assert up.returncode == 0, up.stderr[-2000:]
    endpoint = json.loads(up.stdout)["object_store"]["endpoint_url"]
    try:
        os.environ.update({**store_env, "AWS_ENDPOINT_URL": endpoint})
        assert storage.is_file(f"{bucket}/runs/e2e/export/export.json")
    finally:
        for variable in store_env:
            os.environ.pop(variable, None)
        assert _aiayn("cluster", "down", env=env, cwd=workdir).returncode == 0
    print(f"end-to-end wall time: {time.monotonic() - started:.0f} s")
