"""Stopping a service stops everything it started, also a process that left its process group and
ignores SIGTERM, as a Ray worker hung while exiting does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from cluster.services import _spawn

# The service's child moves to a process group of its own (as Ray puts each worker), ignores
# SIGTERM, writes its pid and waits; the service itself just waits.
STRAY = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    child = '''
    import os, signal, sys, time
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(600)
    '''
    subprocess.Popen([sys.executable, "-c", child, sys.argv[1]])
    time.sleep(600)
""")


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stopping_a_service_stops_a_process_that_left_its_group_and_ignores_sigterm(tmp_path):
    pid_file = tmp_path / "stray.pid"
    service = _spawn("stray", [sys.executable, "-c", STRAY, str(pid_file)], tmp_path)
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    stray = int(pid_file.read_text())
    try:
        assert os.getpgid(stray) != service.process.pid  # it did leave the service's group
        service.stop(timeout=2.0)
        deadline = time.monotonic() + 10
        while _running(stray) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(stray)
        assert service.process.poll() is not None
    finally:
        if _running(stray):
            os.kill(stray, signal.SIGKILL)


# Another account's program that binds a port first and records whatever reaches it.
SQUATTER = textwrap.dedent("""
    import socket, sys, threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    print(server.getsockname()[1], flush=True)
    def record(connection):
        data = connection.recv(65536)
        sys.stdout.write(data.decode(errors="replace").replace("\\n", " ") + "\\n")
        sys.stdout.flush()
    while True:
        connection, _ = server.accept()
        threading.Thread(target=record, args=(connection,), daemon=True).start()
""")


def test_a_port_taken_first_by_another_account_gets_no_login_and_the_start_fails(tmp_path) -> None:
    import pytest

    from cluster.credentials import mlflow_login
    from cluster.services import ServiceError, start_mlflow_server, start_scratch_object_store

    squatter = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/env",
                                 "python3", "-c", SQUATTER], stdout=subprocess.PIPE, text=True,
                                env={"PATH": "/usr/bin:/bin"})
    try:
        port = int(squatter.stdout.readline())
        login = mlflow_login(tmp_path / "credentials")
        with pytest.raises(ServiceError, match=f"port {port} on 127.0.0.1, chosen for the mlflow, is held by"):
            start_mlflow_server(tmp_path / "logs", tmp_path / "store", port=port, login=login)
        with pytest.raises(ServiceError, match=f"port {port} on 127.0.0.1, chosen for the object-store, is taken"):
            start_scratch_object_store(tmp_path / "store", "bucket", port=port)
    finally:
        squatter.kill()
        received, _ = squatter.communicate(timeout=10)
    assert "Authorization" not in received and received.strip() == "", received  # nothing was sent to it
    assert not [pid for pid in _spawned_services(tmp_path)], "a refused service was left running"


def _spawned_services(tmp_path: Path) -> list[int]:
    """Processes still running from this test's services (their command names its store)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(tmp_path) in cmdline.read_bytes().decode(errors="replace") and _running(int(cmdline.parent.name)):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found
