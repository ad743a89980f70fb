"""Hang detection: every rank reports its progress; a run whose ranks all go quiet is hung.

A rank that hangs (a stuck collective, a storage call that never returns, a stopped process)
neither dies nor answers: without this, every other rank waits in its next collective until the
process group's timeout (30 minutes), and nobody learns why. Ray's own detector is NCCL-only and
off by default. Here:

- each rank's `Heartbeat` sends (step, phase) to the `ProgressMonitor` actor on the driver's node
  at every phase change and at most once a second within one (rank 0: at every step, which is
  how a restart learns how far the attempt before it got): a fire-and-forget call, never
  waited on, so a step costs nothing measurable;
- the driver's `Watchdog` thread reads the monitor every few seconds; `find_hang` decides: the
  run is hung when no rank has reported within its phase's limit (`HangPolicy`). A rank waiting
  in a collective for another that legitimately checkpoints or validates is not hung while that
  other one is within its own, longer, limit; but once every rank is quiet past a step's limit,
  a rank whose process is stopped (by a signal, a debugger) makes the run hung, whatever the
  phases: it makes progress in none, and the others wait for it;
- on a hang it asks each rank's node for the rank's Python stacks (each worker registered
  `faulthandler` on SIGUSR1 at start: no ptrace, which containers often forbid, and it answers
  from inside a stuck collective; a stopped process is continued to answer while the others are
  frozen), names the rank, node and phase in one line, hands the stacks to the driver, and
  SIGKILLs the silent rank: Ray Train then restarts the worker group from the last checkpoint,
  as for any crash.

The process group's collective timeout is twice the longest limit, so it never fires first.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

from cluster.processes import process_started

START, STEP, VALIDATE, CHECKPOINT, TRACKING, COMPILE, DONE = (
    "start", "step", "validate", "checkpoint", "tracking", "compile", "done")
# Legitimately long, with their own allowance. START lasts until an attempt's first step is done:
# building, restoring, the first collectives. COMPILE is torch.compile compiling or recompiling,
# wherever it happens (a new batch shape at step 2, the epoch end's dummy batch): told by Dynamo.
LONG_PHASES = (START, VALIDATE, CHECKPOINT, TRACKING, COMPILE)
BEAT_INTERVAL_S = 1.0
STEP_FLOOR_S = 45.0  # a step may always take this long (an attempt's first step counts as start)
STEP_FACTOR = 10.0  # ... or this many times the median step time observed
LONG_FACTOR = 3.0  # a long phase: this many times its longest occurrence so far, at least its floor
HELD = ("T", "t")  # /proc states of a process stopped by a signal or a tracer


def collective_timeout_s(long_phase_timeout_s: float) -> float:
    """The process group's timeout: above every limit the watchdog applies (`HangPolicy`)."""
    return 2 * long_phase_timeout_s


@dataclass(frozen=True)
class HangPolicy:
    step_timeout_s: float | None  # train.hang_timeout_s; None: derived from the observed step times
    long_phase_timeout_s: float  # train.long_phase_timeout_s: the floor of the long phases

    def limit(self, phase: str, step_times: list[float], longest: dict[str, float]) -> float:
        ceiling = 0.8 * collective_timeout_s(self.long_phase_timeout_s)
        if phase == DONE:
            return float("inf")
        if phase in LONG_PHASES:
            return min(max(self.long_phase_timeout_s, LONG_FACTOR * longest.get(phase, 0.0)), ceiling)
        if self.step_timeout_s is not None:
            return self.step_timeout_s
        typical = statistics.median(step_times) if step_times else 0.0
        return min(max(STEP_FLOOR_S, STEP_FACTOR * typical), ceiling)


@dataclass
class RankProgress:
    rank: int
    step: int
    phase: str
    node_id: str
    host: str
    pid: int
    stack_file: str
    phase_since: float  # monitor's clock
    last_beat: float  # monitor's clock
    started: str = ""  # the process's start time: a signal never reaches a later process given the same pid


@dataclass(frozen=True)
class Snapshot:
    now: float
    ranks: dict[int, RankProgress]
    step_times: list[float]
    longest: dict[str, float]  # the longest completed occurrence of each long phase


def find_hang(snapshot: Snapshot, policy: HangPolicy, held: frozenset[int] = frozenset()) -> list[RankProgress]:
    """The ranks of a hung run, else []: every rank is past its phase's limit, or every rank is
    quiet past a step's limit and one of them is in `held` (its process stopped by a signal or a
    debugger): that one makes progress in no phase, and the others wait for it whatever theirs."""
    ranks = list(snapshot.ranks.values())
    if not ranks:
        return []
    late = [r for r in ranks
            if snapshot.now - r.last_beat > policy.limit(r.phase, snapshot.step_times, snapshot.longest)]
    if len(late) == len(ranks):
        return late
    return ranks if held & {r.rank for r in quiet_past_a_step(snapshot, policy)} else []


def quiet_past_a_step(snapshot: Snapshot, policy: HangPolicy) -> list[RankProgress]:
    """Every rank, when every one that is not done is quiet past a step's limit (else []): then
    whether a process is stopped decides (`find_hang`'s `held`). Asked only then, so a run that
    makes progress costs no question to its nodes."""
    ranks = [r for r in snapshot.ranks.values() if r.phase != DONE]
    step_limit = policy.limit(STEP, snapshot.step_times, snapshot.longest)
    if not ranks or any(snapshot.now - r.last_beat <= step_limit for r in ranks):
        return []
    return ranks


class ProgressMonitor:
    """The ranks' reports, kept on the driver's node and timed by its one clock."""

    def __init__(self) -> None:
        self.ranks: dict[int, RankProgress] = {}
        self.step_times: deque[float] = deque(maxlen=64)
        self.longest: dict[str, float] = {}
        self.progress: tuple[int, float] = (0, 0.0)  # rank 0's last completed step, and when (wall clock)

    def beat(self, rank: int, step: int, phase: str, where: tuple[str, str, int, str, str], world: int) -> None:
        now = time.monotonic()
        node_id, host, pid, stack_file, started = where
        if any(other >= world for other in self.ranks):  # the run shrank: ranks that left are no one's to watch
            self.ranks = {other: progress for other, progress in self.ranks.items() if other < world}
        if rank == 0 and phase != START:  # a step beat names the step it begins
            self.progress = (step - 1 if phase == STEP else step, time.time())
        previous = self.ranks.get(rank)
        if previous is not None and previous.pid == pid:
            if previous.phase in LONG_PHASES and phase != previous.phase:
                self.longest[previous.phase] = max(self.longest.get(previous.phase, 0.0), now - previous.phase_since)
            if phase == STEP and previous.phase == STEP and step > previous.step:
                self.step_times.append((now - previous.last_beat) / (step - previous.step))
            since = previous.phase_since if phase == previous.phase else now
        else:  # a new worker for this rank (a restart): its history starts now
            since = now
        self.ranks[rank] = RankProgress(rank, step, phase, node_id, host, pid, stack_file, since, now, started)

    def last_progress(self) -> tuple[int, float]:
        """(step, wall time) of the last step rank 0 completed, in any attempt; (0, 0.0) if none."""
        return self.progress

    def snapshot(self) -> Snapshot:
        return Snapshot(time.monotonic(), dict(self.ranks), list(self.step_times), dict(self.longest))

    def forget(self, pids: list[int]) -> None:
        """Drop the ranks of workers that are gone (killed, or lost with their node)."""
        self.ranks = {r: p for r, p in self.ranks.items() if p.pid not in pids}


class Heartbeat:
    """A rank's side: `beat(step, phase)` wherever the loop changes what it does."""

    def __init__(self, monitor, rank: int, world: int) -> None:
        import ray

        self.monitor, self.rank, self.world = monitor, rank, world
        self.phase, self.sent = "", 0.0
        # an unlinked file, read through /proc: nothing is left behind by a rank that is killed
        self._stacks = tempfile.TemporaryFile("w+", prefix="aiayn-stacks-")
        faulthandler.register(signal.SIGUSR1, file=self._stacks, all_threads=True)
        stack_file = f"/proc/{os.getpid()}/fd/{self._stacks.fileno()}"
        self.where = (ray.get_runtime_context().get_node_id(), socket.gethostname(), os.getpid(), stack_file,
                      process_started(os.getpid()))
        self.step, self._resume_phase = 0, ""
        _dynamo_callbacks(self._compiling, self._compiled)

    def _compiling(self, *_args) -> None:
        """Dynamo starts compiling (in this rank's own thread): a long phase of its own."""
        self._resume_phase = self.phase
        self.beat(self.step, COMPILE)

    def _compiled(self, *_args) -> None:
        if self._resume_phase:
            self.beat(self.step, self._resume_phase)

    def beat(self, step: int, phase: str) -> None:
        now = time.monotonic()
        if self.monitor is None or (self.rank and phase == self.phase and now - self.sent < BEAT_INTERVAL_S):
            return
        self.phase, self.sent, self.step = phase, now, step
        self.monitor.beat.remote(self.rank, step, phase, self.where, self.world)

    def last_progress(self) -> tuple[int, float]:
        """The monitor's `last_progress` (asked at a restart, before this attempt's first step)."""
        import ray

        if self.monitor is None:
            return 0, 0.0
        try:
            return ray.get(self.monitor.last_progress.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the ledger never fails a run: the time counts as recovery
            return 0, 0.0

    def close(self, step: int) -> None:
        """The rank is done: never a hang."""
        self.beat(step, DONE)
        _dynamo_callbacks(self._compiling, self._compiled, remove=True)
        faulthandler.unregister(signal.SIGUSR1)
        self._stacks.close()


def _dynamo_callbacks(start: Callable, end: Callable, remove: bool = False) -> None:
    """Registers (or removes) Dynamo's compile start and end callbacks; torch imports Dynamo lazily,
    and a torch without these hooks leaves a compile inside the step's limit."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        return
    if remove:  # torch._dynamo.reset() may have cleared them already
        with contextlib.suppress(ValueError):
            callback_handler.remove_start_callback(start)
            callback_handler.remove_end_callback(end)
    else:
        callback_handler.register_start_callback(start)
        callback_handler.register_end_callback(end)


_SIGNALS = {"stacks": signal.SIGUSR1, "freeze": signal.SIGSTOP, "thaw": signal.SIGCONT, "kill": signal.SIGKILL}


def on_node(actions: list[tuple[int, str, str, str]]) -> dict[int, str]:
    """Runs on a worker's node: (pid, action, stack file, process start time) in order. "state"
    answers the process state ("gone" once it has exited, or when its pid now names another
    process), "read" the stacks its faulthandler wrote, the others send a signal ("stacks": dump
    them, "freeze", "thaw", "kill") through a pidfd opened on that very process, so that a pid
    reused meanwhile is never signalled."""
    answers: dict[int, str] = {}
    for pid, action, stack_file, started in actions:
        try:
            if action == "state":
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                answers[pid] = fields[0] if not started or fields[19] == started else "gone"
            elif action == "read":
                with open(stack_file) as handle:
                    answers[pid] = handle.read().strip() or "(nothing written: it did not run its signal handler)"
            else:
                _signal_exactly(pid, started, _SIGNALS[action])
        except (OSError, IndexError) as error:
            answers[pid] = "gone" if action == "state" else f"({action}: {error})"
    return answers


def _signal_exactly(pid: int, started: str, signum: int) -> None:
    """`signum` to the process `pid` that started at `started`, or ProcessLookupError: the pidfd
    holds on to the process it was opened on, so the check and the signal cannot be split by a
    reuse of the pid."""
    descriptor = os.pidfd_open(pid)
    try:
        if started and process_started(pid) != started:
            raise ProcessLookupError(f"process {pid} has exited (its pid now names another process)")
        signal.pidfd_send_signal(descriptor, signum)
    finally:
        os.close(descriptor)


class Watchdog:
    """The driver's thread: reads the monitor, and on a hang reports it and fails the attempt."""

    def __init__(self, monitor, policy: HangPolicy, report: Callable[[str, str], None], poll_s: float = 2.0):
        self.monitor, self.policy, self.report, self.poll_s = monitor, policy, report, poll_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="aiayn-watchdog", daemon=True)

    def _watch(self) -> None:
        import ray

        failing = False
        while not self.done.wait(self.poll_s):
            try:
                snapshot = ray.get(self.monitor.snapshot.remote(), timeout=30)
                hung = find_hang(snapshot, self.policy)
                quiet = [] if hung else quiet_past_a_step(snapshot, self.policy)
                if quiet:  # a stopped process is in no phase: caught as fast as a stuck step
                    states = self._on_nodes(quiet, "state")
                    hung = find_hang(snapshot, self.policy, frozenset(r.rank for r in quiet if states[r.pid] in HELD))
                if hung:
                    self._handle(snapshot, hung)
                failing = False
            except Exception as error:  # noqa: BLE001 - the watchdog never fails a run by itself
                if not failing:  # said once, not every poll
                    self.report(f"watchdog: cannot check the workers' progress ({str(error).splitlines()[0][:160]})", "")
                failing = True

    def _on_nodes(self, ranks: list[RankProgress], action: str) -> dict[int, str]:
        """`action` for each rank's process, on its own node; a node that does not answer is gone."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        answers: dict[int, str] = {}
        for node_id in sorted({r.node_id for r in ranks}):
            here = [r for r in ranks if r.node_id == node_id]
            task = ray.remote(num_cpus=0, max_retries=0)(on_node).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
            try:
                answers.update(ray.get(task.remote([(r.pid, action, r.stack_file, r.started) for r in here]),
                                       timeout=60))
            except Exception:  # noqa: BLE001 - its node is gone, and so are its workers
                answers.update({r.pid: "gone" if action == "state" else "(its node did not answer)" for r in here})
        return answers

    def _stacks(self, hung: list[RankProgress], states: dict[int, str]) -> tuple[dict[int, str], list[RankProgress]]:
        """Every rank's Python stacks, and the ranks left frozen. A stopped process runs its handler
        only once continued: the others are frozen meanwhile (until the culprit is killed), so that
        it cannot complete a step with them."""
        stopped = [r for r in hung if states[r.pid] in HELD]
        running = [r for r in hung if r not in stopped]
        self._on_nodes(running, "stacks")
        stacks = self._read_stacks(running)
        if stopped:
            self._on_nodes(running, "freeze")
            self._on_nodes(stopped, "stacks")
            self._on_nodes(stopped, "thaw")
            stacks.update(self._read_stacks(stopped))
        return stacks, running if stopped else []

    def _read_stacks(self, ranks: list[RankProgress], wait_s: float = 10.0) -> dict[int, str]:
        """The stacks once written: faulthandler writes from the signal handler itself (even inside
        a collective), as soon as the process is scheduled."""
        deadline = time.monotonic() + wait_s
        while True:
            stacks = self._on_nodes(ranks, "read")
            if time.monotonic() > deadline or all(text.startswith(("Thread", "Current")) for text in stacks.values()):
                return stacks
            time.sleep(0.5)

    def _handle(self, snapshot: Snapshot, hung: list[RankProgress]) -> None:
        import ray

        states = self._on_nodes(hung, "state")
        forget = lambda: ray.get(self.monitor.forget.remote([r.pid for r in hung]), timeout=30)  # noqa: E731
        if "gone" in states.values():  # a worker or node failure that Ray Train is handling: no hang
            forget()
            return
        # The culprit: a process the OS holds (stopped, or in uninterruptible I/O), else the rank
        # quiet the longest; the others are waiting for it in a collective.
        culprit = min(hung, key=lambda r: (states[r.pid] not in (*HELD, "D"), r.last_beat))
        stacks, frozen = self._stacks(hung, states)
        self._on_nodes([culprit], "kill")
        self._on_nodes(frozen, "thaw")
        quiet = {r.rank: snapshot.now - r.last_beat for r in hung}
        line = (f"hang: rank {culprit.rank} on {culprit.host} made no progress for {quiet[culprit.rank]:.0f} s "
                f"in phase {culprit.phase} at step {culprit.step} (process state {states[culprit.pid]}); "
                "killed it so that Ray Train restarts the workers from the last checkpoint")
        report = "\n\n".join(
            f"=== rank {r.rank}  {r.host}  pid {r.pid}  state {states[r.pid]}  phase {r.phase}  step {r.step}  "
            f"quiet {quiet[r.rank]:.0f} s ===\n{stacks[r.pid]}" for r in sorted(hung, key=lambda r: r.rank))
        forget()
        self.report(line, f"{line}\n\n{report}\n")


@contextlib.contextmanager
def watch_progress(policy: HangPolicy, report: Callable[[str, str], None]) -> Iterator[object]:
    """The monitor actor (on the driver's node) and the watchdog thread for the block; yields the
    monitor's handle for the workers. `report(line, stacks)`: a console line, and for a hang the
    stacks of every rank to keep."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    monitor = ray.remote(num_cpus=0)(ProgressMonitor).options(scheduling_strategy=here).remote()
    watchdog = Watchdog(monitor, policy, report)
    watchdog.thread.start()
    try:
        yield monitor
    finally:
        watchdog.done.set()
        watchdog.thread.join(timeout=120)
        ray.kill(monitor)
