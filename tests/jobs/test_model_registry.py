"""The export as an MLflow model: logged and registered with a real MLflow store, loaded back from
another directory with `mlflow.pyfunc.load_model("models:/...")`, it translates as `aiayn
translate` does; and `models:/` URIs lead aiayn's own commands to the same export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from cluster.services import free_port
from jobs.inference.evaluation import Scores, corpus_scores
from jobs.inference.export import WEIGHTS, local_export
from jobs.inference.model_registry import log_translation_model
from tests.jobs.tiny_model import pairs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def registered(trained_export: Path, tmp_path: Path, monkeypatch) -> tuple[str, str, Scores]:
    """(tracking URI, model URI, the scores tagged on it): version 1 of `tiny-mt` in a new store."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) goes here
    run = MlflowClient(tracking).create_run(MlflowClient(tracking).create_experiment("e"))
    sentences = [s for s, _ in pairs(20, seed=7)]
    scores = corpus_scores(sentences, sentences)
    uri = log_translation_model(tracking, run.info.run_id, trained_export, scores, "tiny-mt")
    return tracking, uri, scores


def test_a_rerun_of_the_runs_end_logs_and_registers_nothing_twice(registered, trained_export) -> None:
    tracking, uri, scores = registered
    client = MlflowClient(tracking)
    run_id = client.get_model_version("tiny-mt", "1").run_id
    assert log_translation_model(tracking, run_id, trained_export, scores, "tiny-mt") == uri
    assert [str(v.version) for v in client.search_model_versions("name = 'tiny-mt'")] == ["1"]
    experiment = client.get_run(run_id).info.experiment_id
    assert len(client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")) == 1
    # registered under a second name later: the same logged model
    assert log_translation_model(tracking, run_id, trained_export, scores, "other-mt") == "models:/other-mt/1"
    assert client.get_model_version("other-mt", "1").source == client.get_model_version("tiny-mt", "1").source


def _aiayn_translate(export: str, lines: list[str], env: dict) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "translate", "--model", export, "--engine", "torch",
                           "--beam", "4", "--alpha", "0.6"], input="\n".join(lines) + "\n", capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


def test_the_registered_model_translates_as_aiayn_translate_does(registered, trained_export, tmp_path,
                                                                 monkeypatch) -> None:
    import mlflow

    tracking, uri, scores = registered
    assert uri == "models:/tiny-mt/1"
    version = MlflowClient(tracking).get_model_version("tiny-mt", "1")
    assert float(version.tags["test/bleu"]) == pytest.approx(scores.bleu, abs=0.01)
    assert version.tags["chrf_signature"] == scores.chrf_signature and "nc:6" in version.tags["chrf_signature"]
    sources = [s for s, _ in pairs(30, seed=999)]
    expected = _aiayn_translate(str(trained_export), sources, dict(os.environ))
    right = [" ".join(reversed(s.split())).upper() for s in sources]
    assert sum(h == r for h, r in zip(expected, right)) >= 15  # translations, not an empty or broken model's output
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)  # nothing of the run's directory is at hand
    model = mlflow.pyfunc.load_model(uri)
    assert model.predict(sources) == expected
    assert model.predict(pd.DataFrame({"source": sources})) == expected
    # aiayn's own commands take the same URI, down to the export's weights
    assert _aiayn_translate(uri, sources, {**os.environ, "MLFLOW_TRACKING_URI": tracking}) == expected
    with local_export(uri) as directory:
        assert load_file(str(directory / WEIGHTS)).keys() == load_file(str(trained_export / WEIGHTS)).keys()
        assert all((load_file(str(directory / WEIGHTS))[k] == v).all()
                   for k, v in load_file(str(trained_export / WEIGHTS)).items())


def test_mlflow_models_serve_answers_with_the_translations(registered, tmp_path) -> None:
    """`mlflow models serve -m models:/...` (a user's venv on PATH, as when it is activated)
    answers a JSON request with the same translations as the loaded model."""
    import mlflow

    tracking, uri, _ = registered
    sources = [s for s, _ in pairs(8, seed=4242)]
    expected = mlflow.pyfunc.load_model(uri).predict(sources)
    right = [" ".join(reversed(s.split())).upper() for s in sources]
    assert sum(h == r for h, r in zip(expected, right)) >= 4  # a model that translates, so a wrong answer shows
    port, log = free_port(), tmp_path / "serve.log"
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PYTHONPATH": str(ROOT),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log.open("w") as sink:
        server = subprocess.Popen([str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                                   "-h", "127.0.0.1", "-p", str(port)],
                                  stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        answer = None
        deadline = time.monotonic() + 180
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                             data=json.dumps({"inputs": sources}).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = json.loads(response.read())
            except OSError:
                time.sleep(1)
        assert answer == {"predictions": expected}, log.read_text()[-3000:]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
