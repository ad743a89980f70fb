"""Training stall per checkpoint with asynchronous uploads against synchronous ones, in one run.

`aiayn train` (1 worker, ZeRO-2, checkpoints to an S3 bucket) runs twice, with
`train.async_checkpoint=true` and `=false`; each reads back from MLflow the seconds its loop stood
still for each save (`checkpoint/stall_s`) and what the upload took (`checkpoint/upload_s`). The
last save of a run waits for its upload by design and is left out. The bucket is a real
S3 server (the isolated cluster's Swift store) whose port is limited to `--rate` by the kernel's traffic control
(an HTB class on the loopback device), in a network namespace of its own so that nothing else on
the machine is shaped: the bench re-runs itself under `unshare --net` (needs root).

    python bench/checkpoint_stall.py --data-dir data --preset base --rate 400mbit

Recorded: bench/results/checkpoint_stall_cpu_2026-12-02.json (0.056).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shape(port: int, rate: str) -> None:
    """Traffic to `port` on the loopback device at `rate`; everything else unlimited."""
    for command in (
        "ip link set lo up",
        "tc qdisc add dev lo root handle 1: htb default 10",
        "tc class add dev lo parent 1: classid 1:10 htb rate 100gbit",
        f"tc class add dev lo parent 1: classid 1:20 htb rate {rate} ceil {rate}",
        f"tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip dport {port} 0xffff flowid 1:20",
    ):
        subprocess.run(command.split(), check=True)


def _run(mode: str, args: argparse.Namespace, scratch: Path, store_env: dict) -> dict:
    from mlflow.tracking import MlflowClient

    from jobs.report.tracking import RUN_NAME_TAG

    name, tracking = f"stall-{mode}", f"sqlite:///{scratch / 'mlflow.db'}"
    staging = Path(tempfile.mkdtemp(prefix="aiayn-bench-staging-", dir="/dev/shm"))
    command = [
        sys.executable, "-m", "jobs.cli", "train", f"--name={name}", f"data.output_dir={args.data_dir}",
        f"model.preset={args.preset}", "cluster.num_workers=1", f"cluster.cpus_per_worker={args.threads}",
        f"train.threads_per_worker={args.threads}", f"train.max_steps={args.steps}", "train.max_minutes=0",
        f"train.checkpoint_every_steps={args.every}", "train.checkpoint_every_minutes=1000",
        "train.keep_checkpoints=2", "train.average_checkpoints=1", "train.validate_every=0", "train.log_every=1",
        f"train.async_checkpoint={'true' if mode == 'async' else 'false'}", f"stream.max_tokens={args.max_tokens}",
        f"cluster.storage_path=s3://bucket/{name}", f"cluster.staging_dir={staging}", f"tracking.uri={tracking}",
        "train.beam_size=1",
    ]
    try:
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, **store_env})
    finally:
        subprocess.run(["rm", "-rf", str(staging)], check=False)
    client = MlflowClient(tracking)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")[0]

    def by_step(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    stalls, uploads, step_times = by_step("checkpoint/stall_s"), by_step("checkpoint/upload_s"), by_step("train/step_time_s")
    measured = sorted(step for step in stalls if step < args.steps)  # the last save waits by design
    return {"stall_s": {s: round(stalls[s], 2) for s in measured},
            "upload_s": {s: round(uploads[s], 2) for s in measured if s in uploads},
            "median_step_s": round(statistics.median(step_times.values()), 2),
            "median_stall_s": statistics.median(stalls[s] for s in measured)}


def inside(args: argparse.Namespace) -> None:
    from cluster.services import free_port, start_scratch_object_store

    with tempfile.TemporaryDirectory() as scratch:
        port = free_port()
        _shape(port, args.rate)
        store, store_env = start_scratch_object_store(Path(scratch), "bucket", port=port)
        try:
            runs = {mode: _run(mode, args, Path(scratch), store_env) for mode in ("async", "sync")}
        finally:
            store.stop()
    uploads = [s for r in runs.values() for s in r["upload_s"].values()]
    print(json.dumps({
        "stall_ratio_async_vs_sync": round(runs["async"]["median_stall_s"] / runs["sync"]["median_stall_s"], 3),
        "median_upload_s": statistics.median(uploads) if uploads else None,
        "runs": runs, "preset": args.preset, "rate": args.rate, "steps": args.steps,
        "checkpoint_every_steps": args.every, "max_tokens": args.max_tokens, "threads": args.threads,
    }, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data", help="where `aiayn prepare` put multi30k-en-de")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--rate", default="400mbit", help="the bucket's bandwidth, in tc's units")
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--every", type=int, default=6, help="train.checkpoint_every_steps")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    if args.inside:
        inside(args)
    else:  # a network namespace of its own, so that shaping its loopback touches nothing else
        os.execvp("unshare", ["unshare", "--net", sys.executable, *sys.argv, "--inside"])


if __name__ == "__main__":
    main()
