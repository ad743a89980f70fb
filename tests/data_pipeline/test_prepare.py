"""`prepare` end to end on a real (embedded) Ray: shards, manifest, idempotence, atomicity."""

from __future__ import annotations

import json
import os
import urllib.parse
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from data_pipeline import storage
from data_pipeline.config import PrepareConfig, SourceConfig, TokenizerConfig
from data_pipeline.manifest import check_tokenizer_matches, load_manifest
from data_pipeline.errors import InputError
from data_pipeline.prepare import plan_prepare, run_prepare
from data_pipeline.storage import sha256_of as file_sha256
from data_pipeline.storage import sha256_of
from tests.data_pipeline.synthetic import write_parallel_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    train = write_parallel_corpus(root, 1200, seed=1, prefix="train")
    with open(f"{train}.en", "a") as en, open(f"{train}.de", "a") as de:  # two droppable pairs
        en.write("a dog\n\n")
        de.write("A DOG\nEIN\n")
    valid = write_parallel_corpus(root, 50, seed=2, prefix="valid")
    return train, valid


def _config(corpus, out, **changes) -> PrepareConfig:
    train, valid = corpus
    fields = dict(
        source=SourceConfig(format="text", train=train, valid=valid),
        tokenizer=TokenizerConfig(vocab_size=60, sample_sentences=500),
        output_dir=str(out), shard_rows=500, encode_batch_rows=256,  # encode_actors: one per CPU, 2
    )
    fields.update(changes)
    return PrepareConfig(**fields)


def test_prepare_writes_shards_manifest_and_tokenizer(local_ray, corpus, tmp_path) -> None:
    config = _config(corpus, tmp_path / "data")
    manifest = run_prepare(plan_prepare(config))
    dataset = Path(load_manifest(str(tmp_path / "data" / config.dataset_name)).uri)  # the current version
    assert dataset.parent.name == "versions" and not (dataset / "_raw").exists()
    on_disk = json.loads((dataset / "manifest.json").read_text())
    assert on_disk == manifest
    train = manifest["splits"]["train"]
    assert manifest["cleaning"]["train"]["dropped"]["empty"] == 1
    assert manifest["cleaning"]["train"]["dropped"]["duplicate"] >= 1
    assert train["rows"] == manifest["cleaning"]["train"]["kept"]
    assert [s["rows"] for s in train["shards"]][:-1] == [500] * (len(train["shards"]) - 1)
    assert sum(s["rows"] for s in train["shards"]) == train["rows"]
    for shard in train["shards"]:
        assert file_sha256(str(dataset / shard["file"])) == shard["sha256"]
    assert manifest["inputs"][0]["files"][0]["sha256"] == file_sha256(corpus[0] + ".en")
    assert sum(train["length_histogram"]["src"].values()) == train["rows"]
    # tokens in the manifest agree with the shards, and ids are the fixed ones
    table = pq.read_table(dataset / train["shards"][0]["file"])
    assert set(table.column_names) == {"src_ids", "src_len", "tgt_ids", "tgt_len"}
    assert all(row[-1] == 3 for row in table.column("src_ids").to_pylist())
    processor = spm.SentencePieceProcessor(model_file=str(dataset / "tokenizer.model"))
    assert (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id()) == (0, 1, 2, 3)
    assert manifest["tokenizer"]["sha256"] == sha256_of(str(dataset / "tokenizer.model"))
    # valid keeps the input order and the raw text for BLEU references
    valid = pq.read_table(dataset / "valid" / "part-00000.parquet")
    assert valid.column("index").to_pylist() == list(range(50))
    assert valid.column("tgt_text").to_pylist()[0] == open(corpus[1] + ".de").readline().strip()


def test_a_split_of_one_batch_is_encoded_in_process_into_the_same_shards(local_ray, corpus, tmp_path) -> None:
    """train (1,200 pairs) is one batch of 32,768 (encoded here) or three shards of 500 written by
    Ray Data's actors, each reading its rows of the staged split in runs of 256-row groups cut at
    the shards' edges: the same shards, row for row."""
    shards = {}
    for batch_rows in (256, 32768):
        config = _config(corpus, tmp_path / str(batch_rows), encode_batch_rows=batch_rows)
        run_prepare(plan_prepare(config))
        manifest = load_manifest(str(tmp_path / str(batch_rows) / config.dataset_name))
        shards[batch_rows] = [pq.read_table(uri) for uri, _ in manifest.shard_uris("train")]
    assert [t.num_rows for t in shards[256]] == [t.num_rows for t in shards[32768]]
    assert len(shards[256]) == 3 and shards[256][0].num_rows == 500
    assert all(a.equals(b) for a, b in zip(shards[256], shards[32768]))


def test_repeated_prepare_is_a_no_op_and_changes_are_noticed(local_ray, corpus, tmp_path) -> None:
    config = _config(corpus, tmp_path / "data")
    run_prepare(plan_prepare(config))
    assert plan_prepare(config).up_to_date
    assert not plan_prepare(_config(corpus, tmp_path / "data", shard_rows=400)).up_to_date


def test_reprepare_swaps_versions_and_a_pinned_reader_keeps_its_own(local_ray, corpus, tmp_path) -> None:
    out = tmp_path / "data"
    first = _config(corpus, out)
    run_prepare(plan_prepare(first))
    pinned = load_manifest(str(out / first.dataset_name))
    changed = _config(corpus, out, tokenizer=TokenizerConfig(vocab_size=70, sample_sentences=500))
    run_prepare(plan_prepare(changed))
    current = load_manifest(str(out / first.dataset_name))
    assert current.uri != pinned.uri and current.vocab_size != pinned.vocab_size
    # a job that started on the first version still reads it whole, tokenizer and shards alike
    again = load_manifest(pinned.uri)
    assert again.data == pinned.data and Path(again.tokenizer_uri).is_file()
    assert all(Path(uri).is_file() for uri, _ in again.shard_uris("train"))


def test_interrupted_prepare_keeps_the_current_version(local_ray, corpus, tmp_path, monkeypatch) -> None:
    import data_pipeline.prepare as prepare_module

    out = tmp_path / "data"
    config = _config(corpus, out)
    run_prepare(plan_prepare(config))
    before = load_manifest(str(out / config.dataset_name))

    def fail(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption while describing shards")

    monkeypatch.setattr(prepare_module, "describe_split", fail)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(plan_prepare(_config(corpus, out, shard_rows=400)))
    assert load_manifest(str(out / config.dataset_name)) == before
    versions = out / config.dataset_name / "versions"
    assert [p.name for p in versions.iterdir()] == [Path(before.uri).name]  # the unfinished version is gone


def test_prepare_never_writes_into_a_directory_that_is_not_a_dataset(corpus, tmp_path) -> None:
    out = tmp_path / "data"
    config = _config(corpus, out)
    (out / config.dataset_name).mkdir(parents=True)
    (out / config.dataset_name / "my-notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="no prepared dataset"):
        plan_prepare(config)
    assert (out / config.dataset_name / "my-notes.txt").read_text() == "keep me"


def test_data_from_another_tokenizer_is_refused(local_ray, corpus, tmp_path) -> None:
    config = _config(corpus, tmp_path / "data")
    run_prepare(plan_prepare(config))
    manifest = load_manifest(str(tmp_path / "data" / config.dataset_name))
    with pytest.raises(InputError, match="encoded with tokenizer"):
        check_tokenizer_matches(manifest, "f" * 64, "the model")


def test_reusing_a_tokenizer_and_monolingual_data(local_ray, corpus, tmp_path) -> None:
    first = _config(corpus, tmp_path / "data")
    run_prepare(plan_prepare(first))
    model = load_manifest(str(tmp_path / "data" / first.dataset_name)).tokenizer_uri
    mono = _config(corpus, tmp_path / "data", name="mono",
                   source=SourceConfig(format="text", train=corpus[0], src_lang="en", tgt_lang=""),
                   tokenizer=TokenizerConfig(path=model))
    manifest = run_prepare(plan_prepare(mono))
    assert manifest["monolingual"] and manifest["tokenizer"]["sha256"] == sha256_of(model)
    table = pq.read_table(load_manifest(str(tmp_path / "data" / "mono")).shard_uris("train")[0][0])
    assert "tgt_ids" not in table.column_names


def test_a_corpus_inside_the_output_is_refused(corpus, tmp_path) -> None:
    out = tmp_path / "data"
    inside = out / "text-en-de" / "raw"
    prefix = write_parallel_corpus(inside, 20, prefix="train")
    with pytest.raises(InputError, match="lies inside the output"):
        plan_prepare(_config((prefix, corpus[1]), out))
    assert sorted(p.name for p in inside.iterdir()) == ["train.de", "train.en"]  # untouched


def test_credentials_in_a_store_uri_stay_out_of_the_manifest(local_ray, corpus, object_store, capsys) -> None:
    """PyArrow takes keys in a URI (s3://KEY:SECRET@bucket/..., percent-encoded); the manifest,
    which training logs to MLflow as an artifact and copies into exports, must not keep them."""
    secret, key = os.environ["AWS_SECRET_ACCESS_KEY"], urllib.parse.quote(os.environ["AWS_ACCESS_KEY_ID"], safe="")
    output = object_store.replace("s3://", f"s3://{key}:{secret}@") + f"/{uuid.uuid4().hex[:8]}/data"
    config = _config(corpus, output)
    manifest = run_prepare(plan_prepare(config))
    stored = storage.read_text(f"{load_manifest(config.dataset_uri).uri}/manifest.json")
    assert secret not in stored and secret not in json.dumps(manifest)
    assert "s3://***@bucket/" in stored  # redacted, not dropped: the manifest still says where
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err
