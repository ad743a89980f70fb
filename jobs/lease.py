"""One run, one driver: a lease kept in the run's storage while a driver trains it.

Two drivers of one run (a driver believed dead and the same command run again, a resubmitted job)
would both train, and one's checkpoint retention would delete what the other resumes from. So:

- `acquire` (on the driver, before any cluster resource is taken) writes `<run>/driver.lease`
  naming this driver. A lease renewed within `cluster.lease_ttl_s` is someone else's run: refused
  in one line naming its holder. A lease not renewed for that long, or one whose holder is a
  process of this host that has exited, is taken over.
- `LeaseKeeper` renews it every quarter of the TTL. A keeper that finds another holder, or that
  could not renew for three quarters of the TTL (so before anyone may take over), declares the
  lease lost: the driver then stops without writing.
- Every worker checks `holds` before it writes (a checkpoint, metrics), so the workers of a driver
  that lost its lease (stopped, cut off) write nothing once another driver holds the run.

Freshness is judged by the store's own clock: the lease's modification time against that of a
probe just written next to it, so no two machines' clocks are compared. PyArrow's filesystems
have no conditional write; two drivers that take over an expired lease at the same moment are
told apart by reading it back after a pause (the later writer keeps it).
"""

from __future__ import annotations

import _thread
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

from data_pipeline import storage
from data_pipeline.errors import InputError

LEASE = "driver.lease"
SETTLE_S = 1.0  # between taking over a lease and reading it back


class LeaseLost(RuntimeError):
    """Another driver holds this run now: nothing more may be written for this one."""


@dataclass(frozen=True)
class Lease:
    holder: str  # unique per driver process
    host: str
    pid: int
    pid_started: str  # the process' start time, so that a reused pid is not taken for the holder
    since: str  # when this driver took the lease, for people

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}, since {self.since}"


def _process_started(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _read(uri: str) -> Lease | None:
    data = storage.read_json(uri)
    return Lease(**data) if data else None


def _age_s(uri: str) -> float:
    """Seconds since the lease was written, by the store's clock."""
    return storage.store_now(uri.rsplit("/", 1)[0]) - storage.modified_time(uri)


def _exited_here(lease: Lease) -> bool:
    """The holder was a process of this host that is no longer running."""
    return lease.host == socket.gethostname() and _process_started(lease.pid) != lease.pid_started


def lease_uri(run_uri: str) -> str:
    return storage.join(run_uri, LEASE)


def acquire(run_uri: str, run_name: str, ttl_s: float) -> Lease:
    """This driver's lease on the run, or InputError naming the driver that holds it."""
    uri = lease_uri(run_uri)
    current = _read(uri)
    if current is not None and not _exited_here(current):
        age = _age_s(uri)
        if age < ttl_s:
            raise InputError(
                f"run {run_name} is being trained by another driver ({current.describe()}; lease renewed "
                f"{max(age, 0):.0f} s ago): stop that one first, or, if it is gone, run this again once its lease "
                f"has gone {ttl_s:.0f} s without renewal")
    mine = Lease(uuid.uuid4().hex, socket.gethostname(), os.getpid(), _process_started(os.getpid()),
                 time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    _write(uri, mine)
    if current is not None:  # a takeover: another driver may be taking it over at the same moment
        time.sleep(SETTLE_S)
        now = _read(uri)
        if now is None or now.holder != mine.holder:
            raise InputError(f"run {run_name} was just taken over by another driver "
                             f"({now.describe() if now else 'unknown'}); stop that one first")
    return mine


def _write(uri: str, lease: Lease) -> None:
    storage.write_bytes_atomic(uri, json.dumps(asdict(lease)).encode())


def holds(uri: str, holder: str) -> bool:
    """Whether `holder` still holds the lease at `uri` (the workers' check before they write)."""
    current = _read(uri)
    return current is not None and current.holder == holder


def check_holds(uri: str, holder: str, what: str) -> None:
    if not holds(uri, holder):
        current = _read(uri)
        raise LeaseLost(f"not writing {what}: another driver holds this run now "
                        f"({current.describe() if current else 'its lease is gone'})")


class LeaseKeeper:
    """The driver's thread that renews the lease; on losing it, says so and interrupts the
    driver's main thread (where Ray Train's fit() waits), which then stops without writing."""

    def __init__(self, run_uri: str, lease: Lease, ttl_s: float, say: Callable[[str], None]) -> None:
        self.uri, self.lease, self.ttl_s, self.say = lease_uri(run_uri), lease, ttl_s, say
        self.lost: str = ""
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._keep, name="aiayn-lease", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.done.set()
        self.thread.join(timeout=self.ttl_s)
        if not self.lost and holds(self.uri, self.lease.holder):
            storage.delete_file(self.uri)

    def _keep(self) -> None:
        renewed = time.monotonic()
        while not self.done.wait(self.ttl_s / 4):
            try:
                current = _read(self.uri)
                if current is None or current.holder != self.lease.holder:
                    self._lose(f"another driver holds it now ({current.describe() if current else 'it was removed'})")
                    return
                if time.monotonic() - renewed > 0.75 * self.ttl_s:  # this process was stopped, or the store slow:
                    # another driver may have taken the lease since it was read, and a write would undo that
                    self._lose(f"it went {time.monotonic() - renewed:.0f} s without renewal")
                    return
                _write(self.uri, self.lease)
                renewed = time.monotonic()
            except OSError as error:
                if time.monotonic() - renewed > 0.75 * self.ttl_s:
                    self._lose(f"it could not be renewed for {time.monotonic() - renewed:.0f} s ({error})")
                    return

    def _lose(self, why: str) -> None:
        self.lost = why
        self.say(f"this driver lost its lease on the run: {why}; stopping without writing anything more")
        _thread.interrupt_main()

    def check(self, what: str) -> None:
        """Raises LeaseLost if the lease was lost (the driver's own check before it writes)."""
        if self.lost or not holds(self.uri, self.lease.holder):
            raise LeaseLost(f"not writing {what}: this driver lost its lease ({self.lost or 'another holds it'})")
