"""`aiayn tune` on the real test cluster: 4 tiny trials over optim.lr with ASHA, 2 at a time, each
a Ray Train run under ZeRO with its own checkpoints and MLflow child run; then the same sweep with
its driver SIGKILLed mid-sweep and run again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.jobs.helpers import tiny_overrides, when

ROOT = Path(__file__).resolve().parents[2]
RATES = (0.003, 0.006, 0.00001, 0.000003)  # in the grid's order: the two that learn run first
# Tiny steps take ~0.1 s and a rung's decision ~1 s to come back: a stopped trial trains on ~10
# steps, and the last step lies far enough beyond that for a trial that is not stopped to show.
STEPS = 60
pytestmark = pytest.mark.slow


def _command(name: str, tiny_corpus, root: Path, address: str, *, default_store: bool = False) -> list[str]:
    """`default_store`: no tracking.uri, so the sweep's and its trials' runs go to ./mlruns."""
    dropped = ("name=", "train.max_steps=", "train.validate_every=", "cluster.num_workers=",
               *(("tracking.uri=",) if default_store else ()))
    overrides = [o for o in tiny_overrides(tiny_corpus, root, name, address=address) if not o.startswith(dropped)]
    grid = ", ".join(str(rate) for rate in RATES)
    return [sys.executable, "-m", "jobs.cli", "tune", "--name", name, "--search", f"optim.lr=grid({grid})",
            "--trials", "1", "--concurrent", "2", *overrides, "cluster.num_workers=1", f"train.max_steps={STEPS}",
            "train.validate_every=5", "train.checkpoint_every_steps=5", "train.keep_checkpoints=2",
            "tracking.registered_model=swept"]


def _children(tracking_uri: str, parent: str) -> dict[float, object]:
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return {float(run.data.params["optim.lr"]): run for run in runs}


def _parent(tracking_uri: str, name: str):
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string=f"tags.`aiayn.sweep` = '{name}'")
    return run


def _steps(tracking_uri: str, run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss"))


def _weights(export: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(export) / "model.safetensors"))


@pytest.fixture(scope="module")
def sweep(ray_cluster, tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    result = subprocess.run(_command("lr", tiny_corpus, root, ray_cluster), capture_output=True, text=True,
                            timeout=1500, cwd=ROOT)
    (root / "console.txt").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return root, result.stdout, f"sqlite:///{root / 'mlflow.db'}"


def test_four_trials_two_at_a_time_the_weak_stopped_early_one_parent(sweep, tmp_path) -> None:
    root, console, tracking = sweep
    parent = _parent(tracking, "lr")
    children = _children(tracking, parent.info.run_id)
    assert sorted(children) == sorted(RATES)  # 4 child runs, each a normal aiayn run
    stopped = {rate for rate, run in children.items() if "aiayn.stopped_early" in run.data.tags}
    # Two at a time, in the grid's order: the weak two reach step 5 after both good ones have, and
    # are stopped there (of the good two, the one that reaches a rung second may be, too).
    assert {0.00001, 0.000003} <= stopped and len(stopped) < 4, console
    for rate, run in children.items():
        steps = _steps(tracking, run.info.run_id)
        assert steps == sorted(set(steps)) and steps[0] == 1  # every step once
        assert run.info.status == ("KILLED" if rate in stopped else "FINISHED")
        exported = (root / "runs" / run.data.tags["aiayn.run_name"] / "export").is_dir()
        if rate in stopped:  # its training ended with the trial: not run on beside the trials after it
            assert steps[-1] < STEPS and not exported, (rate, steps)
        else:
            assert steps[-1] == STEPS and exported, (rate, steps)
    assert parent.info.status == "FINISHED"
    assert console.count("started: optim.lr=") == 4 and "stopped early by asha at step" in console
    table = MlflowClient(tracking).download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))
    rows = Path(table).read_text().splitlines()
    assert rows[0].split(",")[:3] == ["trial", "optim.lr", "valid/loss"] and len(rows) == 5
    best = children[float(parent.data.tags["best.optim.lr"])]
    assert parent.data.tags["best_run_id"] == best.info.run_id and float(parent.data.tags["best.optim.lr"]) in (0.003, 0.006)
    assert MlflowClient(tracking).get_model_version("swept", "1").run_id == best.info.run_id
    export = root / "runs" / best.data.tags["aiayn.run_name"] / "export"
    translated = subprocess.run([sys.executable, "-m", "jobs.cli", "translate", "--model", str(export), "--beam", "2"],
                                input="a man runs in the park\nthe dog\n", capture_output=True, text=True, timeout=300,
                                cwd=ROOT)
    assert translated.returncode == 0 and len(translated.stdout.splitlines()) == 2, translated.stderr[-2000:]


def test_a_sweep_whose_driver_was_killed_resumes_with_the_same_trials(sweep, ray_cluster, tiny_corpus, tmp_path) -> None:
    reference_root, _, reference_tracking = sweep
    reference = _children(reference_tracking, _parent(reference_tracking, "lr").info.run_id)
    # Run from the user's directory with MLflow's default store there (./mlruns): the trials, which
    # work in directories of Tune's, must track into it too
    command = _command("lr", tiny_corpus, tmp_path, ray_cluster, default_store=True)
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                             start_new_session=True, env=environment)
    killed = []
    runs = tmp_path / "runs"
    killer = when(lambda: any(runs.glob("lr-*/checkpoint_step00000010")),
                  lambda: (os.killpg(first.pid, signal.SIGKILL), killed.append(True)))
    first.wait(timeout=1500)
    killer.join(timeout=5)
    assert killed, "the sweep ended before a trial reached its 10th step"
    again = subprocess.run(command, capture_output=True, text=True, timeout=1500, cwd=tmp_path, env=environment)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resuming: finished trials are kept" in again.stdout
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    children = _children(tracking, _parent(tracking, "lr").info.run_id)  # one parent across both drivers
    assert sorted(children) == sorted(RATES)
    compared = 0
    for rate, run in children.items():
        steps = _steps(tracking, run.info.run_id)
        assert steps == sorted(set(steps)), (rate, steps)  # no step logged twice
        finished = "aiayn.stopped_early" not in run.data.tags
        if finished and "aiayn.stopped_early" not in reference[rate].data.tags:
            ours = _weights(str(runs / run.data.tags["aiayn.run_name"] / "export"))
            theirs = _weights(str(reference_root / "runs" / reference[rate].data.tags["aiayn.run_name"] / "export"))
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), rate
            compared += 1
    assert compared >= 1  # a trial finished in both sweeps, its export the same bit for bit
