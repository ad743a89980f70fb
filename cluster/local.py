"""Real services on this machine, on 127.0.0.1: Ray nodes started with `ray start` and an MLflow
tracking server. Each is started in the foreground (`ray start --block`) in its own process
group, so stopping it stops exactly what was started here, and nothing else on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _wait_until(check, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}; see {log}")
        if check():
            return
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s; see {log}")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((LOOPBACK, port)) == 0


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the service's process group, then SIGKILL whatever is left."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=timeout)


# Ray 2.60 turns token authentication on for clusters started with `ray start --head`; processes
# that join or connect must be told to send the token (from ~/.ray/auth_token).
RAY_TOKEN_AUTH = {"RAY_AUTH_MODE": "token"}


def _spawn(name: str, command: list[str], log_dir: Path, env: dict | None = None) -> Service:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    handle = open(log, "ab")
    # Jobs run `python -m jobs.cli ...`: this interpreter must be the `python` their shells find.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "PATH": path, **(env or {})})
    handle.close()
    return Service(name, process, log)


def start_ray_head(log_dir: Path, *, num_cpus: int, port: int | None = None, dashboard_port: int | None = None,
                   temp_dir: Path | None = None) -> tuple[Service, str, str]:
    """A Ray head node; returns (service, GCS address, dashboard/job-server URL)."""
    port, dashboard_port = port or free_port(), dashboard_port or free_port()
    command = [
        _bin("ray"), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={port}",
        f"--num-cpus={num_cpus}", "--include-dashboard=true", f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
    ]
    if temp_dir is not None:
        command.append(f"--temp-dir={temp_dir}")
    service = _spawn("ray-head", command, log_dir, RAY_TOKEN_AUTH)
    _wait_until(lambda: _port_open(port) and _port_open(dashboard_port), 90, "ray head", service.process, service.log)
    return service, f"{LOOPBACK}:{port}", f"http://{LOOPBACK}:{dashboard_port}"


def start_ray_worker(log_dir: Path, address: str, *, num_cpus: int, index: int) -> Service:
    command = [_bin("ray"), "start", "--block", f"--address={address}", f"--node-ip-address={LOOPBACK}",
               f"--num-cpus={num_cpus}", "--disable-usage-stats"]
    return _spawn(f"ray-worker-{index}", command, log_dir, RAY_TOKEN_AUTH)


def wait_for_nodes(address: str, count: int, timeout: float = 90.0, process: subprocess.Popen | None = None) -> None:
    """Block until `count` nodes are alive (asked through `ray status`); RuntimeError if `process`
    (the node being started) exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode} before its node joined")
        status = subprocess.run([_bin("ray"), "status", f"--address={address}"], capture_output=True, text=True,
                                env={**os.environ, **RAY_TOKEN_AUTH})
        if status.returncode == 0 and status.stdout.count("node_") >= count:
            return
        time.sleep(1.0)
    raise TimeoutError(f"fewer than {count} Ray nodes came up at {address} within {timeout:.0f} s")


def start_mlflow_server(log_dir: Path, store: Path, *, port: int | None = None) -> tuple[Service, str]:
    """`mlflow server` with a SQLite backend and an artifact root, on 127.0.0.1; returns its URL."""
    port = port or free_port()
    store.mkdir(parents=True, exist_ok=True)
    command = [
        _bin("mlflow"), "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", str(store / "artifacts"),
    ]
    service = _spawn("mlflow", command, log_dir)
    url = f"http://{LOOPBACK}:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    _wait_until(healthy, 120, "mlflow server", service.process, service.log)
    return service, url
