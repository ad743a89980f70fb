"""One run, one driver: the lease on a local disk and on an object store spoken to over S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from data_pipeline import storage
from data_pipeline.errors import InputError
from jobs import lease as lease_module
from jobs.lease import LeaseKeeper, LeaseLost, acquire, check_holds, lease_uri


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs" / "r")
    return f"{request.getfixturevalue('object_store')}/{uuid.uuid4().hex[:8]}/r"


def _someone_else(run_uri: str, host: str = "elsewhere", pid: int = 1, started: str = "1") -> None:
    storage.write_bytes_atomic(lease_uri(run_uri), json.dumps(
        {"holder": "theirs", "host": host, "pid": pid, "pid_started": started, "since": "earlier"}).encode())


def test_a_run_held_by_a_live_driver_is_refused_naming_it(run_uri: str) -> None:
    mine = acquire(run_uri, "r", ttl_s=60)
    with pytest.raises(InputError, match=rf"run r is being trained by another driver \({mine.host} pid {os.getpid()}"):
        acquire(run_uri, "r", ttl_s=60)  # this very process is alive: the lease is fresh
    _someone_else(run_uri)
    with pytest.raises(InputError, match="elsewhere pid 1"):
        acquire(run_uri, "r", ttl_s=60)


def test_a_lease_unrenewed_for_its_ttl_is_taken_over(run_uri: str, monkeypatch) -> None:
    monkeypatch.setattr(lease_module, "SETTLE_S", 0.0)
    _someone_else(run_uri)
    time.sleep(2.5)  # object stores keep whole seconds
    with pytest.raises(InputError):
        acquire(run_uri, "r", ttl_s=60)
    mine = acquire(run_uri, "r", ttl_s=1)
    check_holds(lease_uri(run_uri), mine.holder, "a checkpoint")
    with pytest.raises(LeaseLost, match="another driver holds this run"):
        check_holds(lease_uri(run_uri), "theirs", "a checkpoint")


def test_the_lease_of_a_driver_that_exited_on_this_host_is_taken_over_at_once(tmp_path, monkeypatch) -> None:
    import socket

    monkeypatch.setattr(lease_module, "SETTLE_S", 0.0)
    run_uri = str(tmp_path / "runs" / "r")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _someone_else(run_uri, host=socket.gethostname(), pid=gone.pid, started="12345")
    assert acquire(run_uri, "r", ttl_s=600).pid == os.getpid()


def test_a_keeper_renews_and_gives_up_the_lease_when_another_takes_it(tmp_path) -> None:
    run_uri = str(tmp_path / "runs" / "r")
    said: list[str] = []
    mine = acquire(run_uri, "r", ttl_s=0.8)
    with pytest.raises(KeyboardInterrupt):  # the driver's main thread, waiting in fit(), is interrupted
        with LeaseKeeper(run_uri, mine, 0.8, said.append) as keeper:
            before = storage.modified_time(keeper.uri)
            time.sleep(0.5)
            assert storage.modified_time(keeper.uri) > before  # renewed
            _someone_else(run_uri)
            time.sleep(5)
    assert keeper.lost.startswith("another driver holds it now (elsewhere pid 1")
    assert said and "lost its lease" in said[0]
    with pytest.raises(LeaseLost):
        keeper.check("the export")
    assert json.loads(storage.read_text(keeper.uri))["holder"] == "theirs"  # never removed by the loser


def test_a_driver_that_finishes_releases_its_lease(tmp_path) -> None:
    run_uri = str(tmp_path / "runs" / "r")
    with LeaseKeeper(run_uri, acquire(run_uri, "r", ttl_s=60), 60, print):
        pass
    assert not storage.exists(lease_uri(run_uri))
    acquire(run_uri, "r", ttl_s=60)  # the next one starts at once
