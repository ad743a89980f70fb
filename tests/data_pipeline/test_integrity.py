"""A corrupted or foreign shard is named in one line before it can train a model on garbage."""

from __future__ import annotations

import hashlib
import json

import pytest

from data_pipeline.config import StreamConfig
from data_pipeline.errors import InputError
from data_pipeline.manifest import load_manifest, verify_dataset
from data_pipeline.stream import ShardStream
from tests.data_pipeline.synthetic import write_token_dataset


@pytest.fixture
def dataset(tmp_path):
    directory = write_token_dataset(tmp_path / "data", rows=300, shard_rows=100)
    (directory / "tokenizer.model").write_bytes(b"a tokenizer")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = hashlib.sha256(b"a tokenizer").hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_a_flipped_byte_in_a_shard_is_named(dataset) -> None:
    verify_dataset(load_manifest(str(dataset)))  # intact: passes
    shard = dataset / "train" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match="part-00001.parquet: its sha256 differs"):
        verify_dataset(load_manifest(str(dataset)))


def test_ids_outside_the_vocabulary_are_named_with_their_shard(dataset) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 500  # the shards hold ids up to 999
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"part-00000.parquet: src_ids holds ids in \[\d+, \d+\] but the vocabulary has 500"):
        verify_dataset(load_manifest(str(dataset)))  # on the driver, before any worker
    stream = ShardStream(load_manifest(str(dataset)), "train", StreamConfig(max_tokens=400, unit_rows=50, window_rows=100))
    with pytest.raises(InputError, match=r"part-0000\d.parquet: src_ids holds ids in \[\d+, \d+\] but the vocabulary has 500"):
        next(stream.epoch_batches())
