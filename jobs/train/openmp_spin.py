"""Keep a CPU process's idle OpenMP threads spinning through the serial stretches of a step.

torch's Linux wheels run their intra-op threads on GNU OpenMP (libgomp), whose idle threads spin
300,000 times after a parallel region and then sleep on a futex: about 4 ms on the Intel Xeon
these figures come from, where one `pause` takes 14 ns. A training step has serial stretches
longer than that (Python between operators, the stream's next batch), and each parallel region
after one first wakes the sleepers; on a virtual machine a sleeping vCPU halts, and waking it
goes through the hypervisor. Ten times the spin (about 40 ms there) keeps them awake within a
step: the 2-thread bare training loop 1.09x faster, `aiayn train` on 1 worker x 2 threads 1.16x,
for no more CPU time (bench/openmp_spin.py, bench/results/). A process that waits
longer (a checkpoint, a collective, the next request) still lets its cores go. Nothing changes
with one thread, nor where torch runs another OpenMP runtime.
"""

from __future__ import annotations

import os
from typing import Mapping

SPIN_COUNT = 3_000_000
# How OpenMP threads wait, in the variables libgomp reads: where either is set, that choice stands.
WAIT_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def spin_environment(environment: Mapping[str, str] = os.environ) -> dict[str, str]:
    """How a process about to load torch waits (libgomp reads it once, as it loads): the choice
    `environment` (the driver's, the user's) already makes, so that workers on other nodes get it
    too, else aiayn's spin count."""
    chosen = {name: environment[name] for name in WAIT_VARIABLES if name in environment}
    return chosen or {"GOMP_SPINCOUNT": str(SPIN_COUNT)}


def spin_in_this_process() -> None:
    """The setting for this process, before it first imports torch (later, it changes nothing)."""
    os.environ.update(spin_environment())
