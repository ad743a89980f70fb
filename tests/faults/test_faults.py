"""Faults injected into real runs (a 2-node Ray cluster, DeepSpeed, an MLflow server over HTTP):
the run ends as it should, loses nothing beyond one checkpoint interval, and never silently.

Rows covered elsewhere in the suite, with the same standard: a worker SIGKILLed, a worker
SIGSTOPped (caught as a hang, its stacks kept, the run exact), two drivers of one run (the
second refused), a driver SIGSTOPped past its lease (replaced; resumed, it writes nothing), the driver
SIGKILLed and rerun (tests/jobs/test_training.py), a node's raylet SIGKILLed
(tests/cluster/test_end_to_end.py), a stale state file naming a live unrelated process and two
concurrent `cluster up` (tests/cluster/test_local_cluster.py), an MLflow outage across a restart
at the logger level (tests/jobs/test_tracking.py).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster.ray_connection import connect
from cluster.services import free_port, start_mlflow_server
from data_pipeline.errors import InputError
from data_pipeline.manifest import load_manifest
from data_pipeline.prepare import plan_prepare, run_prepare
from jobs import checkpoint as ckpt
from jobs.cli import _summary
from jobs.train.driver import train
from tests.jobs.helpers import (
    newest_complete,
    runs_named,
    steps,
    time_ledger,
    tiny_job,
    when,
    when_checkpoint_exists,
    when_checkpoint_upload_begins,
)

pytestmark = pytest.mark.slow
STEPS = 30
SHORT_CLIENT_BUDGET = ("tracking.http_retries=0", "tracking.http_timeout_s=3")  # MLflow's: seconds, not minutes


def _quiet(*_args) -> None:
    return None


def _timed_train(job):
    """The run's outcome and its wall time, for the ledger to be held to."""
    started = time.time()
    outcome = train(job, log=_quiet)
    return outcome, time.time() - started


def test_mlflow_server_down_mid_run(ray_cluster, tiny_corpus, tmp_path, fault_row) -> None:
    """The tracking server stops after the checkpoint of step 10 and comes back 20 s later; the
    client's budget is short (tracking.http_retries=0), so the outage spans several saves."""
    port, store = free_port(), tmp_path / "mlflow"
    server, url = start_mlflow_server(tmp_path / "logs", store, port=port)
    back = threading.Event()

    def outage() -> None:
        nonlocal server
        server.stop()
        time.sleep(20)
        server, _ = start_mlflow_server(tmp_path / "logs", store, port=port)
        back.set()

    job = tiny_job(tiny_corpus, tmp_path, "outage", address=ray_cluster, tracking=url, extra=SHORT_CLIENT_BUDGET)
    watcher = when_checkpoint_exists(tmp_path / "runs" / "outage", 10, outage)
    try:
        outcome, wall_s = _timed_train(job)
        watcher.join(timeout=60)
        assert back.wait(timeout=60)
        assert outcome.steps == STEPS and Path(outcome.export_uri, "export.json").is_file()
        assert steps(url, outcome.run_id) == list(range(1, STEPS + 1))  # nothing lost, nothing twice
        assert "test/bleu" in runs_named(url, "outage")[0].data.metrics
        # Every second accounted for, and the loop never stood still for the outage: sending
        # metrics is off the training thread.
        ledger, seconds = time_ledger(url, outcome.run_id)
        print(f"ledger {seconds:.1f} s against {wall_s:.1f} s of wall time; {ledger}")
        assert abs(seconds - wall_s) <= 0.02 * wall_s
        assert ledger["goodput/tracking_s"] < 10, ledger
    finally:
        server.stop()
    fault_row(fault="MLflow server down 20 s mid-run (client budget 0 retries, 3 s)", injected="server stopped",
              at_step="after checkpoint 10", outcome="run completed; metrics replayed, each step once",
              steps_lost="0", data_lost="none")


def test_mlflow_server_that_hangs_until_the_run_ends(ray_cluster, tiny_corpus, tmp_path, fault_row) -> None:
    """The tracking server stops answering at the checkpoint of step 10 (SIGSTOP: the kernel still
    accepts its connections) and answers again only after the run has ended. The run ends as
    usual within its client budget (every driver call bounded by tracking.http_timeout_s), and a
    rerun of the finished run once the server is back sends what it could not, each step once."""
    server, url = start_mlflow_server(tmp_path / "logs", tmp_path / "mlflow", port=free_port())
    hang, resume = (functools.partial(os.killpg, server.process.pid, sig) for sig in (signal.SIGSTOP, signal.SIGCONT))
    job = tiny_job(tiny_corpus, tmp_path, "hung", address=ray_cluster, tracking=url, extra=SHORT_CLIENT_BUDGET)
    watcher = when_checkpoint_upload_begins(tmp_path / "runs" / "hung", 10, hang)
    try:
        outcome, wall_s = _timed_train(job)
        watcher.join(timeout=60)
        assert outcome.steps == STEPS and Path(outcome.export_uri, "export.json").is_file()
        # MLflow's own budget (120 s and 7 retries per call) would hold the end for a quarter of an
        # hour per call; this one lets it end in a few minutes (the workers' last sends, the
        # driver's backlog wait, artifacts and ledger each give up after their budget).
        assert wall_s < 480, wall_s
        # The end says, with no further call to MLflow, what it lacks and that the same command sends it.
        assert "metrics" in outcome.mlflow_lacks and "the time ledger and the run's end" in outcome.mlflow_lacks
        summary = _summary(outcome)
        assert f"{url}/#/runs/{outcome.run_id}" in summary and "run the same command again" in summary
        resume()  # it then also answers the requests the kernel queued while it was stopped
        again = train(job, log=_quiet)
        assert again.run_id == outcome.run_id and again.mlflow_lacks == ()
        assert steps(url, outcome.run_id) == list(range(1, STEPS + 1))  # nothing lost, nothing twice
        assert "test/bleu" in runs_named(url, "hung")[0].data.metrics
    finally:
        resume()
        server.stop()
    fault_row(fault="MLflow server hangs (accepts, never answers) until the run ends (client budget 0 retries, 3 s)",
              injected="server SIGSTOPped", at_step="checkpoint 10",
              outcome=f"run ended normally in {wall_s:.0f} s; a rerun after the server was back sent every step once",
              steps_lost="0", data_lost="none")


def test_a_flipped_byte_in_a_shard(ray_cluster, tiny_corpus, tmp_path, fault_row) -> None:
    job = tiny_job(tiny_corpus, tmp_path, "flipped", address=ray_cluster,  # its own copy of the data, to break
                   extra=("train.max_steps=5", f"data.output_dir={tmp_path / 'prepared'}"))
    connect(ray_cluster)
    run_prepare(plan_prepare(job.data))
    shard = Path(load_manifest(job.data.dataset_uri).shard_uris("train")[0][0])
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"{shard.name}: its sha256 differs"):
        train(job, log=_quiet)
    # Refused before the run's lease, which comes before any contact with the cluster's workers.
    assert not (tmp_path / "runs" / "flipped").exists()
    fault_row(fault="one shard byte flipped", injected="byte XOR 0x01 in train/part-00000", at_step="before a run",
              outcome="refused in one line naming the shard, before any worker (exit 2)", steps_lost="0",
              data_lost="none")


def test_checkpoint_storage_full_during_a_save(ray_cluster, tiny_corpus, tmp_path, fault_row) -> None:
    """The workers' staging disk (a 16 MiB tmpfs) fills up once the checkpoint of step 5 is
    complete: the next save fails on every attempt, the run fails with the reason, the last
    checkpoint saved before stays intact, and a rerun once there is room continues from it."""
    staging = tmp_path / "staging"
    staging.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "aiayn-test-full", str(staging)], check=True)
    try:
        job = tiny_job(tiny_corpus, tmp_path, "full", address=ray_cluster,
                       extra=(f"cluster.staging_dir={staging}", "cluster.max_failures=1"))
        filler = staging / "filler"
        run_dir = tmp_path / "runs" / "full"
        at_fill: list = []

        def fill() -> None:
            with open(filler, "wb") as handle:
                try:
                    while True:
                        handle.write(b"\0" * (1 << 20))
                        handle.flush()
                except OSError:
                    pass
            at_fill.append(newest_complete(run_dir))

        # As soon as step 5's checkpoint is complete in storage (its registration by Ray Train lags
        # by seconds, which a short run can outlast): the saves after it find the disk full.
        watcher = when(lambda: ckpt.is_complete(run_dir / ckpt.checkpoint_dir_name(5)), fill)
        said: list[str] = []
        with pytest.raises(Exception, match=r"checkpoint part to .* failed with 0 MiB free on that disk"):
            train(job, log=said.append)
        watcher.join(timeout=30)
        tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
        assert runs_named(tracking, "full")[0].info.status == "FAILED"  # not RUNNING forever
        assert any(line.startswith("run full stopped (") and "its MLflow run is marked FAILED; once the cause is "
                   "gone, the same command resumes it" in line for line in said), said[-5:]
        last = newest_complete(run_dir)
        resumed, complete_at_fill = ckpt.read_job_state(last).step, ckpt.read_job_state(at_fill[0]).step
        # Nothing was saved once the disk was full, but for the one save whose part was staged
        # before and whose upload (one is in flight at a time) ended after it...
        assert complete_at_fill <= resumed <= complete_at_fill + 5
        ckpt.verify(last, ckpt.Signer.of_account())  # ...and what was saved before is intact
        filler.unlink()
        outcome = train(job, log=_quiet)  # room again: the same command continues
        assert outcome.steps == STEPS
        [run] = runs_named(tracking, "full")
        assert run.info.status == "FINISHED"
        assert int(run.data.tags["resumed_from_step"]) == resumed
        assert steps(tracking, outcome.run_id) == list(range(1, STEPS + 1))
    finally:
        subprocess.run(["umount", "-l", str(staging)], check=False)
    fault_row(fault="checkpoint staging disk full during a save", injected="16 MiB tmpfs filled",
              at_step=f"the save after step {resumed}",
              outcome=f"run failed after 1 retry naming the full staging disk; rerun resumed from step {resumed}",
              steps_lost="5 (one interval)", data_lost="none")


def test_a_run_that_diverges_to_nan(ray_cluster, tiny_corpus, tmp_path, fault_row) -> None:
    """optim.lr=1e30: the first update makes the weights ~1e29, so from step 2 on the activations
    overflow and the loss and gradients are NaN. ZeRO-2 skips those updates on every rank; after
    train.max_consecutive_skips the run stops with the reason, and nothing is saved or exported."""
    job = tiny_job(tiny_corpus, tmp_path, "diverged", address=ray_cluster,
                   extra=("optim.lr=1e30", "train.max_consecutive_skips=3", "cluster.max_failures=0",
                          "train.checkpoint_every_steps=1000"))
    with pytest.raises(Exception, match=r"the last 3 updates had non-finite gradients and were skipped; the run "
                                        r"has diverged"):
        train(job, log=_quiet)
    assert newest_complete(tmp_path / "runs" / "diverged") is None
    assert not (tmp_path / "runs" / "diverged" / "export").exists()
    fault_row(fault="the loss becomes NaN (optim.lr=1e30)", injected="divergence after step 1", at_step="2",
              outcome="3 updates skipped on every rank, then the run stopped naming the divergence; nothing saved",
              steps_lost="all (nothing worth keeping)", data_lost="none")


def test_a_recompile_longer_than_the_step_limit_is_no_hang(ray_cluster, tiny_corpus, tmp_path, fault_row) -> None:
    """GPU runs compile by default, and Dynamo compiles again when a token-budget batch brings a
    new shape (after that it marks the sizes dynamic) or the epoch's end its stand-in batch. Each
    compile is a phase of its own with the long allowance, wherever it happens: here a step limit of
    3 s, compiles on a CPU that take many times that, and the run ends with no hang declared."""
    lines: list[str] = []
    job = tiny_job(tiny_corpus, tmp_path, "compiled", address=ray_cluster, extra=(
        "train.compile=true", "train.hang_timeout_s=3", "train.max_steps=3", "train.validate_every=0",
        "train.checkpoint_every_steps=100", "cluster.max_failures=0"))
    outcome = train(job, log=lines.append)
    assert outcome.steps == 3
    step_time = {m.step: m.value for m in MlflowClient(outcome.tracking_uri).get_metric_history(
        outcome.run_id, "train/step_time_s")}
    over = {step: round(seconds, 1) for step, seconds in step_time.items() if step > 1 and seconds > 3}
    assert over, step_time  # a step after the first compiled again, for longer than the step limit
    assert not (tmp_path / "runs" / "compiled" / "hangs").exists()
    assert not [line for line in lines if "hang: rank" in line or "worker group failed" in line], "\n".join(lines)
    fault_row(fault="a recompile longer than the step limit (train.compile, hang_timeout_s=3)",
              injected="a new batch shape after step 1", at_step=", ".join(map(str, sorted(over))),
              outcome="no hang declared, no restart: compiling is a long phase of its own",
              steps_lost="0", data_lost="none")
