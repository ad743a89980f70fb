"""What each training worker iterates: its deterministic part of the shards as token-budget batches,
with a small position from which the exact same batches continue after a restart.

Why not Ray Data's streaming_split: it hands blocks to whichever consumer asks first, so the
order differs run to run and there is no position to resume from (ray-project/ray#48224).
Here the split is a pure function of (seed, epoch, world size, rank):
- each shard is cut into units of `unit_rows` rows; an epoch permutes all units with
  rng(seed, epoch) and rank r takes units r, r + W, r + 2W, ... (every row exactly once);
- a rank's units are grouped into windows (the bounded sort buffer); window w is shuffled,
  length-bucketed and batched with rng(seed, epoch, rank, w);
- the position is (epoch, window, batch): resume re-reads window `window` and skips `batch`
  batches, which is exact because building a window depends on nothing else.
Ranks may get different numbers of batches in an epoch; the training loop equalises them.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import storage
from data_pipeline.batching import Batch, Window, collate, packed_batches, plan_token_batches
from data_pipeline.config import StreamConfig
from data_pipeline.manifest import Manifest


@dataclass
class StreamPosition:
    epoch: int = 0
    window: int = 0  # windows of this rank finished in this epoch
    batch: int = 0  # batches already consumed from the current window

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StreamPosition":
        return cls(**{key: int(data[key]) for key in ("epoch", "window", "batch")})


@dataclass
class StreamStats:
    dropped_too_long: int = 0  # examples longer than the batch budget or the model's positions


def _list_values(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy().astype(np.int64)
    return array.values.to_numpy(), offsets - offsets[0]


class ShardStream:
    def __init__(
        self, manifest: Manifest, split: str, config: StreamConfig, *, rank: int = 0, world_size: int = 1,
        position: StreamPosition | None = None, max_length: int | None = None, shuffle: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.manifest, self.split, self.config = manifest, split, config
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.max_length = max_length
        self.position = position or StreamPosition()
        self.stats = StreamStats()
        self.monolingual = manifest.monolingual
        self._units = [
            (uri, start, min(start + config.unit_rows, rows))
            for uri, rows in manifest.shard_uris(split)
            for start in range(0, rows, config.unit_rows)
        ]
        self._cached: tuple[str, pa.Table] | None = None

    # -- which rows this rank reads ------------------------------------------------------------
    def _rank_units(self, epoch: int) -> list[tuple[str, int, int]]:
        order = np.arange(len(self._units))
        if self.shuffle:
            order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self._units))
        return [self._units[i] for i in order[self.rank :: self.world_size]]

    def windows_in_epoch(self, epoch: int) -> list[list[tuple[str, int, int]]]:
        units = self._rank_units(epoch)
        per_window = max(1, self.config.window_rows // self.config.unit_rows)
        return [units[i : i + per_window] for i in range(0, len(units), per_window)]

    # -- building one window -------------------------------------------------------------------
    def _table(self, uri: str) -> pa.Table:
        if self._cached is None or self._cached[0] != uri:
            fs, path = storage.filesystem(uri)
            columns = ["src_ids", "src_len"] + ([] if self.monolingual else ["tgt_ids", "tgt_len"])
            self._cached = (uri, pq.read_table(path, filesystem=fs, columns=columns))
        return self._cached[1]

    def _read_window(self, units: list[tuple[str, int, int]]) -> Window:
        pieces = pa.concat_tables([self._table(uri).slice(start, stop - start) for uri, start, stop in units])
        src_values, src_offsets = _list_values(pieces.column("src_ids"))
        if self.monolingual:
            return Window(src_values, src_offsets, None, None)
        tgt_values, tgt_offsets = _list_values(pieces.column("tgt_ids"))
        return Window(src_values, src_offsets, tgt_values, tgt_offsets)

    def _window_batches(self, epoch: int, index: int, units: list[tuple[str, int, int]]) -> list[Batch]:
        window = self._read_window(units)
        rng = np.random.default_rng([self.config.seed, epoch, self.rank, index, self.world_size])
        if self.monolingual:
            return packed_batches(window, rng, self.config.packed_length, self.config.max_tokens)
        src_len, tgt_len = np.diff(window.src_offsets), np.diff(window.tgt_offsets)
        limit = self.config.max_tokens if self.max_length is None else min(self.config.max_tokens, self.max_length)
        fits = np.maximum(src_len, tgt_len) <= limit
        self.stats.dropped_too_long += int((~fits).sum())
        keep = np.flatnonzero(fits)
        plans = plan_token_batches(src_len[keep], tgt_len[keep], rng, self.config.max_tokens, self.config.max_sentences)
        return [collate(window, keep[rows]) for rows in plans]

    # -- iteration -----------------------------------------------------------------------------
    def epoch_batches(self) -> Iterator[Batch]:
        """Batches of the current epoch from the current position; afterwards the position is at
        the start of the next epoch. The position always names the next batch to be produced."""
        epoch = self.position.epoch
        windows = self.windows_in_epoch(epoch)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as prefetcher:
            upcoming = None
            for index in range(self.position.window, len(windows)):
                batches = upcoming.result() if upcoming is not None else self._window_batches(epoch, index, windows[index])
                upcoming = (
                    prefetcher.submit(self._window_batches, epoch, index + 1, windows[index + 1])
                    if self.config.prefetch_windows and index + 1 < len(windows) else None
                )
                for batch_index in range(self.position.batch, len(batches)):
                    self.position = StreamPosition(epoch, index, batch_index + 1)
                    yield batches[batch_index]
                self.position = StreamPosition(epoch, index + 1, 0)
        self.position = StreamPosition(epoch + 1, 0, 0)
