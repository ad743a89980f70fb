"""The isolated cluster's S3 store: OpenStack Swift's proxy with its `s3api` and `tempauth`
middleware, and Swift's account, container and object servers, all in one process that runs in a
network namespace of its own.

Why Swift: it verifies every request's AWS signature (SigV4) against a key it is configured with,
keeps objects on disk (they survive `down`, `up` and a SIGKILL of the store), and speaks the S3
that PyArrow and boto3 use (directory markers, server-side copies, multipart uploads,
trailing-checksum uploads). moto, which this replaced, checked no credentials and kept nothing.

Why a namespace: Swift's account, container and object servers check no credentials on their own
ports; whoever reaches them reads and writes every object. Here they listen on 127.0.0.1 of the
store's own network namespace, which no other process shares. The one way in is the proxy's
socket, which the caller binds on the machine's 127.0.0.1 and hands over already listening
(`--listen-fd`): no other account can take its port between choosing and binding it.

The store runs in a PID namespace of its own too, as its init: when this process stops or is
killed, the kernel kills the servers it started, so nothing of the store outlives it.

Run as (root, for the namespaces):
    unshare --net --pid --fork --kill-child -- python -m cluster.s3_store --root DIR --login FILE
        --listen-fd N --port P
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

from cluster.credentials import private_dir, write_private

# The servers behind the proxy, on 127.0.0.1 of the store's own network namespace.
BACKENDS = {"object": 6200, "container": 6201, "account": 6202}
ACCOUNT, USER = "aiayn", "aiayn"  # tempauth's account and user; the S3 access key is "account:user"
DEVICE = "d1"
REGION = "us-east-1"  # the region s3api answers for, which clients sign with
PROXY_PIPELINE = "catch_errors gatekeeper proxy-logging listing_formats s3api tempauth copy slo dlo proxy-logging proxy-server"


def access_key() -> str:
    return f"{ACCOUNT}:{USER}"


def _server_config(root: Path, settings: dict[str, str], pipeline: str, sections: dict[str, dict[str, str]]) -> str:
    """A paste.deploy file: [DEFAULT] with `settings`, [pipeline:main], then each section."""
    lines = ["[DEFAULT]", f"swift_dir = {root / 'etc'}", "workers = 0", "log_level = WARNING",
             "log_address = /dev/null",  # not a syslog socket: Swift logs to this process's stderr alone
             *(f"{key} = {value}" for key, value in settings.items()), "", "[pipeline:main]", f"pipeline = {pipeline}"]
    for name, options in sections.items():
        lines += ["", f"[{name}]", *(f"{key} = {value}" for key, value in options.items())]
    return "\n".join(lines) + "\n"


def write_config(root: Path, secret: str, port: int) -> None:
    """Swift's configuration under `root`/etc (0700): kept files (swift.conf's hash path salt must
    never change, or stored objects could no longer be found) and per-start ones (rings, servers)."""
    from swift.common.ring import RingBuilder

    etc = private_dir(root / "etc")
    private_dir(root / "devices" / DEVICE)
    swift_conf = etc / "swift.conf"
    if not swift_conf.exists():
        write_private(swift_conf, "\n".join([
            "[swift-hash]", f"swift_hash_path_suffix = {secrets.token_hex(16)}",
            f"swift_hash_path_prefix = {secrets.token_hex(16)}", "",
            "[storage-policy:0]", "name = aiayn", "default = yes", "",
        ]), replace=False)
    for kind, backend_port in BACKENDS.items():
        builder = RingBuilder(part_power=6, replicas=1, min_part_hours=0)
        builder.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": backend_port,
                         "device": DEVICE, "weight": 1.0})
        builder.rebalance(seed=0)
        builder.get_ring().save(str(etc / f"{kind}.ring.gz"))
        write_private(etc / f"{kind}-server.conf", _server_config(
            root, {"devices": str(root / "devices"), "mount_check": "false", "bind_ip": "127.0.0.1",
                   "bind_port": str(backend_port)},
            f"{kind}-server", {f"app:{kind}-server": {"use": f"egg:swift#{kind}"}}))
    filters = {f"filter:{name}": {"use": f"egg:swift#{name.replace('-', '_')}"}
               for name in ("catch_errors", "gatekeeper", "proxy-logging", "listing_formats", "copy", "slo", "dlo")}
    write_private(etc / "proxy-server.conf", _server_config(
        root, {"bind_ip": "127.0.0.1", "bind_port": str(port)}, PROXY_PIPELINE, {
            "app:proxy-server": {"use": "egg:swift#proxy", "account_autocreate": "true"},
            "filter:s3api": {"use": "egg:swift#s3api", "location": REGION},
            "filter:tempauth": {"use": "egg:swift#tempauth", f"user_{ACCOUNT}_{USER}": f"{secret} .admin"},
            **filters,
        }))


def _start_backends(etc: Path) -> list[subprocess.Popen]:
    """Swift's account, container and object servers, each in a process of its own (eventlet
    servers do not share one process). They leave this process's session (Swift's servers call
    setsid), but not its PID namespace, which the kernel empties when this process, its init, dies."""
    backends = [subprocess.Popen([str(Path(sys.executable).with_name(f"swift-{kind}-server")),
                                  str(etc / f"{kind}-server.conf"), "--verbose"])  # log to stderr too
                for kind in BACKENDS]
    deadline = time.monotonic() + 60
    waiting = dict(zip(BACKENDS.values(), backends))
    while waiting:
        for port, process in list(waiting.items()):
            if process.poll() is not None:
                raise SystemExit(f"a Swift server exited with {process.returncode} while starting")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    del waiting[port]
        if time.monotonic() > deadline:
            raise SystemExit("Swift's servers did not start within 60 s")
        time.sleep(0.1)
    return backends


def serve(root: Path, secret: str, listen_fd: int, port: int) -> None:
    """Configure, start the backends, then serve the proxy on the inherited socket (returns only
    when the proxy stops)."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # a new namespace's loopback starts down
    write_config(root, secret, port)
    _start_backends(root / "etc")
    from swift.common import wsgi
    from swift.common.utils.logs import get_swift_logger

    get_swift_logger.console_handler4logger = {}  # Swift's loggers also write to stderr: the service's log
    conf, logger, global_conf, _ = wsgi.check_config(str(root / "etc" / "proxy-server.conf"), "proxy-server")
    import eventlet.greenio  # after check_config, which monkey-patches the standard library for eventlet

    wsgi.run_server(conf, logger, eventlet.greenio.GreenSocket(socket.socket(fileno=listen_fd)),
                    global_conf=global_conf)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.s3_store")
    parser.add_argument("--root", type=Path, required=True, help="the store's private directory (data and config)")
    parser.add_argument("--login", type=Path, required=True, help="the JSON file (0600) holding the store's key")
    parser.add_argument("--listen-fd", type=int, required=True, help="the proxy's socket, bound and listening")
    parser.add_argument("--port", type=int, required=True, help="that socket's port")
    args = parser.parse_args(argv)
    secret = json.loads(args.login.read_text())["secret_key"]
    serve(private_dir(args.root), secret, args.listen_fd, args.port)


if __name__ == "__main__":
    main(sys.argv[1:])
