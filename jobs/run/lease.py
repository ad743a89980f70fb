"""One run, one driver: a lease kept in the run's storage while a driver trains it.

Two drivers of one run (a driver believed dead and the same command run again, a resubmitted job)
would both train, and one's checkpoint retention would delete what the other resumes from. So:

- `acquire` (on the driver, before any cluster resource is taken) writes `<run>/driver.lease`
  naming this driver and its TTL, and reads it back after a pause: of two drivers started
  together, the one whose write came last trains, the other is refused. A lease renewed within
  its holder's TTL (`cluster.lease_ttl_s` of the driver that holds it) is someone else's run:
  refused in one line naming its holder. A lease not renewed for that long, or one whose holder is
  a process of this host and PID namespace that has exited, is taken over.
- `LeaseKeeper` renews it every quarter of the TTL. A keeper that finds another holder, or that
  could not renew for three quarters of the TTL (so before anyone may take over), declares the
  lease lost: the driver then stops without writing.
- Every worker checks `holds` before it writes (a checkpoint, metrics), so the workers of a driver
  that lost its lease (stopped, cut off) write nothing once another driver holds the run.

Freshness is judged by the store's own clock: the lease's modification time against that of a
probe just written next to it, so no two machines' clocks are compared. PyArrow's filesystems
have no conditional write; two drivers that take over an expired lease at the same moment are
told apart by reading it back after a pause (the later writer keeps it), and the keeper reads it
before every renewal, so a driver whose write was overtaken stops within a quarter of its TTL.
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

from cluster.processes import pid_namespace, process_started
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
    ttl_s: float = 0.0  # the holder's TTL: how long a contender must see it unrenewed (0: an older release's)
    pid_namespace: str = ""  # the pid means something only inside this namespace (a container)

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}, since {self.since}"


def _read(uri: str) -> Lease | None:
    data = storage.read_json(uri)
    return Lease(**data) if data else None


def _age_s(uri: str) -> float:
    """Seconds since the lease was written, by the store's clock."""
    return storage.store_now(uri.rsplit("/", 1)[0]) - storage.modified_time(uri)


def _exited_here(lease: Lease) -> bool:
    """The holder was a process of this host and PID namespace that is no longer running (the same
    host name in another container says nothing about processes seen here)."""
    return (lease.host == socket.gethostname() and lease.pid_namespace == pid_namespace()
            and process_started(lease.pid) != lease.pid_started)


def lease_uri(run_uri: str) -> str:
    return storage.join(run_uri, LEASE)


def acquire(run_uri: str, run_name: str, ttl_s: float) -> Lease:
    """This driver's lease on the run, or InputError naming the driver that holds it."""
    uri = lease_uri(run_uri)
    current = _read(uri)
    if current is not None and not _exited_here(current):
        age, holders_ttl = _age_s(uri), current.ttl_s or ttl_s
        if age < holders_ttl:
            raise InputError(
                f"run {run_name} is being trained by another driver ({current.describe()}; lease renewed "
                f"{max(age, 0):.0f} s ago): stop that one first, or, if it is gone, run this again once its lease "
                f"has gone {holders_ttl:.0f} s without renewal")
    mine = Lease(uuid.uuid4().hex, socket.gethostname(), os.getpid(), process_started(os.getpid()),
                 time.strftime("%Y-%m-%d %H:%M:%S %Z"), ttl_s, pid_namespace())
    _write(uri, mine)
    time.sleep(SETTLE_S)  # another driver may be writing its own at the same moment: the later write stands
    now = _read(uri)
    if now is None or now.holder != mine.holder:
        raise InputError(f"run {run_name} was just taken by another driver "
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
        try:
            self._renew_until_done()
        except BaseException as error:  # noqa: BLE001 - a keeper that died would leave the lease to lapse unseen
            self._lose(f"its keeper failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")

    def _renew_until_done(self) -> None:
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
