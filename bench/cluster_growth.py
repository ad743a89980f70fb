"""How a run's fixed costs grow with the cluster, simulated on one machine: for each worker count,
a local cluster of that many Ray nodes (`aiayn cluster up`, one logical CPU each; nodes share the
machine's cores, so a step slows as workers are added, which these figures do not measure) runs
`aiayn train` with the `tiny` preset on a prepared dataset, one worker per node, ZeRO-2:

- seconds from starting `aiayn train` to its first optimizer step (the MLflow timestamp of step
  1's metrics), and the driver's own start-up share of it (`goodput/startup_s`);
- seconds each checkpoint costs: the loop's stall and rank 0's upload (medians, from MLflow);
- peak memory of the driver process (its max RSS from the kernel) and of Ray Train's controller
  actor (sampled every 0.2 s);
then the growth per added worker of each, by least squares over the worker counts.

    python bench/cluster_growth.py --data-dir data --workers 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _provenance import ROOT, provenance
from mlflow.tracking import MlflowClient

from jobs.report.tracking import RUN_NAME_TAG


def _aiayn(*args: str, env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, check=True, **kwargs)


def _controller_rss(stop: threading.Event, peak: list[int]) -> None:
    """Peak RSS (bytes) of Ray Train's controller actor, whatever its pid, until `stop`."""
    while not stop.wait(0.2):
        for process in Path("/proc").glob("[0-9]*"):
            try:
                if b"TrainController" not in (process / "cmdline").read_bytes():  # its title: ray::TrainController
                    continue
                status = (process / "status").read_text().splitlines()
                rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            except (OSError, StopIteration, ValueError):
                continue
            peak[0] = max(peak[0], rss * 1024)


def one_size(workers: int, data_dir: str, steps: int, every: int, scratch: Path, logs: Path | None) -> dict:
    env = {**os.environ, "AIAYN_HOME": str(scratch / "aiayn"), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    state = json.loads(_aiayn("cluster", "up", "--nodes", str(workers), "--cpus-per-node", "1", "--no-mlflow",
                              "--no-object-store", env=env, timeout=600).stdout)
    tracking, name = f"sqlite:///{scratch / 'mlflow.db'}", f"growth-{workers}"
    try:
        stop, controller = threading.Event(), [0]
        sampler = threading.Thread(target=_controller_rss, args=(stop, controller), daemon=True)
        sampler.start()
        started = time.time()
        with (scratch / "driver.log").open("w") as log:
            driver = subprocess.Popen([
                sys.executable, "-m", "jobs.cli", "train", f"--name={name}", f"data.output_dir={data_dir}",
                "model.preset=tiny", f"cluster.address={state['ray_address']}", f"cluster.num_workers={workers}",
                "cluster.cpus_per_worker=1", "train.threads_per_worker=1", f"train.max_steps={steps}",
                "train.max_minutes=0", "optim.decay_steps=0", "train.log_every=1", "train.validate_every=0",
                f"train.checkpoint_every_steps={every}", "train.keep_checkpoints=2", "train.average_checkpoints=1",
                "train.beam_size=1", "stream.max_tokens=1024", f"cluster.storage_path={scratch / 'runs'}",
                f"tracking.uri={tracking}",
            ], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, rusage = os.wait4(driver.pid, 0)  # its own peak RSS (ru_maxrss, KiB), not the bench's
        driver.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(scratch / "driver.log", logs / f"driver-{workers}.log")
        if driver.returncode:
            raise RuntimeError(f"aiayn train on {workers} workers failed:\n{(scratch / 'driver.log').read_text()[-3000:]}")
    finally:
        subprocess.run([sys.executable, "-m", "jobs.cli", "cluster", "down"], env=env, cwd=ROOT,
                       capture_output=True, timeout=300)
    client = MlflowClient(tracking)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    first = min(client.get_metric_history(run.info.run_id, "train/tokens_per_s"), key=lambda m: m.step)
    history = {key: [m.value for m in client.get_metric_history(run.info.run_id, key)]
               for key in ("checkpoint/stall_s", "checkpoint/upload_s")}
    return {
        "workers": workers,
        "seconds_to_first_step": round(first.timestamp / 1000 - started, 1),
        "driver_startup_s": round(run.data.metrics.get("goodput/startup_s", float("nan")), 1),
        "checkpoints": len(history["checkpoint/stall_s"]),
        "checkpoint_stall_s": round(statistics.median(history["checkpoint/stall_s"]), 2),
        "checkpoint_upload_s": round(statistics.median(history["checkpoint/upload_s"]), 2),
        "driver_peak_rss_mib": round(rusage.ru_maxrss / 1024),
        "controller_peak_rss_mib": round(controller[0] / 2**20),
    }


def _slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data", help="where `aiayn prepare` put its dataset")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--logs", type=Path, help="keep each run's driver console here")
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    rows = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory(prefix="aiayn-growth-") as scratch:
            rows.append(one_size(workers, data_dir, args.steps, args.checkpoint_every, Path(scratch), args.logs))
        print(json.dumps(rows[-1]), file=sys.stderr)
    counts = [r["workers"] for r in rows]
    growth = {f"{key}_per_added_worker": round(_slope(counts, [r[key] for r in rows]), 2)
              for key in ("seconds_to_first_step", "driver_startup_s", "checkpoint_stall_s", "checkpoint_upload_s",
                          "driver_peak_rss_mib", "controller_peak_rss_mib")} if len(rows) > 1 else {}
    print(json.dumps({"config": vars(args), "provenance": provenance(), "sizes": rows, "growth": growth}, indent=2,
                     default=str))


if __name__ == "__main__":
    main()
