"""Stopping a service stops everything it started, also a process that left its process group and
ignores SIGTERM, as a Ray worker hung while exiting does."""

from __future__ import annotations

import os
import signal
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
