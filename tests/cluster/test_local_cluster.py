"""`aiayn cluster` as a new user meets it: a fresh account with no Ray token, bad use, a broken
state file. Failures are one line with exit 2 (bad use) or 1 (a service), never a traceback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_up_on_a_fresh_account_creates_a_private_token_and_never_prints_it(tmp_path) -> None:
    env = _env(tmp_path)
    token = tmp_path / "home" / ".ray" / "auth_token"
    up = _aiayn("up", "--nodes", "1", "--cpus-per-node", "1", "--no-mlflow", "--no-object-store", env=env)
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600
        secret = token.read_text().strip()
        assert len(secret) >= 16 and secret not in up.stdout + up.stderr
        status = _aiayn("status", "--json", env=env)
        assert status.returncode == 0 and '"up": true' in status.stdout and secret not in status.stdout
        # Ray's sessions (777 inside) sit in a directory of this account's alone: another account
        # can neither list it nor reach a session's logs through it.
        ray_dir = Path(json.loads(status.stdout)["ray_temp_dir"])
        sessions = [path for path in ray_dir.iterdir() if path.name.startswith("session_2")]
        private = ray_dir.parent  # Ray makes its own directory 777
        assert sessions and stat.S_IMODE(private.stat().st_mode) == 0o700 and private.stat().st_uid == os.getuid()
        for target in (ray_dir, sessions[0] / "logs"):
            other = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", str(target)],
                                   capture_output=True, text=True)
            assert other.returncode != 0 and "Permission denied" in other.stderr, (target, other)
    finally:
        down = _aiayn("down", env=env)
    assert down.returncode == 0 and "stopped" in down.stdout


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
