"""The paper's WMT14 recipes against a small local corpus shaped like WMT's (three training corpora
mixed, newstest-like valid and test): `--dry-run` of each as written, then a few steps of each with
`tiny` overrides, trained and exported on the test cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from data_pipeline.manifest import load_manifest
from jobs.run.config import load_job_config
from jobs.train.driver import train
from tests.data_pipeline.synthetic import write_parallel_corpus

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("configs/wmt14_en_de_base.yaml", "configs/wmt14_en_de_big.yaml")
CORPORA = {"europarl": (300, 1), "commoncrawl": (250, 2), "news-commentary": (200, 3)}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wmt_shaped(tmp_path_factory) -> list[str]:
    """The overrides that point a WMT recipe at the local corpus."""
    root = tmp_path_factory.mktemp("wmt")
    corpora = ", ".join(f"{{name: {name}, path: {write_parallel_corpus(root, rows, seed, name)}}}"
                        for name, (rows, seed) in CORPORA.items())
    return ["data.source.format=text", "data.source.train=", "data.source.hf_config=",
            f"data.source.corpora=[{corpora}]",
            f"data.source.valid={write_parallel_corpus(root, 40, 4, 'newstest2013')}",
            f"data.source.test={write_parallel_corpus(root, 30, 5, 'newstest2014')}"]


def _dry_run(recipe: str, overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--config", recipe, "--dry-run", *overrides],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_passes_the_dry_run_and_writes_nothing(recipe, wmt_shaped, ray_cluster, tmp_path) -> None:
    places = [f"data.output_dir={tmp_path / 'data'}", f"cluster.storage_path={tmp_path / 'runs'}",
              f"cluster.address={ray_cluster}"]
    result = _dry_run(recipe, [*wmt_shaped, *places])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "not prepared yet; its inputs check out (750 training pairs before cleaning)" in out, out
    assert "the run asks 8 workers x 1 CPU + 1 GPU: does NOT fit now" in out, out  # the test cluster has no GPU
    assert "step: 28,672 padded tokens over 8 workers, each 1 micro-batch of up to 3,584 tokens" in out, out
    assert "ZeRO stage" in out and "bf16, compiled" in out, out
    assert "measured: nothing: the run trains on GPUs and this cluster has none" in out, out
    assert out.rstrip().endswith("dry run: nothing was trained or written")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no dataset, no run directory


def test_a_cpu_run_is_timed_on_one_worker(wmt_shaped, ray_cluster, tmp_path) -> None:
    tiny = ["model.preset=tiny", "data.tokenizer.vocab_size=64", "cluster.use_gpu=false", "cluster.num_workers=2",
            "train.precision=fp32", "stream.max_tokens=600", "train.tokens_per_step=2400", "train.max_steps=500",
            f"data.output_dir={tmp_path / 'data'}", f"cluster.storage_path={tmp_path / 'runs'}",
            f"cluster.address={ray_cluster}"]
    result = _dry_run(RECIPES[0], [*wmt_shaped, *tiny])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "each 2 micro-batches of up to 600 tokens a step (accumulation 2)" in out, out
    measured = next(line for line in out.splitlines() if line.startswith("measured: 3 steps on one worker (CPU"))
    step_s = float(measured.split(": ")[2].split(" s a step")[0])
    assert 0 < step_s < 60
    assert "for 500 steps at that rate" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_both_recipes_train_a_few_tiny_steps_from_the_mixed_corpora(wmt_shaped, ray_cluster, tmp_path) -> None:
    tiny = ["model.preset=tiny", "model.max_positions=64", "data.tokenizer.vocab_size=64",
            "data.tokenizer.sample_sentences=2000", f"data.output_dir={tmp_path / 'data'}",
            "stream.max_tokens=300", "train.tokens_per_step=600", "train.precision=fp32", "train.max_steps=4",
            "train.checkpoint_every_steps=2", "train.validate_every=2", "train.bleu_every=0", "train.beam_size=2",
            "cluster.use_gpu=false", "cluster.num_workers=2", f"cluster.storage_path={tmp_path / 'runs'}",
            f"cluster.address={ray_cluster}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    for recipe in RECIPES:
        job = load_job_config(str(ROOT / recipe), [*wmt_shaped, *tiny, f"name={Path(recipe).stem}"])
        outcome = train(job, log=lambda line: None)
        assert outcome.steps == 4 and outcome.test is not None
        assert Path(outcome.export_uri, "export.json").is_file()
    # The last run's loss and target tokens per corpus: the corpora's tokens add up to every token
    # trained on, and their NLLs, weighted by their tokens, to the window's NLL.
    client = MlflowClient(outcome.tracking_uri)
    history = {key: {m.step: m.value for m in client.get_metric_history(outcome.run_id, key)}
               for key in ["train/nll", "train/tokens_seen", *(f"train/corpus/{name}/{figure}" for name in CORPORA
                                                               for figure in ("nll", "tokens"))]}
    windows = sorted(history["train/nll"])
    tokens = {step: sum(history[f"train/corpus/{name}/tokens"][step] for name in CORPORA) for step in windows}
    assert sum(tokens.values()) == history["train/tokens_seen"][4]
    for step in windows:
        weighted = sum(history[f"train/corpus/{name}/nll"][step] * history[f"train/corpus/{name}/tokens"][step]
                       for name in CORPORA) / tokens[step]
        assert weighted == pytest.approx(history["train/nll"][step], rel=1e-5)
    manifest = load_manifest(str(tmp_path / "data" / "text-en-de"))  # one dataset served both recipes
    assert manifest.corpora("train") == tuple(CORPORA)
