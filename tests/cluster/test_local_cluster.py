"""`aiayn cluster` as a new user meets it: a fresh account with no Ray token, bad use, a broken
state file. Failures are one line with exit 2 (bad use) or 1 (a service), never a traceback."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from data_pipeline.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def _aiayn(*args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "cluster", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _env(tmp_path: Path) -> dict:
    env = {**os.environ, "HOME": str(tmp_path / "home"), "AIAYN_HOME": str(tmp_path / "aiayn")}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(name, None)
    (tmp_path / "home").mkdir()
    return env


def _one_line_error(result: subprocess.CompletedProcess, code: int) -> None:
    assert result.returncode == code, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr


def _as_another_account(*command: str) -> subprocess.CompletedProcess:
    """`command` run by another local account (nobody), as a second user of the machine would."""
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command],
                          capture_output=True, text=True, env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"})


_READABLE = "import sys\nfor path in sys.argv[1:]:\n    try:\n        open(path, 'rb').close()\n        print(path)\n    except OSError:\n        pass"
_HTTP_STATUS = ("import sys, urllib.request, urllib.error\ntry:\n    print(urllib.request.urlopen(sys.argv[1], "
                "timeout=30).status)\nexcept urllib.error.HTTPError as error:\n    print(error.code)")


@pytest.mark.slow
def test_up_on_a_fresh_account_keeps_its_secrets_and_lets_no_other_account_in(tmp_path) -> None:
    env = _env(tmp_path)
    enterable = Path(tempfile.mkdtemp(prefix="aiayn-test-"))  # pytest's own temp dir is closed to others
    enterable.chmod(0o755)
    env["AIAYN_HOME"] = str(enterable / "aiayn")
    token = tmp_path / "home" / ".ray" / "auth_token"
    up = _aiayn("up", "--nodes", "1", "--cpus-per-node", "1", env=env)
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600
        secret = token.read_text().strip()
        assert len(secret) >= 16 and secret not in up.stdout + up.stderr
        status = _aiayn("status", "--json", env=env)
        assert status.returncode == 0 and '"up": true' in status.stdout and secret not in status.stdout
        state = json.loads(status.stdout)
        login_file = Path(state["credentials"]["mlflow_login"])
        login = json.loads(login_file.read_text())
        assert stat.S_IMODE(login_file.stat().st_mode) == 0o600 and stat.S_IMODE(login_file.parent.stat().st_mode) == 0o700
        assert login["password"] not in up.stdout + up.stderr + status.stdout
        # Another account reaches neither service without the secrets it cannot read: MLflow
        # answers 401, Ray's Jobs API refuses to list or submit jobs.
        assert "Permission denied" in _as_another_account("cat", str(login_file)).stderr
        assert _as_another_account(sys.executable, "-c", _HTTP_STATUS,
                                   f"{state['mlflow_url']}/api/2.0/mlflow/experiments/search?max_results=1"
                                   ).stdout.strip() == "401"
        assert _as_another_account(sys.executable, "-c", _HTTP_STATUS, f"{state['dashboard_url']}/api/jobs/"
                                   ).stdout.strip() in ("401", "403")
        with urllib.request.urlopen(urllib.request.Request(  # the cluster's own login is let in
                f"{state['mlflow_url']}/api/2.0/mlflow/experiments/search?max_results=1",
                headers={"Authorization": "Basic " + base64.b64encode(
                    f"{login['username']}:{login['password']}".encode()).decode()}), timeout=30) as answer:
            assert answer.status == 200
        # and its name with another password is not, though the server now caches the right one
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(urllib.request.Request(
                f"{state['mlflow_url']}/api/2.0/mlflow/experiments/search?max_results=1",
                headers={"Authorization": "Basic " + base64.b64encode(
                    f"{login['username']}:{login['password']}x".encode()).decode()}), timeout=30)
        # Ray's sessions (777 inside) sit in a directory of this account's alone: another account
        # can neither list it nor reach a session's logs through it.
        ray_dir = Path(json.loads(status.stdout)["ray_temp_dir"])
        sessions = [path for path in ray_dir.iterdir() if path.name.startswith("session_2")]
        private = ray_dir.parent  # Ray makes its own directory 777
        assert sessions and stat.S_IMODE(private.stat().st_mode) == 0o700 and private.stat().st_uid == os.getuid()
        for target in (ray_dir, sessions[0] / "logs"):
            other = _as_another_account("ls", str(target))
            assert other.returncode != 0 and "Permission denied" in other.stderr, (target, other)
        # Jobs' relative locations lie in a directory of this account's, which another cannot list
        store = Path(state["storage"])
        assert store == enterable / "aiayn" / "store" and stat.S_IMODE(store.stat().st_mode) == 0o700
        assert "kept across `down`" in state["storage_kept"] and state["object_store"] == {}
        other = _as_another_account("ls", str(store))
        assert other.returncode != 0 and "Permission denied" in other.stderr, other
        # The cluster's state (its file, the services' logs, MLflow's databases), in a directory
        # others can enter: another account reads none of it.
        files = [str(path) for path in Path(env["AIAYN_HOME"]).rglob("*") if path.is_file()]
        assert any(name.endswith("cluster.json") for name in files) and any("logs" in name for name in files)
        readable = _as_another_account(sys.executable, "-c", _READABLE, *files)
        assert readable.returncode == 0 and readable.stdout.split() == [], readable.stdout
    finally:
        down = _aiayn("down", env=env)
        shutil.rmtree(enterable, ignore_errors=True)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert f"kept in {enterable / 'aiayn' / 'mlflow'}" in down.stdout
    assert f"kept in {enterable / 'aiayn' / 'store'}" in down.stdout


def _submitted(name: str, command: list[str], env: dict, timeout: float = 600) -> str:
    """Submit an aiayn command as the README does, wait for it and return its log (it must succeed)."""
    submit = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "--name", name, "--", *command],
                            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert submit.returncode == 0, submit.stderr[-2000:]
    job = submit.stdout.strip().splitlines()[-1]
    deadline, status = time.monotonic() + timeout, ""
    while time.monotonic() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(2)
        status = subprocess.run([sys.executable, "-m", "jobs.cli", "jobs", "status", job], capture_output=True,
                                text=True, timeout=60, env=env, cwd=ROOT).stdout.strip()
    logs = subprocess.run([sys.executable, "-m", "jobs.cli", "jobs", "logs", job], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    return logs


@pytest.mark.slow
def test_a_submitted_run_keeps_its_data_and_resumes_after_down_and_up(tmp_path, tiny_corpus) -> None:
    """The README's submit example with its relative locations: the dataset and the run land in
    the cluster's store, and after `down` + `up` the same submit resumes the run from it."""
    from tests.jobs.helpers import tiny_overrides

    env = _env(tmp_path)
    overrides = [o for o in tiny_overrides(tiny_corpus, tmp_path, "kept")
                 if not o.startswith(("data.output_dir=", "cluster.storage_path=", "cluster.num_workers="))]
    overrides += ["cluster.num_workers=1", "train.validate_every=0", "train.max_steps=5"]
    store = Path(env["AIAYN_HOME"]) / "store"
    try:
        assert _aiayn("up", "--nodes", "1", "--cpus-per-node", "2", "--no-mlflow", env=env).returncode == 0
        _submitted("kept-1", ["train", *overrides], env)
        checkpoint = store / "runs" / "kept" / "checkpoint_step00000005"
        assert checkpoint.is_dir() and (store / "data" / "text-en-de").is_dir()
        down = _aiayn("down", env=env)
        assert down.returncode == 0 and f"kept in {store}" in down.stdout, down.stdout
        up = _aiayn("up", "--nodes", "1", "--cpus-per-node", "2", "--no-mlflow", env=env)
        assert up.returncode == 0, up.stderr[-2000:]
        status = _aiayn("status", env=env)
        assert f"kept in {store}: a directory of your account's alone; kept across `down`" in status.stdout
        logs = _submitted("kept-2", ["train", *overrides[:-1], "train.max_steps=10"], env)
        assert f"resuming at step 5 from {checkpoint}" in logs, logs[-3000:]
        assert (store / "runs" / "kept" / "checkpoint_step00000010").is_dir()
        # A sweep is submitted as train is: its trials' runs land in the same store
        sweep = [o for o in overrides
                 if not o.startswith(("name=", "train.max_steps=", "train.validate_every=", "train.checkpoint_every_s"))]
        tune = ["tune", "--name", "rates", "--search", "optim.lr=grid(0.003,0.0001)", "--trials", "1",
                "--scheduler", "fifo", "--concurrent", "1"]
        logs = _submitted("kept-sweep", [*tune, *sweep, "train.max_steps=5", "train.validate_every=5",
                                         "train.checkpoint_every_steps=5"], env)
        assert logs.count("started: optim.lr=") == 2 and logs.count("finished at step 5") == 2, logs[-3000:]
        assert "sweep rates: best trial" in logs and len(list((store / "runs").glob("rates-*/export"))) == 2
    finally:
        _aiayn("down", env=env)


def test_bad_use_and_a_broken_state_file_are_one_line(tmp_path) -> None:
    env = _env(tmp_path)
    _one_line_error(_aiayn("up", "--nodes", "0", env=env), 2)
    state = Path(env["AIAYN_HOME"]) / "cluster.json"
    state.parent.mkdir(parents=True)
    state.write_text("{not json")
    _one_line_error(_aiayn("status", env=env), 2)
    _one_line_error(_aiayn("up", env=env), 2)
    assert state.read_text() == "{not json"  # nothing of the user's is replaced


def test_down_with_a_stale_state_file_never_signals_an_unrelated_process(tmp_path) -> None:
    """After a crash or reboot the recorded process ids may belong to someone else now."""
    env = _env(tmp_path)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)  # a live process group leader
    try:
        state = Path(env["AIAYN_HOME"]) / "cluster.json"
        state.parent.mkdir(parents=True)
        state.write_text(json.dumps({
            "ray_address": "127.0.0.1:1", "dashboard_url": "http://127.0.0.1:2", "mlflow_url": "",
            "process_groups": [bystander.pid], "nodes": 1, "log_dir": str(tmp_path), "cluster_id": "0" * 32,
        }))
        down = _aiayn("down", env=env)
        assert down.returncode == 0, down.stderr
        time.sleep(0.5)
        assert bystander.poll() is None  # still running: it never carried the cluster's id
        assert not state.exists()
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.slow
def test_two_concurrent_ups_leave_one_cluster_and_down_leaves_nothing(tmp_path) -> None:
    from cluster.local_cluster import processes_of_cluster

    env = _env(tmp_path)
    command = [sys.executable, "-m", "jobs.cli", "cluster", "up", "--nodes", "1", "--cpus-per-node", "1",
               "--no-mlflow", "--no-object-store"]
    both = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            for _ in range(2)]
    results = [(p.wait(timeout=180), *p.communicate()) for p in both]
    try:
        assert sorted(code for code, _, _ in results) == [0, 2], results
        loser = next(err for code, _, err in results if code == 2)
        assert len(loser.strip().splitlines()) == 1 and "Traceback" not in loser
        state = json.loads(next(out for code, out, _ in results if code == 0))
    finally:
        down = _aiayn("down", env=env)
    assert down.returncode == 0, down.stderr
    assert not (Path(env["AIAYN_HOME"]) / "cluster.json").exists()  # the state is gone with the cluster
    assert processes_of_cluster(state["cluster_id"]) == []


def test_the_clusters_mlflow_login_goes_to_its_own_server_only(tmp_path, monkeypatch) -> None:
    from cluster import local_cluster
    from cluster.credentials import mlflow_login

    monkeypatch.setenv("AIAYN_HOME", str(tmp_path / "aiayn"))
    login = mlflow_login(local_cluster.credentials_dir())
    assert mlflow_login(local_cluster.credentials_dir()) == login  # made once, then kept
    path = local_cluster.credentials_dir() / "mlflow-login.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    local_cluster.write_state(local_cluster.ClusterState(
        "127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:5000", [], 1, str(tmp_path),
        credentials={"mlflow_login": str(path)}))
    assert local_cluster.mlflow_login_for("http://127.0.0.1:5000/") == login.client_environment()
    assert local_cluster.mlflow_login_for("https://mlflow.example.com") == {}
    path.chmod(0o644)  # readable by others: refused, not used
    with pytest.raises(InputError, match="chmod 600"):
        local_cluster.mlflow_login_for("http://127.0.0.1:5000")
