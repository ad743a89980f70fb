"""What OpenMP threads that spin through a step's serial stretches give CPU training, in one run.

CPU training workers (and `aiayn evaluate|translate` on a CPU) start with GNU OpenMP's spin count
raised tenfold (jobs/train/openmp_spin.py). Here the same 2-thread work runs with libgomp's default
(`GOMP_SPINCOUNT=300000`, set explicitly) and with aiayn's setting, arms taking turns, each run in
a fresh process (libgomp reads the setting once, as torch loads it):
- bare: `bench/training_stack.py`'s bare loop (the recipe's model, the stream's token-budget
  batches, Adam, clipping) in one process;
- stack (`--stack`): `aiayn train` on 1 worker x the same threads, its local Ray and workers
  inheriting the driver's setting.
Statistic: target tokens/s of each 10-step window after step 10, median over windows, then over
rounds; a ratio is aiayn's setting over the default. Also the CPU time the bare loop's process
used per second of wall time (spinning that cost cores would show there).

    python bench/openmp_spin.py --data-dir data --rounds 4 --stack
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _provenance import provenance
from training_stack import stack_run

from jobs.train.openmp_spin import WAIT_VARIABLES, spin_environment

ARMS = {"libgomp default": {"GOMP_SPINCOUNT": "300000"}, "aiayn": spin_environment({})}
BARE = "import sys, training_stack; print(training_stack.bare_loop(*sys.argv[1:2], *map(int, sys.argv[2:])))"


def _environment(arm: str) -> dict[str, str]:
    """This process's environment with only the arm's say on how OpenMP threads wait, and the
    bench's modules importable (the processes Ray starts inherit it)."""
    here = Path(__file__).resolve().parent
    plain = {name: value for name, value in os.environ.items() if name not in WAIT_VARIABLES}
    path = os.pathsep.join(filter(None, [str(here), str(here.parent), os.environ.get("PYTHONPATH")]))
    return {**plain, **ARMS[arm], "PYTHONPATH": path}


def bare(arm: str, dataset: str, steps: int, max_tokens: int, threads: int) -> tuple[float, float]:
    """(tokens/s, CPU seconds per wall second) of the bare loop in a fresh process."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", BARE, dataset, str(steps), str(max_tokens), str(threads)],
                          check=True, capture_output=True, text=True, env=_environment(arm))
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - started
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return float(done.stdout.strip().splitlines()[-1]), cpu / wall


def stack(arm: str, data_dir: str, steps: int, max_tokens: int, threads: int) -> float:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(_environment(arm))  # the driver's, which its local Ray hands on
    try:
        with tempfile.TemporaryDirectory() as scratch:
            return stack_run(data_dir, 1, threads, steps, max_tokens, Path(scratch))["target_tokens_per_s"]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data", help="where `aiayn prepare` put multi30k-en-de")
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--stack", action="store_true", help="also `aiayn train` on 1 worker")
    args = parser.parse_args()
    dataset = str(Path(args.data_dir) / "multi30k-en-de")
    rates: dict[str, list[float]] = {}
    busy: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for arm in ARMS:
            rate, cores = bare(arm, dataset, args.steps, args.max_tokens, args.threads)
            rates.setdefault(f"bare/{arm}", []).append(rate)
            busy.setdefault(arm, []).append(cores)
            if args.stack:
                rates.setdefault(f"stack/{arm}", []).append(
                    stack(arm, args.data_dir, args.steps, args.max_tokens, args.threads))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(json.dumps({
        "target_tokens_per_s": {name: round(value) for name, value in medians.items()},
        "by_round": {name: [round(value) for value in values] for name, values in rates.items()},
        "ratio_aiayn_vs_default": {kind: round(medians[f"{kind}/aiayn"] / medians[f"{kind}/libgomp default"], 3)
                                   for kind in ("bare", "stack") if f"{kind}/aiayn" in medians},
        "bare_cpu_seconds_per_second": {arm: round(statistics.median(values), 2) for arm, values in busy.items()},
        "settings": ARMS, "config": vars(args), "provenance": provenance(),
    }, indent=2))


if __name__ == "__main__":
    main()
