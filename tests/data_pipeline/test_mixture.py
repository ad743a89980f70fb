"""Several corpora mixed by weight: prepared for real into one dataset, then streamed across a
resume and two resizes: each pair is read as often as its corpus's weight says, as the single
corpus stream reads each example once."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.config import CorpusConfig, PrepareConfig, SourceConfig, StreamConfig, TokenizerConfig
from data_pipeline.errors import InputError
from data_pipeline.manifest import load_manifest
from data_pipeline.prepare import plan_prepare, run_prepare
from data_pipeline.stream import ShardStream, StreamPosition, redistribute
from data_pipeline.tokenizer import load_tokenizer
from jobs.run.config import ConfigError, load_job_config
from tests.data_pipeline.synthetic import WORDS

PAIRS = {"news": 300, "europarl": 200, "crawl": 250}
WEIGHTS = {"news": 1.0, "europarl": 2.0, "crawl": 0.5}
CONFIG = StreamConfig(max_tokens=400, window_rows=128, unit_rows=32, seed=3, prefetch_windows=1)


def _write_corpus(directory: Path, name: str, rows: int) -> str:
    """Pairs whose English side begins `<name> <line>`: every pair of every corpus is unique."""
    rng = random.Random(name)
    en, de = [], []
    for line in range(rows):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 8))]
        en.append(f"{name} {line} " + " ".join(words))
        de.append(" ".join(reversed(words)).upper())
    (directory / f"{name}.en").write_text("\n".join(en) + "\n")
    (directory / f"{name}.de").write_text("\n".join(de) + "\n")
    return str(directory / name)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    corpora = tuple(CorpusConfig(name=name, format="text", path=_write_corpus(root, name, rows), weight=WEIGHTS[name])
                    for name, rows in PAIRS.items())
    config = PrepareConfig(source=SourceConfig(format="text", corpora=corpora), output_dir=str(root / "data"),
                           tokenizer=TokenizerConfig(vocab_size=200), shard_rows=300)
    manifest = run_prepare(plan_prepare(config))
    return manifest, load_manifest(config.dataset_uri)


def _pairs_read(manifest, batches) -> list[tuple[str, int]]:
    """(corpus, line) of every example in `batches`, read back from the decoded source side."""
    processor = load_tokenizer(manifest.tokenizer_uri)
    corpora = manifest.corpora("train")
    read = []
    for batch in batches:
        for row, corpus in zip(batch.src.tolist(), batch.corpus.tolist()):
            name, line = processor.decode([i for i in row if i > 3]).split()[:2]
            assert corpora[corpus] == name  # the batch says which corpus each row is of
            read.append((name, int(line)))
    return read


def _consume(stream: ShardStream, batches: int | None) -> list:
    return list(itertools.islice(stream.epoch_batches(), batches))


def test_each_pair_is_read_as_often_as_its_weight_across_a_resume_and_resizes(mixture) -> None:
    written, manifest = mixture
    corpora = written["cleaning"]["train"]["corpora"]
    assert {name: c["rows"] for name, c in corpora.items()} == {"news": 300, "europarl": 400, "crawl": 125}
    shares = written["splits"]["train"]["corpora"]
    assert [(s["name"], s["rows"]) for s in shares] == [("news", 300), ("europarl", 400), ("crawl", 125)]
    assert shares[1]["row_share"] == pytest.approx(400 / 825, abs=1e-4)
    assert sum(s["token_share"] for s in shares) == pytest.approx(1.0, abs=1e-3)

    # An epoch on 2 ranks, stopped (a checkpoint), resumed on 3, stopped again, finished on 2.
    epoch, batches, positions = 1, [], []
    for rank, stop in enumerate((4, 9)):
        stream = ShardStream(manifest, "train", CONFIG, rank=rank, world_size=2, position=StreamPosition(epoch))
        batches += _consume(stream, stop)
        positions.append(StreamPosition.from_dict(json.loads(json.dumps(stream.position.to_dict()))))
    middle = []
    for rank, position in enumerate(redistribute(manifest, "train", CONFIG, positions, epoch, 3)):
        stream = ShardStream(manifest, "train", CONFIG, rank=rank, world_size=3, position=position)
        batches += _consume(stream, 3)
        middle.append(stream.position)
    for rank, position in enumerate(redistribute(manifest, "train", CONFIG, middle, epoch, 2)):
        stream = ShardStream(manifest, "train", CONFIG, rank=rank, world_size=2, position=position)
        batches += _consume(stream, None)
    counts = Counter(_pairs_read(manifest, batches))

    assert all(counts[("news", line)] == 1 for line in range(300))
    assert all(counts[("europarl", line)] == 2 for line in range(200))
    crawl = [counts[("crawl", line)] for line in range(250)]
    assert sorted(set(crawl)) == [0, 1] and sum(crawl) == 125  # half of them, each once
    assert sum(counts.values()) == 825


def test_the_fraction_of_a_corpus_is_the_same_choice_each_time(mixture, tmp_path) -> None:
    """The seeded choice is part of the dataset: preparing again picks the same pairs."""
    written, manifest = mixture
    again = run_prepare(plan_prepare(PrepareConfig(**{
        **{key: getattr(PrepareConfig(), key) for key in ("cleaning", "encode_actors", "encode_batch_rows", "seed")},
        "source": SourceConfig(format="text", corpora=tuple(
            CorpusConfig(**c) for c in written["source"]["corpora"])),
        "tokenizer": TokenizerConfig(vocab_size=200), "shard_rows": 300, "output_dir": str(tmp_path)})))
    assert again["fingerprint"] == written["fingerprint"]
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in written["splits"]["train"]["shards"]]


@pytest.mark.parametrize(("override", "message"), [
    ("data.source.corpora=[{name: a, path: x, weight: 0}]", r"corpora\[0\].weight=0.0: give an upsampling factor"),
    ("data.source.corpora=[{name: a, path: x}, {name: a, path: y}]", "names must differ"),
    ("data.source.corpora=[{name: a, path: x, colour: red}]", r"corpora\[0\].colour: unknown key"),
    ("data.source.corpora=[{name: ../a, path: x}]", r"corpora\[0\].name='../a'"),
])
def test_a_bad_corpus_is_one_line_naming_its_key(override: str, message: str) -> None:
    with pytest.raises((ConfigError, InputError), match=message):
        load_job_config(None, ["data.source.format=text", override])


def test_the_run_page_names_the_dataset_and_each_corpus_with_its_share(mixture, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from jobs.report.tracking import dataset_inputs, find_or_create_run

    written, manifest = mixture
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = find_or_create_run(uri, "exp", "mixed", {}, {}, dataset_inputs(manifest))
    inputs = {i.dataset.name: (i.dataset, {t.key: t.value for t in i.tags})
              for i in MlflowClient(uri).get_run(run_id).inputs.dataset_inputs}
    assert set(inputs) == {written["name"], "news", "europarl", "crawl"}
    dataset, tags = inputs[written["name"]]
    assert tags["mlflow.data.context"] == "training" and tags["rows"] == "825"
    assert json.loads(dataset.source)["uri"] == manifest.uri
    _, europarl = inputs["europarl"]
    assert europarl["weight"] == "2.0" and europarl["rows"] == "400"
    assert float(europarl["row_share"]) == pytest.approx(400 / 825, abs=1e-4)
    assert json.loads(inputs["crawl"][0].source)["uri"].endswith("/crawl.en")
