"""`aiayn cluster up|status|down`: a real multi-node Ray cluster and an MLflow server on this
machine, on 127.0.0.1. Its nodes share this disk, so jobs keep their relative locations in a
directory of this account's alone (`store_dir`), kept across `down` and `up`. With `isolated`,
every Ray node runs in its own mount namespace (cluster/isolation.py) so that nodes share only the
network, an S3 object store (cluster/s3_store.py, kept on disk, admitting this account's key alone)
and the Python environment, as on a cluster of separate machines.

The addresses and the process groups started are written to a state file (default
~/.aiayn/cluster.json, or $AIAYN_HOME) where `submit`, `jobs` and `down` find them. Every process
`up` starts carries a random cluster id in its environment (AIAYN_CLUSTER_ID), which every process
Ray starts inherits: `down` signals only processes that carry it, so a stale state file whose
process ids were reused after a crash or reboot never makes it kill anything else. `up` and
`down` hold a lock on the state directory; the state file is written atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.account_dir import ray_temp_dir
from cluster.credentials import (
    SIGNING_KEY_ENV, aiayn_home, mlflow_login, mlflow_login_path, private_dir, read_mlflow_login, read_store_login,
    signing_key, store_login, store_login_path, write_private,
)
from cluster.job_environment import named_variables
from cluster.s3_store import access_key
from cluster.services import (
    Isolation, Service, ServiceError, alive_nodes, live_processes_in_group, object_store_env, start_mlflow_server,
    start_object_store, start_ray_head, start_ray_worker, wait_for_nodes,
)
from data_pipeline.errors import InputError

BUCKET = "aiayn"


def state_dir() -> Path:
    """Made private (0700) by whoever writes into it first (`_exclusive`)."""
    return aiayn_home()


def state_file() -> Path:
    return state_dir() / "cluster.json"


def credentials_dir() -> Path:
    return state_dir() / "credentials"


def mlflow_dir() -> Path:
    """MLflow's runs, artifacts and users: kept across `down` and `up`."""
    return state_dir() / "mlflow"


def object_store_dir() -> Path:
    """The isolated cluster's object store keeps its objects (and Swift's configuration) here:
    kept across `down` and `up`."""
    return state_dir() / "object-store"


def store_dir() -> Path:
    """Where jobs on a cluster whose nodes share this disk keep their relative locations (datasets,
    runs): a directory of this account's alone, kept across `down` and `up`."""
    return state_dir() / "store"


@dataclass
class ClusterState:
    ray_address: str  # GCS address, for `ray.init` / `--address`
    dashboard_url: str  # Ray dashboard and Jobs API
    mlflow_url: str
    process_groups: list[int]
    nodes: int
    log_dir: str
    object_store: dict = field(default_factory=dict)  # endpoint_url, bucket_uri, env
    isolated: bool = False
    cluster_id: str = ""  # in the environment of every process of this cluster
    cpus_per_node: int = 2
    worker_nodes: dict = field(default_factory=dict)  # "ray-worker-<i>" -> its process group
    private_dirs: list = field(default_factory=list)  # isolated nodes: the directories each has empty
    named_env: list = field(default_factory=list)  # `up --env NAME`: names only; a node added later reads them again
    ray_temp_dir: str = ""  # Ray's sessions, logs and the jobs' unpacked code, inside a directory of this account's
    credentials: dict = field(default_factory=dict)  # what -> the file (mode 0600) that holds it; never the secret
    storage: str = ""  # the root of jobs' relative locations: store_dir(), or the bucket of an isolated cluster
    storage_kept: str = ""  # what becomes of it at `down`, in words


def read_state() -> ClusterState | None:
    path = state_file()
    if not path.is_file():
        return None
    try:
        return ClusterState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise InputError(f"{path}: not a cluster state file aiayn can read ({error}); move it away if no cluster "
                         "of yours is running") from None


def ray_token() -> Path:
    """Ray's token file (~/.ray/auth_token), created if this account has none, readable by its
    owner only. Ray's own generator makes it; its output (the token) is discarded, never shown."""
    path = Path.home() / ".ray" / "auth_token"
    if not path.is_file():
        made = subprocess.run([str(Path(sys.executable).with_name("ray")), "get-auth-token", "--generate"],
                              capture_output=True, text=True, preexec_fn=lambda: os.umask(0o077))
        if made.returncode != 0 or not path.is_file():
            raise ServiceError(f"could not create Ray's token {path}: `ray get-auth-token --generate` exited "
                               f"{made.returncode}")
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path


def _check_can_isolate() -> None:
    if os.geteuid() != 0 or any(shutil.which(command) is None for command in ("unshare", "mount", "ip")):
        raise InputError("--isolated needs root, the unshare and mount commands (util-linux) and ip (iproute2): "
                         "each node gets its own mount namespace, the object store its own network")


CLUSTER_ID = "AIAYN_CLUSTER_ID"


@contextlib.contextmanager
def _exclusive():
    """One `up` or `down` at a time per state directory (made private: it holds the cluster's
    secrets, MLflow's store and every service's log)."""
    private_dir(state_dir())
    with open(state_dir() / "cluster.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another `aiayn cluster up` or `down` is running for {state_dir()}; wait for it") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def up(nodes: int, cpus_per_node: int, *, with_mlflow: bool = True, with_object_store: bool = True,
       isolated: bool = False, named_env: list[str] | None = None) -> ClusterState:
    """Start the cluster; on any failure stop what was started and raise (nothing is left running).
    Its processes inherit this shell's settings but no credential except those in `named_env`."""
    if nodes < 1:
        raise InputError("--nodes must be at least 1")
    if isolated:
        _check_can_isolate()
    named = named_variables(named_env or [])
    with _exclusive():
        return _up(nodes, cpus_per_node, with_mlflow, with_object_store, isolated, named)


def _up(nodes: int, cpus_per_node: int, with_mlflow: bool, with_object_store: bool, isolated: bool,
        named: dict[str, str]) -> ClusterState:
    existing = read_state()
    if existing is not None:
        raise InputError(f"a cluster is already up ({existing.dashboard_url}); run `aiayn cluster down` first")
    logs = state_dir() / "logs"
    started: list[Service] = []
    marker = {CLUSTER_ID: uuid.uuid4().hex}
    try:
        token = ray_token()
        store_env, object_store = {}, {}
        credentials = {}
        if not isolated:
            storage, kept = str(private_dir(store_dir())), "a directory of your account's alone; kept across `down`"
        else:  # nodes that share no disk share the object store instead
            storage, kept = "", "nowhere: relative locations are refused; give every job an s3:// location"
            if with_object_store:
                store_login(credentials_dir(), access_key())
                credentials["object_store_login"] = str(store_login_path(credentials_dir()))
                service, endpoint = start_object_store(logs, private_dir(object_store_dir()),
                                                       store_login_path(credentials_dir()), BUCKET, env=marker)
                started.append(service)
                object_store = {"endpoint_url": endpoint, "bucket_uri": f"s3://{BUCKET}",
                                "env": object_store_env(endpoint)}
                store_env = {**object_store["env"], **_store_login_environment(credentials)}
                storage, kept = f"s3://{BUCKET}", (f"the local object store, on disk in {object_store_dir()}: kept "
                                                   "across `down`; it admits this account's key alone")
        private = [str(Path("/tmp")), str(Path.home()), str(Path.cwd())] if isolated else []
        isolation = Isolation(tuple(Path(d) for d in private), token) if isolated else None
        login = mlflow_login(credentials_dir()) if with_mlflow else None
        if login is not None:
            credentials["mlflow_login"] = str(mlflow_login_path(credentials_dir()))
        # Jobs inherit what the nodes carry: the store's endpoint and the key that signs this
        # account's checkpoints (an isolated node has a home of its own). Not MLflow's administrator:
        # each job gets a user of its own from `aiayn submit` (cluster/mlflow_users.py).
        node_env = {**named, **store_env, **_signing_environment(), **marker}
        temp_dir = ray_temp_dir()
        head, address, dashboard = start_ray_head(logs, num_cpus=cpus_per_node, temp_dir=temp_dir, env=node_env,
                                                  isolation=isolation)
        started.append(head)
        workers = {}
        for index in range(1, nodes):  # one at a time: simultaneous joins time out on small machines
            service = _join(logs, address, cpus_per_node, index, node_env, isolation, expected_nodes=index + 1)
            started.append(service)
            workers[service.name] = service.process.pid
        mlflow_url = ""
        if login is not None:  # its artifacts beside its records, in the state directory: kept together
            service, mlflow_url = start_mlflow_server(logs, mlflow_dir(), env=marker, login=login)
            started.append(service)
    except BaseException:
        for service in reversed(started):
            service.stop()
        raise
    state = ClusterState(address, dashboard, mlflow_url, [s.process.pid for s in started], nodes, str(logs),
                         object_store, isolated, marker[CLUSTER_ID], cpus_per_node, workers, private, list(named),
                         str(temp_dir), credentials, storage, kept)
    write_state(state)
    return state


def write_state(state: ClusterState) -> None:
    """Temp file + rename: a reader never sees half a state file; mode 0600."""
    write_private(state_file(), json.dumps(asdict(state), indent=2))


def _join(logs: Path, address: str, cpus: int, index: int, env: dict, isolation: Isolation | None,
          expected_nodes: int, attempts: int = 3) -> Service:
    """Start worker node `index` and wait until the cluster has `expected_nodes`; retry a start
    that died."""
    for attempt in range(attempts):
        service = start_ray_worker(logs, address, num_cpus=cpus, index=index, env=env, isolation=isolation)
        try:
            wait_for_nodes(address, expected_nodes, timeout=120, process=service.process)
            return service
        except ServiceError:
            service.stop()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def add_node() -> str:
    """Start one more worker node like the others (isolated if they are); returns its name."""
    with _exclusive():
        state = _require_state()
        index = 1 + max((int(name.rsplit("-", 1)[1]) for name in state.worker_nodes), default=0)
        isolation = Isolation(tuple(Path(d) for d in state.private_dirs), ray_token()) if state.isolated else None
        env = {**named_variables(state.named_env), **state.object_store.get("env", {}),
               **_store_login_environment(state.credentials), **_signing_environment(),
               CLUSTER_ID: state.cluster_id}
        service = _join(Path(state.log_dir), state.ray_address, state.cpus_per_node, index, env, isolation,
                        expected_nodes=alive_nodes(state.ray_address) + 1)
        state.worker_nodes[service.name] = service.process.pid
        state.process_groups.append(service.process.pid)
        state.nodes += 1
        write_state(state)
        return service.name


def remove_node(name: str, grace_s: float = 30.0) -> str:
    """Take worker node `name` away as a cloud would reclaim it: Ray is told the node is being
    preempted (`ray drain-node`, with a deadline of `grace_s`), so that running training
    checkpoints at once; after the deadline the node's processes are stopped. Returns its Ray id."""
    with _exclusive():
        state = _require_state()
        if name not in state.worker_nodes:
            raise InputError(f"remove-node {name}: no such worker node; the cluster has "
                             f"{', '.join(sorted(state.worker_nodes)) or 'none'} (the head cannot be removed)")
        group = state.worker_nodes[name]
        node_id = _ray_node_id(group)
        drained = subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "drain-node", f"--address={state.ray_address}",
             f"--node-id={node_id}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
             "--reason-message=aiayn cluster remove-node", f"--deadline-remaining-seconds={int(grace_s)}"],
            capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "token"})
        if drained.returncode != 0:
            raise ServiceError(f"ray drain-node refused {name} ({node_id[:12]}): {drained.stderr.strip()[-300:]}")
        time.sleep(grace_s)
        _signal_groups([group], signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive_group(group):
            time.sleep(0.5)
        _signal_groups([group], signal.SIGKILL)
        del state.worker_nodes[name]
        state.process_groups.remove(group)
        state.nodes -= 1
        write_state(state)
        return node_id


def _signing_environment() -> dict[str, str]:
    return {SIGNING_KEY_ENV: signing_key().decode()}


def _store_login_environment(credentials: dict) -> dict[str, str]:
    path = credentials.get("object_store_login")
    return read_store_login(Path(path)).client_environment() if path else {}


def _login_environment(state: ClusterState) -> dict[str, str]:
    path = state.credentials.get("mlflow_login")
    return read_mlflow_login(Path(path)).client_environment() if path else {}


def mlflow_login_for(tracking_uri: str) -> dict[str, str]:
    """The login of this account's local cluster if `tracking_uri` is that cluster's MLflow, else
    nothing (its credentials go to no other server)."""
    state = read_state()
    if state is None or not state.mlflow_url or tracking_uri.rstrip("/") != state.mlflow_url.rstrip("/"):
        return {}
    return _login_environment(state)


def _require_state() -> ClusterState:
    state = read_state()
    if state is None:
        raise InputError("no cluster is up; start one with `aiayn cluster up`")
    return state


def _ray_node_id(group: int) -> str:
    """The Ray node id of the node started as process group `group` (its raylet's --node_id)."""
    for pid in live_processes_in_group(group):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in args:
            if arg.startswith(b"--node_id="):
                return arg.split(b"=", 1)[1].decode()
    raise ServiceError(f"no raylet found in process group {group}; is the node still running?")


def processes_of_cluster(cluster_id: str) -> list[int]:
    """Live processes whose environment carries this cluster's id: those `up` started and their
    descendants, and nothing else (a reused process id does not carry a random id)."""
    if not cluster_id:
        return []
    needle = f"{CLUSTER_ID}={cluster_id}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0") and int(environ.parent.name) != os.getpid():
                found.append(int(environ.parent.name))
        except (OSError, ValueError):
            continue  # gone, or another user's
    return found


def _signal_groups(groups: list[int], signum: int) -> None:
    for group in groups:
        try:
            os.killpg(group, signum)
        except ProcessLookupError:
            pass


def down(timeout: float = 5.0) -> list[int]:
    """Stop everything `up` started; returns the process groups stopped. A Ray node takes about
    30 s to leave after SIGTERM and keeps nothing worth waiting for, so what is still running
    after `timeout` seconds is SIGKILLed. Only processes that carry the cluster's id are signalled."""
    with _exclusive():
        state = read_state()
        if state is None:
            return []
        ours = set(processes_of_cluster(state.cluster_id))
        groups = [group for group in state.process_groups if group in ours]
        _signal_groups(groups, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive_group(g) for g in groups):
            time.sleep(0.5)
        _signal_groups(groups, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive_group(g) for g in groups):
            time.sleep(0.2)  # SIGKILL is sent, not yet done
        for pid in processes_of_cluster(state.cluster_id):  # Ray workers that left the process groups
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        forget_current_cluster(state.ray_address)
        state_file().unlink(missing_ok=True)
        return groups


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


def _alive_group(group: int) -> bool:
    return bool(live_processes_in_group(group))


def status() -> dict:
    state = read_state()
    if state is None:
        return {"up": False}
    from cluster.ray_connection import use_token_auth_if_available

    use_token_auth_if_available()  # before Ray is imported: it reads the mode once, at import
    from ray.job_submission import JobSubmissionClient

    ray_status = subprocess.run([str(Path(sys.executable).with_name("ray")), "status", f"--address={state.ray_address}"],
                                capture_output=True, text=True)
    try:
        jobs = JobSubmissionClient(state.dashboard_url).list_jobs()
    except Exception as error:  # noqa: BLE001 - any failure to reach the Jobs API is one line to the user
        raise ServiceError(f"the Jobs API at {state.dashboard_url} does not answer ({str(error).splitlines()[0]}); "
                           f"see the logs in {state.log_dir}") from None
    return {
        "up": True, **asdict(state), "ray_status": ray_status.stdout.strip(),
        "jobs": [{"id": j.submission_id, "status": str(j.status.value), "entrypoint": j.entrypoint} for j in jobs],
    }
