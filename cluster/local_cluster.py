"""`aiayn cluster up|status|down`: a real multi-node Ray cluster and an MLflow server on this
machine, on 127.0.0.1. The addresses and the process groups started are written to a state file
(default ~/.aiayn/cluster.json, or $AIAYN_HOME) where `submit`, `jobs` and `down` find them;
`down` stops exactly those process groups and the Ray processes of that cluster, nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.local import Service, start_mlflow_server, start_ray_head, start_ray_worker, wait_for_nodes


def state_dir() -> Path:
    return Path(os.environ.get("AIAYN_HOME", Path.home() / ".aiayn"))


def state_file() -> Path:
    return state_dir() / "cluster.json"


@dataclass
class ClusterState:
    ray_address: str  # GCS address, for `ray.init` / `--address`
    dashboard_url: str  # Ray dashboard and Jobs API
    mlflow_url: str
    process_groups: list[int]
    nodes: int
    log_dir: str


def read_state() -> ClusterState | None:
    path = state_file()
    if not path.is_file():
        return None
    return ClusterState(**json.loads(path.read_text()))


def up(nodes: int, cpus_per_node: int, *, with_mlflow: bool = True) -> ClusterState:
    if nodes < 1:
        raise ValueError("--nodes must be at least 1")
    existing = read_state()
    if existing is not None:
        raise RuntimeError(f"a cluster is already up ({existing.dashboard_url}); run `aiayn cluster down` first")
    logs = state_dir() / "logs"
    started: list[Service] = []
    try:
        head, address, dashboard = start_ray_head(logs, num_cpus=cpus_per_node)
        started.append(head)
        for index in range(1, nodes):  # one at a time: simultaneous joins time out on small machines
            started.append(_join(logs, address, cpus_per_node, index))
        mlflow_url = ""
        if with_mlflow:
            service, mlflow_url = start_mlflow_server(logs, state_dir() / "mlflow")
            started.append(service)
    except BaseException:
        for service in reversed(started):
            service.stop()
        raise
    state = ClusterState(address, dashboard, mlflow_url, [s.process.pid for s in started], nodes, str(logs))
    state_dir().mkdir(parents=True, exist_ok=True)
    state_file().write_text(json.dumps(asdict(state), indent=2))
    return state


def _join(logs: Path, address: str, cpus: int, index: int, attempts: int = 3) -> Service:
    """Start worker node `index` and wait until it is in the cluster; retry a start that died."""
    for attempt in range(attempts):
        service = start_ray_worker(logs, address, num_cpus=cpus, index=index)
        try:
            wait_for_nodes(address, index + 1, timeout=120, process=service.process)
            return service
        except RuntimeError:
            service.stop()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _cluster_pids(ray_address: str) -> list[int]:
    """Ray processes that belong to this cluster: their command line names its GCS address."""
    port = ray_address.rsplit(":", 1)[1]
    found = subprocess.run(["pgrep", "-f", f"127.0.0.1:{port}"], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found if int(pid) != os.getpid()]


def down(timeout: float = 30.0) -> list[int]:
    """Stop everything `up` started; returns the process groups stopped."""
    state = read_state()
    if state is None:
        return []
    for group in state.process_groups:
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive_group(g) for g in state.process_groups):
        time.sleep(0.5)
    for group in state.process_groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive_group(g) for g in state.process_groups):
        time.sleep(0.2)  # SIGKILL is sent, not yet done
    for pid in _cluster_pids(state.ray_address):  # workers that left the process group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    forget_current_cluster(state.ray_address)
    state_file().unlink(missing_ok=True)
    return state.process_groups


def forget_current_cluster(ray_address: str) -> None:
    """`ray start` records the cluster in /tmp/ray/ray_current_cluster, where a plain `ray.init()`
    would try to join it; once the cluster is down that record only causes hangs."""
    record = Path("/tmp/ray/ray_current_cluster")
    port = ray_address.rsplit(":", 1)[1]
    try:
        if record.read_text().strip().endswith(f":{port}"):
            record.unlink()
    except OSError:
        pass


def live_processes_in_group(group: int) -> list[int]:
    """Processes of a process group that are still running (zombies, already dead and only
    waiting for a parent to reap them, do not count)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _alive_group(group: int) -> bool:
    return bool(live_processes_in_group(group))


def status() -> dict:
    state = read_state()
    if state is None:
        return {"up": False}
    from cluster.runtime import use_token_auth_if_available

    use_token_auth_if_available()  # before Ray is imported: it reads the mode once, at import
    from ray.job_submission import JobSubmissionClient

    ray_status = subprocess.run([str(Path(os.sys.executable).with_name("ray")), "status", f"--address={state.ray_address}"],
                                capture_output=True, text=True)
    jobs = JobSubmissionClient(state.dashboard_url).list_jobs()
    return {
        "up": True, **asdict(state), "ray_status": ray_status.stdout.strip(),
        "jobs": [{"id": j.submission_id, "status": str(j.status.value), "entrypoint": j.entrypoint} for j in jobs],
    }
