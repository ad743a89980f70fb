"""One run, one driver: the lease on a local disk and on an object store spoken to over S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from cluster.processes import pid_namespace
from data_pipeline import storage
from data_pipeline.errors import InputError
from jobs.run import lease as lease_module
from jobs.run.lease import LeaseKeeper, LeaseLost, acquire, check_holds, lease_uri


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs" / "r")
    return f"{request.getfixturevalue('object_store')}/{uuid.uuid4().hex[:8]}/r"


def _someone_else(run_uri: str, host: str = "elsewhere", pid: int = 1, started: str = "1", ttl_s: float = 0.0,
                  namespace: str | None = None) -> None:
    """A lease of another driver's (ttl_s 0 and no namespace: as an older release wrote it)."""
    storage.write_bytes_atomic(lease_uri(run_uri), json.dumps(
        {"holder": "theirs", "host": host, "pid": pid, "pid_started": started, "since": "earlier", "ttl_s": ttl_s,
         "pid_namespace": pid_namespace() if namespace is None else namespace}).encode())


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
    _someone_else(run_uri, host=socket.gethostname(), pid=gone.pid, started="12345", namespace="4026531111")
    with pytest.raises(InputError, match="being trained by another driver"):  # the same host name, another container
        acquire(run_uri, "r", ttl_s=600)
    _someone_else(run_uri, host=socket.gethostname(), pid=gone.pid, started="12345")
    assert acquire(run_uri, "r", ttl_s=600).pid == os.getpid()


def test_a_contender_waits_out_the_holders_ttl_not_its_own(run_uri: str, monkeypatch) -> None:
    monkeypatch.setattr(lease_module, "SETTLE_S", 0.0)
    _someone_else(run_uri, ttl_s=600)  # renewed every 150 s
    time.sleep(2.5)
    with pytest.raises(InputError, match="once its lease has gone 600 s without renewal"):
        acquire(run_uri, "r", ttl_s=1)


def test_of_two_drivers_started_in_the_same_moment_exactly_one_holds_the_run(tmp_path) -> None:
    run_uri = str(tmp_path / "runs" / "r")
    outcomes: list[object] = []
    start = threading.Barrier(2)

    def contend() -> None:
        start.wait()
        try:
            outcomes.append(acquire(run_uri, "r", ttl_s=60))
        except InputError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=contend) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    held = [outcome for outcome in outcomes if isinstance(outcome, lease_module.Lease)]
    assert len(outcomes) == 2 and len(held) == 1, outcomes
    assert json.loads(storage.read_text(lease_uri(run_uri)))["holder"] == held[0].holder


def test_a_keeper_that_fails_says_so_and_stops_the_driver(tmp_path, monkeypatch, python_sigint_handler) -> None:
    run_uri = str(tmp_path / "runs" / "r")
    said: list[str] = []
    mine = acquire(run_uri, "r", ttl_s=2)

    def broken_write(uri, lease) -> None:
        raise ValueError("an unexpected answer from the store")

    monkeypatch.setattr(lease_module, "_write", broken_write)
    with pytest.raises(KeyboardInterrupt):
        with LeaseKeeper(run_uri, mine, 2, said.append) as keeper:
            time.sleep(5)
    assert keeper.lost == "its keeper failed (ValueError: an unexpected answer from the store)"
    assert said and "lost its lease" in said[0]


@pytest.fixture
def python_sigint_handler():
    """The keeper interrupts the main thread as a SIGINT would: Python's own handler makes that a
    KeyboardInterrupt (Ray Train's, while fit() runs, aborts the run). Earlier tests in the same
    process may have left another handler installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _keeper_paused_at_its_next_read(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """(paused, resume): the keeper's next read of the lease waits until `resume`, as a driver whose
    process was stopped, so that the test acts while the keeper stands between two renewals."""
    paused, resume, real_read = threading.Event(), threading.Event(), lease_module._read

    def read(uri: str):
        if threading.current_thread().name == "aiayn-lease" and not paused.is_set():
            paused.set()
            resume.wait()
        return real_read(uri)

    monkeypatch.setattr(lease_module, "_read", read)
    return paused, resume


def test_a_keeper_renews_and_gives_up_the_lease_when_another_takes_it(tmp_path, monkeypatch, python_sigint_handler) -> None:
    run_uri = str(tmp_path / "runs" / "r")
    said: list[str] = []
    mine = acquire(run_uri, "r", ttl_s=2)
    with pytest.raises(KeyboardInterrupt):  # the driver's main thread, waiting in fit(), is interrupted
        with LeaseKeeper(run_uri, mine, 2, said.append) as keeper:
            before = storage.modified_time(keeper.uri)
            time.sleep(1.2)
            assert storage.modified_time(keeper.uri) > before  # renewed
            paused, resume = _keeper_paused_at_its_next_read(monkeypatch)
            assert paused.wait(5)
            _someone_else(run_uri)
            resume.set()
            time.sleep(5)
    assert keeper.lost.startswith("another driver holds it now (elsewhere pid 1")
    assert said and "lost its lease" in said[0]
    with pytest.raises(LeaseLost):
        keeper.check("the export")
    assert json.loads(storage.read_text(keeper.uri))["holder"] == "theirs"  # never removed by the loser


def test_a_keeper_stopped_past_its_renewal_gives_up_without_writing(tmp_path, monkeypatch, python_sigint_handler) -> None:
    run_uri = str(tmp_path / "runs" / "r")
    mine = acquire(run_uri, "r", ttl_s=2)
    with pytest.raises(KeyboardInterrupt):
        with LeaseKeeper(run_uri, mine, 2, lambda line: None) as keeper:
            paused, resume = _keeper_paused_at_its_next_read(monkeypatch)
            assert paused.wait(5)
            time.sleep(1.8)  # stopped for longer than 3/4 of the TTL: another driver may be taking over
            written = storage.modified_time(keeper.uri)
            resume.set()
            time.sleep(5)
    assert keeper.lost.startswith("it went 2 s without renewal")
    assert storage.modified_time(keeper.uri) == written  # the stale lease was not renewed


def test_a_driver_that_finishes_releases_its_lease(tmp_path) -> None:
    run_uri = str(tmp_path / "runs" / "r")
    with LeaseKeeper(run_uri, acquire(run_uri, "r", ttl_s=60), 60, print):
        pass
    assert not storage.exists(lease_uri(run_uri))
    acquire(run_uri, "r", ttl_s=60)  # the next one starts at once
