"""The hang rules, the monitor's bookkeeping, and reading a stopped process' stacks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster.processes import process_started
from jobs.run.config import load_job_config
from jobs.train.watchdog import (
    CHECKPOINT,
    COMPILE,
    DONE,
    START,
    STEP,
    STEP_FLOOR_S,
    HangPolicy,
    ProgressMonitor,
    RankProgress,
    Snapshot,
    collective_timeout_s,
    find_hang,
    on_node,
    quiet_past_a_step,
)

POLICY = HangPolicy(step_timeout_s=None, long_phase_timeout_s=900)


def _rank(rank: int, phase: str, quiet_s: float, now: float = 1000.0) -> RankProgress:
    return RankProgress(rank, 7, phase, "node", "host", 100 + rank, "", now - quiet_s, now - quiet_s)


def _snapshot(*ranks: RankProgress, step_times=(), longest=None) -> Snapshot:
    return Snapshot(1000.0, {r.rank: r for r in ranks}, list(step_times), longest or {})


def test_the_step_limit_follows_the_observed_step_times_above_a_floor() -> None:
    assert POLICY.limit(STEP, [], {}) == STEP_FLOOR_S
    assert POLICY.limit(STEP, [0.5, 0.6, 0.4], {}) == STEP_FLOOR_S  # 10 x 0.5 s is below the floor
    assert POLICY.limit(STEP, [20.0, 30.0, 25.0], {}) == 250.0
    assert HangPolicy(12.0, 900).limit(STEP, [20.0], {}) == 12.0  # train.hang_timeout_s fixes it
    assert POLICY.limit(DONE, [], {}) == float("inf")


def test_long_phases_get_their_own_limit_always_below_the_collective_timeout() -> None:
    assert POLICY.limit(CHECKPOINT, [], {}) == 900
    assert POLICY.limit(CHECKPOINT, [], {CHECKPOINT: 400.0}) == 1200  # 3 x the longest so far
    ceiling = collective_timeout_s(900)
    assert POLICY.limit(CHECKPOINT, [], {CHECKPOINT: 5000.0}) < ceiling
    assert POLICY.limit(STEP, [1000.0], {}) < ceiling


def test_a_run_is_hung_only_when_every_rank_is_past_its_limit() -> None:
    waiting = _rank(1, STEP, quiet_s=200)  # in a collective, waiting for rank 0
    assert find_hang(_snapshot(_rank(0, CHECKPOINT, quiet_s=200), waiting), POLICY) == []
    hung = find_hang(_snapshot(_rank(0, CHECKPOINT, quiet_s=1000), waiting), POLICY)
    assert [r.rank for r in hung] == [0, 1]
    assert find_hang(_snapshot(_rank(0, STEP, quiet_s=5), waiting), POLICY) == []
    assert find_hang(_snapshot(), POLICY) == []  # no worker has reported yet


def test_a_stopped_process_hangs_the_run_once_every_rank_is_quiet_past_a_step() -> None:
    policy = HangPolicy(step_timeout_s=10.0, long_phase_timeout_s=900)
    checkpointing, waiting = _rank(0, CHECKPOINT, quiet_s=20), _rank(1, STEP, quiet_s=20)
    snapshot = _snapshot(checkpointing, waiting)
    assert find_hang(snapshot, policy) == []  # a checkpoint may take this long
    assert quiet_past_a_step(snapshot, policy) == [checkpointing, waiting]  # so their process states are asked
    # the stopped one may be the one in the long phase, or the one the long phase waits for
    assert [r.rank for r in find_hang(snapshot, policy, held=frozenset({0}))] == [0, 1]
    assert [r.rank for r in find_hang(snapshot, policy, held=frozenset({1}))] == [0, 1]
    # nothing is asked, and nothing is hung, while any rank makes progress
    recent = _snapshot(checkpointing, _rank(1, STEP, quiet_s=2))
    assert quiet_past_a_step(recent, policy) == [] and find_hang(recent, policy, held=frozenset({0})) == []
    assert find_hang(_snapshot(_rank(0, DONE, quiet_s=50), _rank(1, DONE, quiet_s=50)), policy, held=frozenset({0})) == []


def test_the_monitor_times_steps_and_phases_and_forgets_replaced_workers(monkeypatch) -> None:
    clock = iter([0.0, 1.0, 3.0, 4.0, 34.0, 35.0, 36.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    monitor = ProgressMonitor()
    where = ("node", "host", 100, "", "")
    monitor.beat(0, 0, START, where, 1)  # t=0
    monitor.beat(0, 1, STEP, where, 1)  # t=1: start took 1 s
    monitor.beat(0, 3, STEP, where, 1)  # t=3: two steps in 2 s
    monitor.beat(0, 3, CHECKPOINT, where, 1)  # t=4
    monitor.beat(0, 4, STEP, where, 1)  # t=34: the checkpoint took 30 s
    snapshot = monitor.snapshot()  # t=35
    assert snapshot.step_times == [1.0]  # the checkpoint's 30 s are not a step time
    assert snapshot.longest == {START: 1.0, CHECKPOINT: 30.0}
    assert snapshot.now - snapshot.ranks[0].last_beat == 1.0
    monitor.forget([100])
    assert monitor.snapshot().ranks == {}


def test_a_recompile_is_a_long_phase_wherever_it_happens() -> None:
    """A new batch shape at step 2 (or the epoch end's dummy batch) recompiles for longer than a
    step may take: the rank is in its own phase, with the long allowance, not hung."""
    waiting = _rank(1, STEP, quiet_s=200)  # in the step's collective, waiting for rank 0
    assert POLICY.limit(COMPILE, [0.5], {}) == 900
    assert find_hang(_snapshot(_rank(0, COMPILE, quiet_s=200), waiting, step_times=[0.5]), POLICY) == []
    assert find_hang(_snapshot(_rank(0, COMPILE, quiet_s=1000), waiting, step_times=[0.5]), POLICY)


def test_ranks_that_left_with_a_downsize_are_forgotten(monkeypatch) -> None:
    monitor = ProgressMonitor()
    for rank in range(4):
        monitor.beat(rank, 10, STEP, ("node", "host", 100 + rank, "", ""), 4)
    monitor.beat(0, 10, START, ("node", "host", 200, "", ""), 2)  # the restart after a node left: 2 ranks
    assert sorted(monitor.snapshot().ranks) == [0, 1]


def test_a_compile_reported_by_dynamo_beats_the_compile_phase_and_then_the_step_again(monkeypatch) -> None:
    import torch

    from jobs.train import watchdog

    class _Monitor:
        def __init__(self) -> None:
            self.beats: list[str] = []
            self.beat = self  # monitor.beat.remote(...)

        def remote(self, rank, step, phase, where, world) -> None:
            self.beats.append(phase)

    monkeypatch.setattr(watchdog, "process_started", lambda pid: "1")
    monkeypatch.setitem(sys.modules, "ray", type(sys)("ray"))
    sys.modules["ray"].get_runtime_context = lambda: type("C", (), {"get_node_id": lambda self: "node"})()
    monitor = _Monitor()
    torch._dynamo.reset()  # (it clears Dynamo's callbacks too)
    heartbeat = watchdog.Heartbeat(monitor, 0, 1)
    try:
        heartbeat.beat(2, STEP)
        torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
    finally:
        heartbeat.close(2)
    assert monitor.beats[:3] == [STEP, COMPILE, STEP] and monitor.beats[-1] == DONE, monitor.beats


def test_the_monitor_knows_how_far_rank_0_got_for_the_restart_that_follows() -> None:
    monitor = ProgressMonitor()
    assert monitor.last_progress() == (0, 0.0)
    monitor.beat(0, 0, START, ("node", "host", 100, "", ""), 2)
    assert monitor.last_progress() == (0, 0.0)  # building is no progress
    monitor.beat(0, 13, STEP, ("node", "host", 100, "", ""), 2)  # step 13 begins: 12 are done
    monitor.beat(1, 20, STEP, ("node", "host", 101, "", ""), 2)  # another rank's beats are throttled: not used
    assert monitor.last_progress()[0] == 12
    monitor.beat(0, 15, CHECKPOINT, ("node", "host", 100, "", ""), 2)  # saving step 15: it is done
    step, at = monitor.last_progress()
    assert step == 15 and abs(at - time.time()) < 60
    monitor.beat(0, 15, START, ("node", "host", 200, "", ""), 2)  # the restarted rank 0 builds: the old figure stays
    assert monitor.last_progress()[0] == 15


def test_signals_reach_a_stopped_process_and_its_stacks_are_read(tmp_path: Path) -> None:
    stack_file = str(tmp_path / "stacks.txt")
    program = textwrap.dedent(f"""
        import faulthandler, signal, time
        faulthandler.register(signal.SIGUSR1, file=open({stack_file!r}, "w"), all_threads=True)
        def waiting_for_a_collective():
            print("ready", flush=True)  # from inside, so that it is on the stack once we read "ready"
            while True:
                time.sleep(0.05)
        waiting_for_a_collective()
    """)
    process = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    pid = process.pid
    try:
        assert process.stdout.readline().strip() == "ready"
        started = process_started(pid)
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while on_node([(pid, "state", stack_file, started)]) != {pid: "T"}:
            assert time.monotonic() < deadline, "the process did not stop"
            time.sleep(0.1)
        # the same pid with another start time is another process (the pid reused): never signalled
        assert on_node([(pid, "state", stack_file, "1")]) == {pid: "gone"}
        assert "has exited" in on_node([(pid, "kill", stack_file, "1")])[pid]
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while on_node([(pid, "state", stack_file, started)]) != {pid: "T"}:
            assert time.monotonic() < deadline, "the process did not stop"
            time.sleep(0.1)
        on_node([(pid, "stacks", stack_file, started), (pid, "thaw", stack_file, started)])
        deadline = time.monotonic() + 30
        while "waiting_for_a_collective" not in on_node([(pid, "read", stack_file, started)])[pid]:
            assert time.monotonic() < deadline, "no stacks written"
            time.sleep(0.1)
        on_node([(pid, "kill", stack_file, started)])
        assert process.wait(timeout=10) == -signal.SIGKILL
        assert on_node([(pid, "state", stack_file, started)]) == {pid: "gone"}
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("override", ["train.hang_timeout_s=nan", "train.hang_timeout_s=0",
                                      "train.hang_timeout_s=900", "train.long_phase_timeout_s=inf"])
def test_timeouts_that_cannot_work_are_refused(override: str) -> None:
    from jobs.run.config import ConfigError

    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_job_config(None, [override])
