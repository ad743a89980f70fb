"""The worker stream: every example once per epoch, determinism, exact resume, token budgets."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from data_pipeline.config import StreamConfig
from data_pipeline.manifest import load_manifest
from data_pipeline.stream import ShardStream, StreamPosition, redistribute
from data_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID
from tests.data_pipeline.synthetic import example_id, write_token_dataset

ROWS = 2500
CONFIG = StreamConfig(max_tokens=600, window_rows=512, unit_rows=128, seed=7, prefetch_windows=1)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return load_manifest(str(write_token_dataset(tmp_path_factory.mktemp("tokens"), ROWS, shard_rows=700)))


def _ids(batch) -> list[int]:
    return [example_id(row) for row in batch.src.tolist()]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_example_exactly_once_per_epoch(manifest, world_size: int) -> None:
    for epoch in range(2):
        seen: list[int] = []
        for rank in range(world_size):
            stream = ShardStream(manifest, "train", CONFIG, rank=rank, world_size=world_size,
                                 position=StreamPosition(epoch=epoch))
            seen += [i for batch in stream.epoch_batches() for i in _ids(batch)]
        assert sorted(seen) == list(range(ROWS))


def test_order_is_deterministic_and_changes_with_epoch_and_rank(manifest) -> None:
    def order(epoch: int, rank: int, world: int) -> list[int]:
        stream = ShardStream(manifest, "train", CONFIG, rank=rank, world_size=world, position=StreamPosition(epoch))
        return [i for batch in stream.epoch_batches() for i in _ids(batch)]

    assert order(0, 0, 2) == order(0, 0, 2)
    assert order(0, 0, 2) != order(1, 0, 2)
    assert set(order(0, 0, 2)).isdisjoint(order(0, 1, 2))


def test_batches_respect_the_token_budget_and_shapes(manifest) -> None:
    stream = ShardStream(manifest, "train", CONFIG)
    for batch in stream.epoch_batches():
        rows = batch.src.shape[0]
        assert rows * max(batch.src.shape[1], batch.tgt_out.shape[1]) <= CONFIG.max_tokens
        assert (batch.tgt_in[:, 0] == BOS_ID).all()
        # tgt_in is tgt_out shifted right by one
        inside = batch.tgt_out[:, 1:] != PAD_ID
        torch.testing.assert_close(batch.tgt_in[:, 1:][inside], batch.tgt_out[:, :-1][inside])
        lengths = (batch.tgt_out != PAD_ID).sum(1)
        assert (batch.tgt_out[torch.arange(rows), lengths - 1] == EOS_ID).all()


def test_examples_longer_than_the_limit_are_dropped_and_counted(manifest) -> None:
    stream = ShardStream(manifest, "train", CONFIG, max_length=20)
    kept = sum(batch.src.shape[0] for batch in stream.epoch_batches())
    assert stream.stats.dropped_too_long > 0
    assert kept + stream.stats.dropped_too_long == ROWS
    tight = ShardStream(manifest, "train", StreamConfig(max_tokens=30, window_rows=512, unit_rows=128))
    assert sum(b.src.shape[0] for b in tight.epoch_batches()) + tight.stats.dropped_too_long == ROWS


@pytest.mark.parametrize("stop_after", [0, 1, 5, 17, 40])
def test_resume_gives_byte_identical_batches(manifest, stop_after: int) -> None:
    world, rank = 2, 1
    uninterrupted = ShardStream(manifest, "train", CONFIG, rank=rank, world_size=world)
    reference = [b for _ in range(2) for b in uninterrupted.epoch_batches()]  # two epochs

    first = ShardStream(manifest, "train", CONFIG, rank=rank, world_size=world)
    consumed = list(itertools.islice(first.epoch_batches(), stop_after))
    saved = json.dumps(first.position.to_dict())  # what a checkpoint stores
    resumed = ShardStream(manifest, "train", CONFIG, rank=rank, world_size=world,
                          position=StreamPosition.from_dict(json.loads(saved)))
    rest = list(resumed.epoch_batches()) + list(resumed.epoch_batches())
    combined = consumed + rest
    assert len(combined) == len(reference)
    for ours, theirs in zip(combined, reference):
        for name in ("src", "tgt_in", "tgt_out"):
            assert getattr(ours, name).numpy().tobytes() == getattr(theirs, name).numpy().tobytes()


def test_resume_at_an_epoch_boundary(manifest) -> None:
    stream = ShardStream(manifest, "train", CONFIG)
    list(stream.epoch_batches())
    assert stream.position == StreamPosition(epoch=1, window=0, batch=0)


def test_decoder_only_packing(tmp_path) -> None:
    manifest = load_manifest(str(write_token_dataset(tmp_path, 300, 100, monolingual=True)))
    config = StreamConfig(max_tokens=256, window_rows=256, unit_rows=64, packed_length=64)
    stream = ShardStream(manifest, "train", config)
    batches = list(stream.epoch_batches())
    predicted = sum(int((b.tgt_out != PAD_ID).sum()) for b in batches)
    total = manifest.data["splits"]["train"]["src_tokens"]
    windows = len(stream.work_items(StreamPosition())[0])
    assert predicted == total - windows  # each window's first token is the only one never predicted
    for batch in batches:
        assert batch.src is None and batch.tgt_in.shape[1] <= 64
        assert batch.tgt_in.shape[0] <= 256 // 64
        inside = batch.tgt_in[:, 1:] != PAD_ID
        torch.testing.assert_close(batch.tgt_in[:, 1:][inside], batch.tgt_out[:, :-1][inside])
    eos_inside = sum(int((b.tgt_in == EOS_ID).sum()) for b in batches)
    assert eos_inside >= 300 - windows - len(batches)  # documents are joined by their EOS


@pytest.mark.parametrize("position", [StreamPosition(3, 4, 5), StreamPosition(3, 1, 2, ((0, 7), (4, 0)), 2)])
def test_position_round_trips(position: StreamPosition) -> None:
    assert StreamPosition.from_dict(json.loads(json.dumps(position.to_dict()))) == position


def _consume(stream: ShardStream, batches: int) -> list[int]:
    """Ids of the first `batches` batches of the stream's epoch, leaving its position after them."""
    return [i for batch in itertools.islice(stream.epoch_batches(), batches) for i in _ids(batch)]


@pytest.mark.parametrize(("old_world", "new_world", "stops"),
                         [(2, 3, (3, 9)), (2, 1, (0, 11)), (3, 2, (5, 0, 30)), (1, 2, (7,))])
def test_resume_at_another_world_size_reads_every_example_once(manifest, old_world, new_world, stops) -> None:
    """Stop each old rank after its own number of batches (a rank past its last batch has finished
    the epoch), continue at another world size, then resize once more mid-epoch."""
    epoch, seen, positions = 1, [], []
    for rank, stop in enumerate(stops):
        stream = ShardStream(manifest, "train", CONFIG, rank=rank, world_size=old_world, position=StreamPosition(epoch))
        seen += _consume(stream, stop) if stop < 30 else [i for b in stream.epoch_batches() for i in _ids(b)]
        positions.append(stream.position)
    saved = [StreamPosition.from_dict(json.loads(json.dumps(p.to_dict()))) for p in positions]
    middle = []
    for rank, position in enumerate(redistribute(manifest, "train", CONFIG, saved, epoch, new_world)):
        stream = ShardStream(manifest, "train", CONFIG, rank=rank, world_size=new_world, position=position)
        seen += _consume(stream, 2)
        middle.append(stream.position)
    final = redistribute(manifest, "train", CONFIG, middle, epoch, old_world)
    for rank, position in enumerate(final):
        stream = ShardStream(manifest, "train", CONFIG, rank=rank, world_size=old_world, position=position)
        seen += [i for batch in stream.epoch_batches() for i in _ids(batch)]
        assert stream.position == StreamPosition(epoch + 1)  # the next epoch is an ordinary one
    assert sorted(seen) == list(range(ROWS))


def test_redistribute_continues_a_partly_read_window_with_the_same_batches(manifest) -> None:
    whole = ShardStream(manifest, "train", CONFIG, rank=1, world_size=2)
    reference = [_ids(b) for b in whole.epoch_batches()]
    first = ShardStream(manifest, "train", CONFIG, rank=1, world_size=2)
    _consume(first, 4)
    other = ShardStream(manifest, "train", CONFIG, rank=0, world_size=2)
    [position] = redistribute(manifest, "train", CONFIG, [other.position, first.position], 0, 1)
    resumed = [_ids(b) for b in ShardStream(manifest, "train", CONFIG, position=position).epoch_batches()]
    assert all(batch in resumed for batch in reference[4:])  # same batches, not re-formed ones
    assert not any(batch in resumed for batch in reference[:4])
