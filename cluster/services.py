"""Real services on this machine, on 127.0.0.1: Ray nodes started with `ray start`, an MLflow
tracking server and an S3 object store (OpenStack Swift, cluster/s3_store.py). Each is started in the
foreground (`ray start --block`) in its own process group, so stopping it stops exactly what was
started here, and nothing else on the machine. A Ray node can be isolated: see cluster/isolation.py.

A service's port is chosen free, then bound by the service seconds later: another account may
bind it first. A service counts as up only once every socket listening on its ports is held by
the service's own processes (`_serves`); any other listener is refused before a request, a token
or a login is sent to it. The object store is handed its socket already bound instead.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cluster.credentials import MlflowLogin, read_store_login, store_login, store_login_path, write_private
from cluster.job_environment import inherited_environment
from cluster.processes import listening_sockets, socket_holders
from cluster.s3_store import REGION as STORE_REGION
from cluster.s3_store import access_key

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


class ServiceError(RuntimeError):
    """A service failed to start; the message names its log."""


def _wait_until(check, timeout: float, what: str, service: "Service") -> None:
    """Until `check()` holds; a service that exits, fails the check or stays silent is stopped."""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise ServiceError(f"{what} exited with {service.process.returncode}; see {service.log}")
            if check():
                return
            time.sleep(0.3)
        raise ServiceError(f"{what} did not come up within {timeout:.0f} s; see {service.log}")
    except BaseException:
        service.stop()
        raise


def _serves(service: "Service", port: int) -> bool:
    """Whether `port` is listened on, by `service`'s processes alone (its session: what it
    started stays in it). A listener held by anything else, one of another account's included
    (whose holder this account cannot see), raises ServiceError."""
    holders = socket_holders(listening_sockets(port))
    if not holders:
        return False
    ours = set(live_processes_in_session(service.process.pid))
    strangers = {inode: pids for inode, pids in holders.items() if not pids or pids - ours}
    if strangers:
        seen = sorted(pid for pids in strangers.values() for pid in pids)
        raise ServiceError(f"port {port} on {LOOPBACK}, chosen for the {service.name}, is held by "
                           f"{'process ' + ', '.join(map(str, seen)) if seen else 'another account'}, not by the "
                           f"{service.name}; nothing was sent to it: start again (another port is chosen)")
    return True


@dataclass(frozen=True)
class Isolation:
    """Run a Ray node in its own mount namespace with these directories private (empty)."""

    private: tuple[Path, ...]
    token: Path | None


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the service's process group, then SIGKILL whatever is left after `timeout`
        seconds (a Ray node takes about 30 s to leave on SIGTERM and keeps nothing worth it), then
        whatever is left of its session.

        The session is needed because Ray starts each worker in a process group of its own: one
        that hangs while exiting once its raylet is gone (seen: a `ray::TrainController` on a
        futex) outlives the group. A service leads its session (`start_new_session`) and what it
        starts stays in it; Linux does not reuse a session's id while any process carries it, so
        every process found in it was started here."""
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
        deadline = time.monotonic() + timeout
        while (left := live_processes_in_session(self.process.pid)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)  # SIGKILL is sent, not yet done


def _live_processes(field: int, value: int) -> list[int]:
    """Running processes (zombies, already dead and only waiting to be reaped, do not count) whose
    /proc/<pid>/stat `field`, counted after the command name, equals `value`."""
    alive = []
    for record in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = record.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        if int(fields[field]) == value and fields[0] != "Z":
            alive.append(int(record.parent.name))
    return alive


def live_processes_in_group(group: int) -> list[int]:
    return _live_processes(2, group)


def live_processes_in_session(session: int) -> list[int]:
    return _live_processes(3, session)


# Ray 2.60 turns token authentication on for clusters started with `ray start --head`; processes
# that join or connect must be told to send the token (from ~/.ray/auth_token).
RAY_TOKEN_AUTH = {"RAY_AUTH_MODE": "token"}


def _spawn(name: str, command: list[str], log_dir: Path, env: dict | None = None,
           isolation: Isolation | None = None, pass_fds: tuple[int, ...] = ()) -> Service:
    if isolation is not None:
        from cluster.isolation import node_command

        command = node_command(command, list(isolation.private), isolation.token)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    handle = open(log, "ab")
    # Jobs run `python -m jobs.cli ...`: this interpreter must be the `python` their shells find.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                               pass_fds=pass_fds, env={**inherited_environment(), "PATH": path, **(env or {})})
    handle.close()
    return Service(name, process, log)


def start_ray_head(log_dir: Path, *, num_cpus: int, port: int | None = None, dashboard_port: int | None = None,
                   temp_dir: Path | None = None, env: dict | None = None,
                   isolation: Isolation | None = None) -> tuple[Service, str, str]:
    """A Ray head node; returns (service, GCS address, dashboard/job-server URL)."""
    port, dashboard_port = port or free_port(), dashboard_port or free_port()
    command = [
        _bin("ray"), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={port}",
        f"--num-cpus={num_cpus}", "--include-dashboard=true", f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
    ]
    if temp_dir is not None:
        command.append(f"--temp-dir={temp_dir}")
    service = _spawn("ray-head", command, log_dir, {**(env or {}), **RAY_TOKEN_AUTH}, isolation)
    _wait_until(lambda: _serves(service, port) and _serves(service, dashboard_port), 90, "ray head", service)
    return service, f"{LOOPBACK}:{port}", f"http://{LOOPBACK}:{dashboard_port}"


def start_ray_worker(log_dir: Path, address: str, *, num_cpus: int, index: int, env: dict | None = None,
                     isolation: Isolation | None = None) -> Service:
    command = [_bin("ray"), "start", "--block", f"--address={address}", f"--node-ip-address={LOOPBACK}",
               f"--num-cpus={num_cpus}", "--disable-usage-stats"]
    return _spawn(f"ray-worker-{index}", command, log_dir, {**(env or {}), **RAY_TOKEN_AUTH}, isolation)


def alive_nodes(address: str) -> int:
    """How many nodes `ray status` lists as alive (0 if it does not answer)."""
    status = subprocess.run([_bin("ray"), "status", f"--address={address}"], capture_output=True, text=True,
                            env={**os.environ, **RAY_TOKEN_AUTH})
    if status.returncode != 0:
        return 0
    healthy = status.stdout.split("Pending:")[0]  # lost nodes are listed after it, under "Recent failures"
    return healthy.count("node_")


def wait_for_nodes(address: str, count: int, timeout: float = 90.0, process: subprocess.Popen | None = None) -> None:
    """Block until `count` nodes are alive; ServiceError if `process` (the node being started)
    exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"ray start exited with {process.returncode} before its node joined")
        if alive_nodes(address) >= count:
            return
        time.sleep(1.0)
    raise ServiceError(f"fewer than {count} Ray nodes came up at {address} within {timeout:.0f} s")


def _healthy(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _tracking_store_answers(url: str, login: MlflowLogin | None) -> bool:
    """Whether the server answers a tracking request. Its /health answers before the server has
    opened its store, which it does on the first request (0.5 s idle, over 3 s on a loaded
    2-core machine): a client with a short timeout would see the first run's first call fail."""
    headers = {}
    if login is not None:
        token = base64.b64encode(f"{login.username}:{login.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return _healthy(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers)


def start_mlflow_server(log_dir: Path, store: Path, *, port: int | None = None, artifacts_destination: str = "",
                        env: dict | None = None, login: MlflowLogin | None = None) -> tuple[Service, str]:
    """`mlflow server` with a SQLite backend on 127.0.0.1; returns its URL. Artifacts go to
    `artifacts_destination` (a local directory under `store` by default, or an s3:// URI) and
    clients reach them through the server (proxied), so they need no storage credentials.

    With `login`, MLflow's own authentication (its basic-auth app) admits that user alone: its
    configuration (mode 0600) and its user database live in `store`."""
    port = port or free_port()
    store.mkdir(parents=True, exist_ok=True)
    command = [
        _bin("mlflow"), "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", artifacts_destination or str(store / "artifacts"),
    ]
    env = dict(env or {})
    if login is not None:
        command += ["--app-name", "basic-auth"]
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(_mlflow_auth_config(store, login)),
                   MLFLOW_FLASK_SERVER_SECRET_KEY=login.server_secret)
    service = _spawn("mlflow", command, log_dir, env)
    url = f"http://{LOOPBACK}:{port}"
    _wait_until(lambda: _serves(service, port) and _tracking_store_answers(url, login), 120, "mlflow server", service)
    return service, url


AUTH_CACHE_S = 300  # how long the MLflow server trusts a password it has verified


def _mlflow_auth_config(store: Path, login: MlflowLogin) -> Path:
    """MLflow's auth app settings: the administrator it creates on its first start (later starts
    find it in auth.db), and no permission for anyone else.

    Verifying a password is a deliberately slow hash, ~0.4 s of the server's CPU per request here,
    which every request paid (a rank's metrics, each artifact: 25 s to log the model at a run's
    end). MLflow's own credential cache (`auth_cache_ttl_seconds`, off by default) checks it once
    per `AUTH_CACHE_S`; its staleness (a password changed behind the server's back) cannot arise
    here: the one user's password is set when its state directory is created and never changed."""
    path = store / "basic_auth.ini"
    write_private(path, "\n".join([
        "[mlflow]", "default_permission = NO_PERMISSIONS", f"database_uri = sqlite:///{store / 'auth.db'}",
        f"admin_username = {login.username}", f"admin_password = {login.password}",
        f"auth_cache_ttl_seconds = {AUTH_CACHE_S}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth", "",
    ]))
    return path


def object_store_env(endpoint: str) -> dict[str, str]:
    """The standard variables, none secret, that point S3 clients (PyArrow, boto3, MLflow) at
    `endpoint`; the key comes from the store's login (`StoreLogin.client_environment`)."""
    return {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": STORE_REGION}


def start_object_store(log_dir: Path, root: Path, login_file: Path, bucket: str, *, port: int | None = None,
                       env: dict | None = None) -> tuple[Service, str]:
    """The S3 store of cluster/s3_store.py on 127.0.0.1, keeping its objects in `root`, admitting
    the key in `login_file` alone and holding `bucket`; returns its endpoint. Root only (it runs in
    namespaces of its own).

    Its port is bound here and the listening socket handed over: no other process can take the
    port before the store serves it, and a port already taken fails at once."""
    import pyarrow.fs as pafs

    listener = socket.socket()
    try:
        listener.bind((LOOPBACK, port or 0))
    except OSError as error:
        listener.close()
        raise ServiceError(f"port {port} on {LOOPBACK}, chosen for the object-store, is taken ({error.strerror}); "
                           "start again (another port is chosen)") from None
    listener.listen(128)
    port = listener.getsockname()[1]
    command = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--", sys.executable, "-m", "cluster.s3_store",
               "--root", str(root), "--login", str(login_file), "--listen-fd", str(listener.fileno()),
               "--port", str(port)]
    try:
        service = _spawn("object-store", command, log_dir, env, pass_fds=(listener.fileno(),))
    finally:
        listener.close()
    endpoint = f"http://{LOOPBACK}:{port}"
    login = read_store_login(login_file)
    store = pafs.S3FileSystem(endpoint_override=endpoint, access_key=login.access_key, secret_key=login.secret_key,
                              region=STORE_REGION, allow_bucket_creation=True, connect_timeout=5, request_timeout=30)

    def bucket_ready() -> bool:  # a request waits in the socket's queue until the proxy serves it
        try:
            if store.get_file_info(bucket).type == pafs.FileType.NotFound:
                store.create_dir(bucket)
            return True
        except OSError:  # the proxy answered before its servers were up
            return False

    _wait_until(bucket_ready, 60, "object store", service)
    return service, endpoint


def start_scratch_object_store(directory: Path, bucket: str, *, port: int | None = None) -> tuple[Service, dict]:
    """A store with its data, key and log under `directory` (tests, benchmarks); returns it and the
    variables that point S3 clients at it with its key."""
    login = store_login(directory / "credentials", access_key())
    service, endpoint = start_object_store(directory / "logs", directory / "store",
                                           store_login_path(directory / "credentials"), bucket, port=port)
    return service, {**object_store_env(endpoint), **login.client_environment()}
