"""Training end to end on real services: a 2-node Ray cluster, DeepSpeed engines, MLflow.

Tolerance for the ZeRO comparison: every stage computes the same mathematics; only the order of
floating-point reductions differs (all-reduce vs reduce-scatter/all-gather), so the per-step
losses of stages 1-3 must match stage 0 to 1e-4 relative.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from data_pipeline.errors import InputError
from jobs import checkpoint as ckpt
from jobs.inference.export import INFO
from jobs.report.goodput import CATEGORIES
from jobs.run.config import TrainConfig
from jobs.train.driver import train
from tests.jobs.helpers import (
    CHECKPOINT_EVERY,
    TrainWorkers,
    cluster_busy_for,
    newest_complete,
    registered,
    runs_named,
    steps,
    time_ledger,
    tiny_job,
    tiny_overrides,
    when,
    when_checkpoint_exists,
    when_checkpoint_upload_begins,
)

pytestmark = pytest.mark.slow
MAX_STEPS = 30
EMA = "train.ema_decay=0.9"  # the reference run and those compared with it export the weights' moving average
SECRET = "s3cret-in-the-uri"
BUSY_S = 8  # how long the cluster stays busy after the run asks for its workers


def _quiet(*_args) -> None:
    return None


def _losses(tracking_uri: str, run_id: str) -> list[float]:
    history = MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def _weights(export_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(export_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(ray_cluster, mlflow_server, tiny_corpus, tmp_path_factory):
    """An uninterrupted ZeRO-2 run, tracked on the real MLflow server; it starts while another job
    holds every CPU of the cluster until BUSY_S seconds after the run asks for its workers."""
    root = tmp_path_factory.mktemp("reference")
    with_credentials = mlflow_server.replace("http://", f"http://aiayn:{SECRET}@")  # the server ignores them
    lines: list[str] = []
    printed = io.StringIO()  # what the libraries print, too (MLflow prints run URLs)
    with contextlib.redirect_stdout(printed), cluster_busy_for(ray_cluster, BUSY_S):
        outcome = train(tiny_job(tiny_corpus, root, "reference", address=ray_cluster, tracking=with_credentials,
                                 extra=("tracking.registered_model=reference-mt", EMA)),
                        log=lines.append)
    (root / "console.txt").write_text("\n".join(lines) + "\n" + printed.getvalue())
    return root, outcome


def test_reference_run_is_tracked_once_per_step(reference_run, mlflow_server) -> None:
    root, outcome = reference_run
    runs = runs_named(mlflow_server, "reference")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert steps(mlflow_server, outcome.run_id) == list(range(1, MAX_STEPS + 1))
    run = runs[0]
    for key in ("train/nll", "train/ppl", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu",
                "train/step_time_s", "train/data_wait_s", "valid/loss", "valid/ppl", "test/bleu", "test/tokenized_bleu"):
        assert key in run.data.metrics, key
    assert run.data.params["train.zero_stage"] == "2" and run.data.tags["world_size"] == "2"
    assert {"node.rank0", "node.rank1", "git_commit", "bleu_signature", "chrf_signature"} <= set(run.data.tags)
    # Rank 0 has its usual extra duties here (MLflow over HTTP, checkpoint uploads, the moving
    # average), and the ranks' data runs out unevenly at each epoch's end: no rank is a straggler.
    own = {key for key in run.data.metrics if key.startswith("train/own_ms_per_ktok/")}
    assert own == {"train/own_ms_per_ktok/min", "train/own_ms_per_ktok/median", "train/own_ms_per_ktok/max"}
    assert run.data.metrics["train/slowest_rank"] in (0, 1)
    [table] = [a.path for a in MlflowClient(mlflow_server).list_artifacts(outcome.run_id, "ranks")]
    rows = Path(MlflowClient(mlflow_server).download_artifacts(outcome.run_id, table, str(root))).read_text().splitlines()
    assert rows[0] == "step,rank,node,figure,value" and {row.split(",")[1] for row in rows[1:]} == {"0", "1"}
    assert {row.split(",")[3] for row in rows[1:]} >= {"own_ms_per_ktok", "system_memory_usage_megabytes"}
    assert {"system/system_memory_usage_megabytes/max", "system/cpu_utilization_percentage/median"} <= set(
        run.data.metrics)  # the nodes' figures, summarised
    assert not [key for key in run.data.metrics  # no name per node or rank
                if socket.gethostname() in key or re.search(r"rank\d", key)]
    assert "straggler:" not in (root / "console.txt").read_text()
    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(outcome.run_id)}
    assert {"resolved_config.json", "data_manifest.json", "sample_translations.txt", "export"} <= artifacts
    [trained_on] = run.inputs.dataset_inputs  # the run's page names its dataset version, once across restarts
    assert trained_on.dataset.name == "text-en-de" and "/versions/" in trained_on.dataset.source
    # Where the time went: every category, and nothing lost without a restart (the sum against
    # the wall time: the SIGKILL test).
    ledger = {key: value for key, value in run.data.metrics.items() if key.startswith("goodput/") and key.endswith("_s")}
    assert set(ledger) == {f"goodput/{category}_s" for category in CATEGORIES}
    assert ledger["goodput/recovery_s"] == ledger["goodput/recomputed_s"] == 0
    assert ledger["goodput/training_s"] > 0 and ledger["goodput/startup_s"] > 0 and ledger["goodput/finish_s"] > 0
    # the other job's hold on the cluster, from the moment the run asked for its workers, is waiting
    # for resources, not start-up (charged to start-up instead, it would be 0)
    assert BUSY_S - 1 < ledger["goodput/resources_s"] <= BUSY_S + 20, ledger
    assert "where the time went (" in (root / "console.txt").read_text()  # the table, at the end
    # the tracking URI's credentials are nowhere: params, the config artifact, checkpoints
    assert not [v for v in run.data.params.values() if SECRET in v] and "***@" in run.data.params["tracking.uri"]
    config = MlflowClient(mlflow_server).download_artifacts(outcome.run_id, "resolved_config.json", str(root))
    assert SECRET not in Path(config).read_text()
    assert not [p for p in (root / "runs").rglob("*") if p.suffix in (".json", ".log") and SECRET in p.read_text()]
    assert (root / "runs" / "reference" / "aiayn.libraries.log").is_file()
    assert SECRET not in (root / "console.txt").read_text()
    assert outcome.test is not None and "nrefs:1" in outcome.test.bleu_signature and "nc:6" in outcome.test.chrf_signature
    # the export is the moving average of the weights (train.ema_decay), which every checkpoint keeps
    assert json.loads((Path(outcome.export_uri) / INFO).read_text())["weights"] == "moving average"
    assert all((Path(uri) / ckpt.AVERAGE).is_file() for uri in ckpt.list_checkpoints(root / "runs" / "reference"))
    assert run.data.metrics["test/chrf"] == pytest.approx(outcome.test.chrf)


def test_the_runs_registered_model_loads_and_scores(reference_run, mlflow_server, tiny_corpus, tmp_path,
                                                    monkeypatch) -> None:
    """From a fresh directory, the version the run registered loads with mlflow.pyfunc and scores the
    run's test BLEU through `aiayn evaluate --model models:/...` (serving it over HTTP is tested on
    a model that translates well: tests/jobs/test_model_registry.py)."""
    import mlflow

    _, outcome = reference_run
    assert outcome.model_uri == "models:/reference-mt/1"
    version = MlflowClient(mlflow_server).get_model_version("reference-mt", "1")
    assert version.run_id == outcome.run_id and float(version.tags["test/bleu"]) == pytest.approx(outcome.test.bleu, abs=0.01)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    sources = [line.strip() for line in (Path(tiny_corpus["test"] + ".en")).read_text().splitlines()[:5]]
    predicted = mlflow.pyfunc.load_model(outcome.model_uri).predict(sources)
    assert len(predicted) == len(sources) and all(isinstance(p, str) for p in predicted)
    evaluate = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--model", outcome.model_uri,
                               "--data", str(tiny_corpus["root"] / "prepared" / "text-en-de"), "--beam", "2"],
                              capture_output=True, text=True, env=env, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert json.loads(evaluate.stdout)["bleu"] == pytest.approx(outcome.test.bleu, abs=0.005)


def test_zero_stages_follow_the_same_loss_curve(reference_run, ray_cluster, tiny_corpus, tmp_path) -> None:
    root, outcome = reference_run
    stage2 = _losses(outcome.tracking_uri, outcome.run_id)[:20]
    for stage in (0, 1, 3):
        job = tiny_job(tiny_corpus, tmp_path, f"zero{stage}", address=ray_cluster,
                       extra=(f"train.zero_stage={stage}", "train.max_steps=20", "train.validate_every=0"))
        result = train(job, log=_quiet)
        curve = _losses(result.tracking_uri, result.run_id)
        assert len(curve) == 20
        for step, (ours, theirs) in enumerate(zip(curve, stage2), start=1):
            assert ours == pytest.approx(theirs, rel=1e-4), f"stage {stage} step {step}"
    assert stage2[-1] < stage2[0]  # and it is learning


def test_sigkill_of_a_worker_resumes_exactly(reference_run, ray_cluster, mlflow_server, tiny_corpus, tmp_path,
                                            capfd) -> None:
    """The kill comes as soon as a checkpoint's upload has begun (training went on meanwhile): the
    run resumes from the last checkpoint Ray Train registered, never from a part of one: at least
    the newest one registered when the kill came, at most this one. Registration follows an upload
    by seconds, so on a loaded machine several before it may still be waiting for theirs."""
    _, reference = reference_run
    seed = int(os.environ.get("AIAYN_FAULT_SEED", random.randrange(10**6)))
    after = random.Random(seed).choice([10, 15, 20])  # a checkpoint before it, and steps left after it
    run_dir = tmp_path / "runs" / "killed"
    seen: dict[str, bool] = {}

    workers = TrainWorkers()

    def kill() -> None:
        seen["newest_registered"] = max((step for step in range(CHECKPOINT_EVERY, after + 1, CHECKPOINT_EVERY)
                                         if registered(run_dir, ckpt.checkpoint_dir_name(step))), default=0)
        os.kill(workers.first(), signal.SIGKILL)

    print(f"SIGKILL of a worker once the upload of checkpoint {after} begins (AIAYN_FAULT_SEED={seed} repeats it)")
    # Valid BLEU off the loop as well: Ray Train's validation tasks score checkpoints 10, 20 and 30.
    job = tiny_job(tiny_corpus, tmp_path, "killed", address=ray_cluster, tracking=mlflow_server,
                   extra=("train.bleu_every=10", EMA, "tracking.registered_model=killed-run-model"))
    killer = when_checkpoint_upload_begins(run_dir, after, kill)
    console: list[str] = []
    started = time.time()
    outcome = train(job, log=console.append)
    wall_s = time.time() - started
    printed = capfd.readouterr()
    killer.join(timeout=5)
    # What the run showed besides aiayn's lines (here: `console`): nothing of Ray's paragraphs about
    # the dead worker, nor MLflow's messages and progress bars as the model was logged and registered.
    for foreign in ("\r", "(raylet)", "worker died", "Downloading artifacts", "Successfully registered model",
                    "Created version"):
        assert foreign not in printed.out + printed.err, (printed.out + printed.err)[-3000:]
    assert "Successfully registered model" in (run_dir / "aiayn.libraries.log").read_text()  # where they went
    runs = runs_named(mlflow_server, "killed")
    assert len(runs) == 1
    assert "newest_registered" in seen  # the kill happened
    resumed = int(runs[0].data.tags.get("resumed_from_step", 0))  # 0: no checkpoint was registered yet
    print(f"newest checkpoint registered when killed: {seen['newest_registered']}; resumed from step {resumed}")
    assert resumed % CHECKPOINT_EVERY == 0 and seen["newest_registered"] <= resumed <= after
    assert steps(mlflow_server, outcome.run_id) == list(range(1, MAX_STEPS + 1))  # each step exactly once
    bleu = MlflowClient(mlflow_server).get_metric_history(outcome.run_id, "valid/bleu")
    assert sorted(m.step for m in bleu) == [10, 20, 30]  # each checkpoint's once, across the restart
    assert any("scored in the background" in line for line in console)  # the tasks' lines reach the console
    assert any(line.startswith("[aiayn] the worker group failed: rank") for line in console)  # the restart is named
    # The time ledger: its parts sum to the run's wall time, and the steps trained again are those
    # from the checkpoint resumed from to where the killed attempt got (at least to the checkpoint
    # being uploaded; training went on during the upload, for at most a step or two).
    ledger, seconds = time_ledger(mlflow_server, outcome.run_id)
    print(f"ledger {seconds:.1f} s against {wall_s:.1f} s of wall time; {ledger}")
    assert abs(seconds - wall_s) <= 0.02 * wall_s
    if resumed:
        assert after - resumed <= ledger["goodput/recomputed_steps"] <= after - resumed + 3
        assert ledger["goodput/recovery_s"] > 0 and ledger["goodput/recomputed_s"] > 0
    ours, theirs = _weights(Path(outcome.export_uri)), _weights(Path(reference.export_uri))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_a_stopped_worker_is_caught_its_stacks_kept_and_the_run_resumes_exactly(
        reference_run, ray_cluster, mlflow_server, tiny_corpus, tmp_path) -> None:
    """SIGSTOP: the worker neither dies nor answers, and the other rank waits in a collective."""
    _, reference = reference_run
    seed = int(os.environ.get("AIAYN_FAULT_SEED", random.randrange(10**6)))
    after = random.Random(seed).choice([5, 10, 15])
    print(f"SIGSTOP of a worker at step {after + 2} (AIAYN_FAULT_SEED={seed} repeats it)")
    lines: list[tuple[float, str]] = []
    stopped: dict[str, float] = {}
    workers = TrainWorkers()

    def stop_one_worker() -> None:
        pid = workers.first()
        os.kill(pid, signal.SIGSTOP)
        stopped.update(pid=pid, at=time.monotonic())

    job = tiny_job(tiny_corpus, tmp_path, "hung", address=ray_cluster, tracking=mlflow_server,
                   extra=("train.hang_timeout_s=10", EMA))
    # Mid-training. The console lags the workers by a few steps, so the stop may land in a checkpoint
    # or a validation, legitimately long phases: a stopped process still gets a step's limit there.
    stopper = when(lambda: any(line.startswith(f"step {after + 2}/") for _, line in lines), stop_one_worker)
    try:
        outcome = train(job, log=lambda line: (lines.append((time.monotonic(), line)), print(line)))  # shown on failure
    finally:
        stopper.join(timeout=5)
        if "pid" in stopped:  # nothing stopped may outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stopped["pid"]), signal.SIGCONT)
    [(caught_at, hang)] = [(t, line) for t, line in lines if line.startswith("hang: ")]
    assert "state T" in hang and "killed it" in hang, hang  # the stopped rank is named
    [stack_file] = list((tmp_path / "runs" / "hung" / "hangs").glob("hang-*.txt"))
    stacks = stack_file.read_text()
    sections = stacks.split("=== rank ")[1:]
    assert [s.split()[0] for s in sections] == ["0", "1"]
    assert all("most recent call first" in s and "worker.py" in s for s in sections), stacks  # Python stacks of each rank
    artifacts = MlflowClient(mlflow_server).list_artifacts(outcome.run_id, "hangs")
    assert [a.path for a in artifacts] == [f"hangs/{stack_file.name}"]
    assert steps(mlflow_server, outcome.run_id) == list(range(1, MAX_STEPS + 1))  # each step exactly once
    ours, theirs = _weights(Path(outcome.export_uri)), _weights(Path(reference.export_uri))
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    restarted = next(t for t, line in lines if t > caught_at and "tok/s" in line)  # the first step after it
    figures = {"detected_s": caught_at - stopped["at"], "to_next_step_s": restarted - stopped["at"]}
    print(f"hang figures: {figures}")
    (tmp_path / "hang_figures.json").write_text(json.dumps(figures))


def test_a_rank_slowed_down_is_named_as_a_straggler(ray_cluster, tiny_corpus, tmp_path) -> None:
    """One worker process is held (SIGSTOP) for 7 ms in every 8, as a machine's other load would:
    it computes at an eighth of its speed, and the other rank waits for it in the collectives. The
    cycle is shorter than a tiny step (~8 ms): with a 40 ms one, a step was either stopped whole
    or not at all, and a stop that fell in the collective's wait slowed the other rank's own time."""
    lines: list[str] = []
    slowing = threading.Event()
    done = threading.Event()
    workers = TrainWorkers()
    slowed_since: list[float] = []

    def slow_down_one_worker() -> None:
        pid = workers.first()
        slowed_since.append(time.time())
        slowing.set()
        try:
            while not done.is_set():
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.007)
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.001)
        except ProcessLookupError:  # the run ended
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    job = tiny_job(tiny_corpus, tmp_path, "slow", address=ray_cluster, extra=(
        "train.max_steps=60", "train.validate_every=0", "train.checkpoint_every_steps=100", "train.hang_timeout_s=60"))
    slower = when(lambda: any("tok/s" in line for line in lines), slow_down_one_worker)  # once training runs
    try:
        outcome = train(job, log=lines.append)
    finally:
        done.set()
        slower.join(timeout=10)
    assert slowing.is_set()
    # The steps logged once the slowing runs (by the clock: the console that starts it lags tiny
    # steps by a dozen or more on a loaded machine), averaged as the straggler watch averages them.
    def since_slowed(key: str) -> dict[int, float]:
        history = MlflowClient(outcome.tracking_uri).get_metric_history(outcome.run_id, key)
        return {m.step: m.value for m in history if m.timestamp > 1000 * (slowed_since[0] + 1.0)}

    # Each rank's own figure per step, from the run's per-rank table; the steps where both ranks had
    # data (a rank whose share of the epoch has run out waits with none, and the metrics then name
    # the other as the slowest, alone).
    client, steps = MlflowClient(outcome.tracking_uri), set(since_slowed("train/own_ms_per_ktok/max"))
    own: dict[int, dict[int, float]] = collections.defaultdict(dict)
    for table in client.list_artifacts(outcome.run_id, "ranks"):
        local = Path(client.download_artifacts(outcome.run_id, table.path, str(tmp_path)))
        for row in local.read_text().splitlines()[1:]:
            step, rank, _, figure, value = row.split(",")
            if figure == "own_ms_per_ktok" and int(step) in steps:
                own[int(step)][int(rank)] = float(value)
    both = [ranks for ranks in own.values() if len(ranks) == 2]
    assert len(both) >= 10, own
    ratio = statistics.mean(max(ranks.values()) / min(ranks.values()) for ranks in both)
    assert ratio > 1.5, ratio  # one rank's own time grew
    [(slowed, _)] = collections.Counter(max(ranks, key=ranks.get) for ranks in both).most_common(1)
    # ... and it is named. (Tiny steps on 2 shared cores are noisy: the other rank may be named
    # too, for a moment.)
    named = [line for line in lines if f"straggler: rank {slowed} " in line]
    assert named, "\n".join(lines)


def test_stopping_the_driver_and_rerunning_resumes(ray_cluster, tiny_corpus, tmp_path) -> None:
    """The driver is SIGKILLed once checkpoint 10 is registered, its BLEU validation perhaps still
    running; the rerun continues the run, and the export averages the best checkpoints by BLEU."""
    best = ("train.bleu_every=10", "train.average=best", "train.average_checkpoints=2")
    command = [sys.executable, "-m", "jobs.cli", "train",
               *tiny_overrides(tiny_corpus, tmp_path, "restarted", address=ray_cluster), *best]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    watcher = when_checkpoint_exists(tmp_path / "runs" / "restarted", 10, lambda: os.killpg(first.pid, signal.SIGKILL))
    first.wait(timeout=600)
    watcher.join(timeout=5)
    assert first.returncode == -signal.SIGKILL
    time.sleep(5)  # let Ray reap the dead driver's workers
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    log = (tmp_path / "runs" / "restarted" / "aiayn.log").read_text()
    for shown in (second.stdout + second.stderr, log):  # aiayn's lines alone, as a terminal shows them
        assert "\r" not in shown and "(raylet)" not in shown and "Downloading artifacts" not in shown
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = runs_named(tracking, "restarted")
    assert len(runs) == 1 and int(runs[0].data.tags["resumed_from_step"]) >= 10
    assert steps(tracking, runs[0].info.run_id) == list(range(1, MAX_STEPS + 1))
    bleu = {m.step: m.value for m in MlflowClient(tracking).get_metric_history(runs[0].info.run_id, "valid/bleu")}
    assert steps(tracking, runs[0].info.run_id, "valid/bleu") == [10, 20, 30]  # each once, across the kill
    run_dir = tmp_path / "runs" / "restarted"
    kept = [Path(uri).name for uri in ckpt.list_checkpoints(run_dir) if ckpt.is_complete(uri)]
    assert kept == [ckpt.checkpoint_dir_name(step) for step in (10, 20, 30)]  # the unscored ones went first
    averaged = json.loads((run_dir / "export" / INFO).read_text())["averaged_checkpoints"]
    by_name = {ckpt.checkpoint_dir_name(step): value for step, value in bleu.items()}
    assert len(averaged) == 2 and sorted(by_name[name] for name in averaged) == sorted(bleu.values())[1:], (averaged, bleu)


def test_the_export_averages_the_checkpoints_retention_keeps(reference_run) -> None:
    signer = ckpt.Signer.of_account()
    root, _ = reference_run
    run_dir = root / "runs" / "reference"
    names = [Path(uri).name for uri in ckpt.list_checkpoints(run_dir)]
    assert names == [ckpt.checkpoint_dir_name(step) for step in (20, 25, 30)]
    last = TrainConfig(max_steps=MAX_STEPS, keep_checkpoints=3, average_checkpoints=2)
    assert [Path(uri).name for uri in ckpt.to_average(run_dir, last, {}, signer)] == names[1:]
    best = dataclasses.replace(last, average="best", bleu_every=5)
    scores = {names[0]: 9.0, names[1]: 1.0, names[2]: 4.0}
    assert [Path(uri).name for uri in ckpt.to_average(run_dir, best, scores, signer)] == [names[0], names[2]]  # oldest first
    assert [Path(uri).name for uri in ckpt.to_average(run_dir, best, {names[1]: 2.0}, signer)] == [names[1]]
    assert [Path(uri).name for uri in ckpt.to_average(run_dir, best, {}, signer)] == [names[2]]  # none scored: the newest


def test_a_second_driver_of_a_running_run_is_refused_and_the_first_is_unharmed(
        ray_cluster, mlflow_server, tiny_corpus, tmp_path) -> None:
    command = [sys.executable, "-m", "jobs.cli", "train",
               *tiny_overrides(tiny_corpus, tmp_path, "twice", address=ray_cluster, tracking=mlflow_server)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        running = threading.Event()
        when_checkpoint_exists(tmp_path / "runs" / "twice", 5, running.set)
        assert running.wait(timeout=600)
        started = time.monotonic()
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert time.monotonic() - started < 30
        [line] = [line for line in second.stderr.splitlines() if line.strip()]
        assert "run twice is being trained by another driver" in line and f"pid {first.pid}," in line, line
        assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    [run] = runs_named(mlflow_server, "twice")
    assert steps(mlflow_server, run.info.run_id) == list(range(1, MAX_STEPS + 1))


def test_a_driver_stopped_past_its_lease_is_replaced_and_writes_nothing_more(
        reference_run, ray_cluster, mlflow_server, tiny_corpus, tmp_path) -> None:
    _, reference = reference_run
    command = [sys.executable, "-m", "jobs.cli", "train",
               *tiny_overrides(tiny_corpus, tmp_path, "taken-over", address=ray_cluster, tracking=mlflow_server),
               "cluster.lease_ttl_s=6", EMA]
    run_dir = tmp_path / "runs" / "taken-over"
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stopped = threading.Event()
        when_checkpoint_exists(run_dir, 10, lambda: (os.killpg(first.pid, signal.SIGSTOP), stopped.set()))
        assert stopped.wait(timeout=600)
        time.sleep(8)  # past its lease: nobody renews it
        second = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert second.returncode == 0, second.stderr[-3000:]
        final = {d.name: ckpt.read_job_state(str(d)).launch_id for d in run_dir.glob("checkpoint_step*")}
        os.killpg(first.pid, signal.SIGCONT)
        output, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == 1 and "lost its lease" in output, output[-3000:]
    after = {d.name: ckpt.read_job_state(str(d)).launch_id for d in run_dir.glob("checkpoint_step*")}
    assert after == final  # the first driver, resumed, wrote no checkpoint and removed none
    assert not (run_dir / "export.json").exists() and (run_dir / "export" / "export.json").is_file()
    [run] = runs_named(mlflow_server, "taken-over")
    assert steps(mlflow_server, run.info.run_id) == list(range(1, MAX_STEPS + 1))  # each step once, no writes by the first
    ours, theirs = _weights(run_dir / "export"), _weights(Path(reference.export_uri))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_an_interrupted_checkpoint_is_never_loaded(reference_run, tmp_path) -> None:
    root, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(root / "runs" / "reference", run_dir)
    last = newest_complete(run_dir)
    assert last is not None and Path(last).name == ckpt.checkpoint_dir_name(MAX_STEPS)
    broken = run_dir / ckpt.checkpoint_dir_name(MAX_STEPS + 5)
    shutil.copytree(last, broken)
    optimizer_shard = next(broken.rglob("zero_pp_rank_1_*optim_states.pt"))
    optimizer_shard.write_bytes(optimizer_shard.read_bytes()[:100])  # the write was cut short
    assert not ckpt.is_complete(broken)
    assert newest_complete(run_dir) == last
    (broken / "rank_00001.complete").unlink()  # or the rank never finished at all
    assert not ckpt.is_complete(broken)
    with pytest.raises(InputError, match="not a complete, unchanged aiayn checkpoint"):
        train(tiny_job({"train": "", "valid": "", "test": "", "root": tmp_path}, tmp_path, "x",
                       extra=("data.source.format=multi30k",)), resume_from=str(broken))


def test_a_changed_or_foreign_checkpoint_file_is_refused_before_loading(reference_run, tmp_path) -> None:
    root, _ = reference_run
    source = newest_complete(root / "runs" / "reference")
    changed = tmp_path / "changed"
    shutil.copytree(source, changed)
    shard = next(changed.rglob("zero_pp_rank_1_*optim_states.pt"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ckpt.is_complete(changed)  # sizes alone cannot tell
    with pytest.raises(ckpt.CheckpointError, match="has changed"):
        ckpt.verify(str(changed), ckpt.Signer.of_account())
    foreign = tmp_path / "foreign"
    shutil.copytree(source, foreign)
    (foreign / "deepspeed" / "state" / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"not ours")
    with pytest.raises(ckpt.CheckpointError, match="not written by aiayn"):
        ckpt.verify(str(foreign), ckpt.Signer.of_account())
    started = time.monotonic()
    with pytest.raises(InputError, match="has changed"):
        train(tiny_job({"train": "", "valid": "", "test": "", "root": tmp_path}, tmp_path, "x",
                       extra=("data.source.format=multi30k",)), resume_from=str(changed))
    assert time.monotonic() - started < 60  # refused before any cluster resource is taken


def test_resuming_at_another_world_size(reference_run, ray_cluster, tiny_corpus, tmp_path) -> None:
    """A 2-worker ZeRO-2 checkpoint continues on 1 worker: DeepSpeed's universal format for the
    weights and optimizer, the data the two ranks had left dealt to the one."""
    root, reference = reference_run
    checkpoint = tmp_path / "from"
    shutil.copytree(root / "runs" / "reference" / ckpt.checkpoint_dir_name(20), checkpoint)
    # What another account could plant where the conversion used to go (a path derived from the
    # checkpoint's): never loaded, never removed.
    planted = Path(tempfile.gettempdir()) / f"aiayn-universal-{hashlib.sha256(str(checkpoint).encode()).hexdigest()[:16]}"
    (planted / ckpt.DEEPSPEED_TAG).mkdir(parents=True)
    (planted / ckpt.DEEPSPEED_TAG / "mp_rank_00_model_states.pt").write_bytes(b"planted")
    job = tiny_job(tiny_corpus, tmp_path, "resized", address=ray_cluster,
                   extra=("cluster.num_workers=1", "train.validate_every=0"))
    try:
        outcome = train(job, resume_from=str(checkpoint), log=_quiet)
        assert (planted / ckpt.DEEPSPEED_TAG / "mp_rank_00_model_states.pt").read_bytes() == b"planted"
    finally:
        shutil.rmtree(planted)
    assert sorted(p.name for p in checkpoint.iterdir() if p.is_dir()) == [ckpt.DEEPSPEED_DIR]  # converted elsewhere
    assert not list(Path(tempfile.gettempdir()).glob("aiayn-universal-*"))  # the private copy is gone
    [run] = runs_named(outcome.tracking_uri, "resized")
    assert int(run.data.tags["resumed_from_step"]) == 20 and run.data.tags["world_size"] == "1"
    assert steps(outcome.tracking_uri, outcome.run_id) == list(range(21, MAX_STEPS + 1))
    assert ckpt.read_job_state(newest_complete(tmp_path / "runs" / "resized")).world_size == 1
    client = MlflowClient(outcome.tracking_uri)

    def first(run_id: str, key: str, step: int) -> float:
        return next(m.value for m in client.get_metric_history(run_id, key) if m.step == step)

    ref_tracking = MlflowClient(reference.tracking_uri)
    ref_loss = {m.step: m.value for m in ref_tracking.get_metric_history(reference.run_id, "train/loss")}
    ref_lr = {m.step: m.value for m in ref_tracking.get_metric_history(reference.run_id, "train/lr")}
    assert first(outcome.run_id, "train/lr", 21) == pytest.approx(ref_lr[21], rel=1e-9)  # the schedule continued
    # The weights continued too: the loss is where the 2-worker run had it, far below a fresh model's.
    resumed_loss = first(outcome.run_id, "train/loss", 21)
    assert abs(resumed_loss - ref_loss[21]) < 0.25 * (ref_loss[1] - ref_loss[21])


@pytest.mark.parametrize("override, key", [
    ("stream.max_tokens=280", "stream.max_tokens"),
    ("train.zero_stage=3", "train.zero_stage"),
    ("model.d_ff=96", "model.d_ff"),
])
def test_an_incompatible_resume_is_refused_in_seconds(reference_run, ray_cluster, tiny_corpus, tmp_path,
                                                      override: str, key: str) -> None:
    """The driver compares the checkpoint's config with the new one before any worker starts."""
    root, _ = reference_run
    shutil.copytree(root / "runs" / "reference", tmp_path / "runs" / "reference")
    command = [sys.executable, "-m", "jobs.cli", "train",
               *tiny_overrides(tiny_corpus, tmp_path, "reference", address=ray_cluster), override]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"aiayn train: error: {key}:"), done.stderr
    assert time.monotonic() - started < 15
