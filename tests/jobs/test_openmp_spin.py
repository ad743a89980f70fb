"""A CPU worker's idle OpenMP threads spin through a step's serial stretches, then let go."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from jobs.run.config import load_job_config
from jobs.train.cpu_allocator import worker_environment
from jobs.train.openmp_spin import WAIT_VARIABLES, spin_environment

# A fresh process (libgomp reads its settings once, as torch loads it) runs a parallel matrix
# multiply on two threads, then its main thread sleeps: the process's CPU time over the sleep,
# less the main thread's, is what the idle OpenMP thread spent spinning before it slept too.
SPIN = """
import json, resource, time, torch
torch.set_num_threads(2)
a = torch.randn(256, 256)
for _ in range(20):
    a @ a
spun = []
for _ in range(5):
    a @ a
    process, main = resource.getrusage(resource.RUSAGE_SELF), time.thread_time()
    time.sleep(0.3)
    after = resource.getrusage(resource.RUSAGE_SELF)
    spun.append(after.ru_utime + after.ru_stime - process.ru_utime - process.ru_stime - (time.thread_time() - main))
print(json.dumps(sorted(spun)[2]))
"""


def _seconds_spun(settings: dict[str, str]) -> float:
    plain = {name: value for name, value in os.environ.items() if name not in WAIT_VARIABLES}
    done = subprocess.run([sys.executable, "-c", SPIN], capture_output=True, text=True, timeout=120,
                          env={**plain, **settings})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not torch.backends.openmp.is_available(),
                    reason="needs two cores and a torch built with OpenMP")
def test_a_cpu_workers_idle_threads_spin_longer_and_then_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in WAIT_VARIABLES:  # as a user who chose none (an in-process `aiayn evaluate` sets one)
        monkeypatch.delenv(name, raising=False)
    cluster = load_job_config(None, []).cluster
    given = worker_environment(cluster, uses_gpu=False)
    default, spinning = _seconds_spun({}), _seconds_spun(given)
    # 10x libgomp's default spin count: ~4 against ~40 ms on an Intel Xeon, in proportion elsewhere
    assert spinning > 4 * default, (spinning, default)
    assert spinning < 0.2, spinning  # it sleeps long before the 0.3 s pause ends: an idle process idles


def test_a_users_own_wait_policy_reaches_the_workers_and_gpu_workers_get_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in WAIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert spin_environment({"OMP_WAIT_POLICY": "PASSIVE", "HOME": "/"}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    cluster = load_job_config(None, ["cluster.keep_freed_memory=false"]).cluster
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")  # the driver's: workers on other nodes get it too
    assert worker_environment(cluster, uses_gpu=False) == {"GOMP_SPINCOUNT": "0"}
    assert worker_environment(load_job_config(None, ["cluster.use_gpu=true"]).cluster, uses_gpu=True) == {}
