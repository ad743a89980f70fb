"""What work beside the training loop costs the loop: BLEU validation in the background, and an
outage of the tracking server. Real `aiayn train` runs of the main job's recipe.

`bleu`: the same run twice, with valid BLEU of a checkpoint every `--bleu-every` steps by a
separate Ray task (`train.bleu_every`, `train.bleu_in_background=true`) and without BLEU; 1 worker
with 1 thread, so that the BLEU task has the other core, as it has its own resources on a
cluster. Printed: median training tokens/s with / without (goal >= 0.95).

`outage`: one run tracked on a real `mlflow server` over HTTP, which is stopped for `--outage-s`
seconds once step `--outage-after` is logged, and started again on the same port and store.
Printed: the seconds the loop was charged to tracking during the outage (the time ledger's
`goodput/tracking_s`, cumulative, read at the steps around it) beyond its rate per step outside
the outage (goal: <= 5 s lost), and the median seconds per step inside and outside it.

    python bench/loop_interference.py bleu --data-dir data
    python bench/loop_interference.py outage --data-dir data --outage-s 360
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _provenance import ROOT, provenance


def _train(name: str, tracking: str, scratch: Path, args: argparse.Namespace, *extra: str) -> None:
    command = [sys.executable, "-m", "jobs.cli", "train", f"--name={name}", f"data.output_dir={args.data_dir}",
               f"cluster.storage_path={scratch / 'runs'}", f"tracking.uri={tracking}", "train.log_every=1",
               f"train.max_steps={args.steps}", *extra]
    with (scratch / f"{name}.log").open("w") as log:
        if subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"{name} failed: see {scratch / f'{name}.log'}")


def _history(tracking: str, name: str, key: str) -> list:
    from mlflow.tracking import MlflowClient

    from jobs.report.tracking import RUN_NAME_TAG

    client = MlflowClient(tracking)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    return sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)


def bleu(args: argparse.Namespace, scratch: Path) -> dict:
    tracking = f"sqlite:///{scratch / 'mlflow.db'}"
    one_core = ("cluster.num_workers=1", "cluster.cpus_per_worker=1", "train.threads_per_worker=1",
                "train.validate_every=0", "train.checkpoint_every_steps=1000")
    rates = {}
    for arm, bleu_every in (("without", 0), ("with", args.bleu_every)):
        _train(f"bleu-{arm}", tracking, scratch, args, *one_core, f"train.bleu_every={bleu_every}")
        rates[arm] = statistics.median(m.value for m in _history(tracking, f"bleu-{arm}", "train/tokens_per_s")
                                       if 1 < m.step < args.steps)  # the first has the start, the last the end
    scored = [m.step for m in _history(tracking, "bleu-with", "valid/bleu")]
    return {"ratio_with_vs_without_bleu": round(rates["with"] / rates["without"], 3),
            "tokens_per_s": {arm: round(rate) for arm, rate in rates.items()},
            "bleu_scored_at_steps": scored, "bleu_every": args.bleu_every}


def outage(args: argparse.Namespace, scratch: Path) -> dict:
    from cluster.services import free_port, start_mlflow_server

    port, store = free_port(), scratch / "mlflow"
    server, url = start_mlflow_server(scratch / "logs", store, port=port)
    window: dict[str, float] = {}

    def cut() -> None:
        nonlocal server
        while not _logged(url, args.outage_after):
            time.sleep(2)
        server.stop()
        window["stopped"] = time.time()
        time.sleep(args.outage_s)
        server, _ = start_mlflow_server(scratch / "logs", store, port=port)
        window["back"] = time.time()

    fault = threading.Thread(target=cut, daemon=True)
    fault.start()
    try:
        _train("outage", url, scratch, args, "train.validate_every=0", "train.checkpoint_every_steps=50")
        fault.join()
        tracking = _history(url, "outage", "goodput/tracking_s")
        steps = _history(url, "outage", "train/step_time_s")
    finally:
        server.stop()
    stopped, back = window["stopped"], window["back"]
    # The ledger's cumulative tracking seconds at the last step logged before the outage and the
    # first after it: what the loop spent on tracking during it, against its rate outside it.
    charged = {m.step: m.value for m in tracking}
    last_before = max(m.step for m in tracking if m.timestamp / 1000 < stopped)
    first_after = min(m.step for m in tracking if m.timestamp / 1000 > back)
    first, last = min(charged), max(charged)
    during, steps_during = charged[first_after] - charged[last_before], first_after - last_before
    rate_outside = (charged[last] - charged[first] - during) / (last - first - steps_during)
    inside = [m.value for m in steps if last_before < m.step <= first_after]
    outside = [m.value for m in steps if m.step > 1 and not last_before < m.step <= first_after]
    return {"seconds_lost_to_tracking": round(during - steps_during * rate_outside, 2),
            "tracking_s_during_outage": round(during, 2), "tracking_s_per_step_outside": round(rate_outside, 4),
            "median_step_s": {"outage": round(statistics.median(inside), 3),
                              "outside": round(statistics.median(outside), 3)},
            "steps_during_outage": steps_during, "outage_s": round(back - stopped, 1),
            "outage_after_step": args.outage_after}


def _logged(url: str, step: int) -> bool:
    try:
        return any(m.step >= step for m in _history(url, "outage", "train/loss"))
    except Exception:  # noqa: BLE001 - the run not created yet
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=("bleu", "outage"))
    parser.add_argument("--data-dir", default="data", help="where `aiayn prepare` put multi30k-en-de")
    parser.add_argument("--steps", type=int, default=0, help="train.max_steps (default: 90 for bleu, 330 for outage)")
    parser.add_argument("--bleu-every", type=int, default=30)
    parser.add_argument("--outage-after", type=int, default=40, help="the step logged before the server stops")
    parser.add_argument("--outage-s", type=float, default=360)
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    args.steps = args.steps or (90 if args.case == "bleu" else 330)
    with tempfile.TemporaryDirectory(prefix="aiayn-bench-") as scratch:
        result = (bleu if args.case == "bleu" else outage)(args, Path(scratch))
    print(json.dumps({**result, "steps": args.steps, "provenance": provenance()}, indent=2))


if __name__ == "__main__":
    main()
