"""Subword regularization in the stream (`stream.sampling_alpha`): each train example segmented
anew every epoch, seeded by (seed, epoch, example), so that exact resume and exactly-once hold."""

from __future__ import annotations

import itertools
import json

import pytest

from data_pipeline.config import StreamConfig
from data_pipeline.manifest import load_manifest
from data_pipeline.stream import ShardStream, StreamPosition, redistribute
from data_pipeline.tokenizer import EOS_ID, PAD_ID, load_tokenizer
from tests.data_pipeline.synthetic import text_example_id, write_text_dataset

ROWS = 600
SAMPLED = StreamConfig(max_tokens=400, window_rows=256, unit_rows=64, seed=3, sampling_alpha=0.3)
PLAIN = StreamConfig(max_tokens=400, window_rows=256, unit_rows=64, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    manifest = load_manifest(str(write_text_dataset(tmp_path_factory.mktemp("text"), ROWS, shard_rows=250)))
    return manifest, load_tokenizer(manifest.tokenizer_uri)


def _rows(batch, name: str) -> list[list[int]]:
    return [[i for i in row if i != PAD_ID] for row in getattr(batch, name).tolist()]


def _pieces(stream: ShardStream, processor, batches: int | None = None) -> dict[int, tuple]:
    """example id -> (source ids, target ids) of what the stream yields."""
    seen: dict[int, tuple] = {}
    for batch in itertools.islice(stream.epoch_batches(), batches):
        for src, tgt in zip(_rows(batch, "src"), _rows(batch, "tgt_out")):
            example = text_example_id(processor.decode(src[:-1]))
            assert example not in seen
            seen[example] = (tuple(src), tuple(tgt))
    return seen


def test_sampling_keeps_the_text_and_changes_the_pieces_each_epoch(dataset) -> None:
    manifest, processor = dataset
    plain = _pieces(ShardStream(manifest, "train", PLAIN), processor)
    epochs = [_pieces(ShardStream(manifest, "train", SAMPLED, position=StreamPosition(epoch)), processor)
              for epoch in (0, 0, 1)]
    assert set(plain) == set(epochs[0]) == set(epochs[2]) == set(range(ROWS))
    assert epochs[0] == epochs[1]  # the same (seed, epoch, example): the same pieces
    for example, (src, tgt) in epochs[2].items():  # another segmentation of the same text, ending in EOS
        assert processor.decode(list(src[:-1])) == processor.decode(list(plain[example][0][:-1]))
        assert processor.decode(list(tgt[:-1])) == processor.decode(list(plain[example][1][:-1]))
        assert src[-1] == tgt[-1] == EOS_ID
    assert sum(epochs[0][e] != plain[e] for e in range(ROWS)) > ROWS // 2
    assert sum(epochs[2][e] != epochs[0][e] for e in range(ROWS)) > ROWS // 2
    # without sampling, every epoch reads the segmentation prepare wrote
    assert _pieces(ShardStream(manifest, "train", PLAIN, position=StreamPosition(1)), processor) == plain


def test_an_examples_pieces_do_not_depend_on_the_rank_or_the_world_size(dataset) -> None:
    manifest, processor = dataset
    one = _pieces(ShardStream(manifest, "train", SAMPLED, position=StreamPosition(2)), processor)
    three: dict[int, tuple] = {}
    for rank in range(3):
        three.update(_pieces(ShardStream(manifest, "train", SAMPLED, rank=rank, world_size=3,
                                         position=StreamPosition(2)), processor))
    assert one == three and len(one) == ROWS


@pytest.mark.parametrize("stop_after", [1, 4])
def test_resume_with_sampling_is_exact(dataset, stop_after: int) -> None:
    manifest, _ = dataset
    uninterrupted = ShardStream(manifest, "train", SAMPLED, rank=1, world_size=2)
    reference = [b for _ in range(2) for b in uninterrupted.epoch_batches()]
    first = ShardStream(manifest, "train", SAMPLED, rank=1, world_size=2)
    consumed = list(itertools.islice(first.epoch_batches(), stop_after))
    saved = StreamPosition.from_dict(json.loads(json.dumps(first.position.to_dict())))
    resumed = ShardStream(manifest, "train", SAMPLED, rank=1, world_size=2, position=saved)
    combined = consumed + list(resumed.epoch_batches()) + list(resumed.epoch_batches())
    assert len(combined) == len(reference)
    for ours, theirs in zip(combined, reference):
        for name in ("src", "tgt_in", "tgt_out"):
            assert getattr(ours, name).numpy().tobytes() == getattr(theirs, name).numpy().tobytes()


def test_a_resize_mid_epoch_with_sampling_reads_every_example_once_with_its_own_pieces(dataset) -> None:
    manifest, processor = dataset
    whole = _pieces(ShardStream(manifest, "train", SAMPLED, position=StreamPosition(1)), processor)
    seen: dict[int, tuple] = {}
    positions = []
    for rank in range(2):
        stream = ShardStream(manifest, "train", SAMPLED, rank=rank, world_size=2, position=StreamPosition(1))
        part = _pieces(stream, processor, batches=2)
        assert not set(part) & set(seen)
        seen.update(part)
        positions.append(stream.position)
    for rank, position in enumerate(redistribute(manifest, "train", SAMPLED, positions, 1, 3)):
        part = _pieces(ShardStream(manifest, "train", SAMPLED, rank=rank, world_size=3, position=position), processor)
        assert not set(part) & set(seen)
        seen.update(part)
    assert seen == whole
