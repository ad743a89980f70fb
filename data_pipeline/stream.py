"""What each training worker iterates: its deterministic part of the shards as token-budget batches,
with a small position from which the exact same batches continue after a restart, at the same
or at another world size.

Why not Ray Data's streaming_split: it hands blocks to whichever consumer asks first, so the
order differs run to run and there is no position to resume from (ray-project/ray#48224).
Here the split is a pure function of (seed, epoch, world size, rank):
- each shard is cut into units of `unit_rows` rows; an epoch permutes all units with
  rng(seed, epoch) and groups them into windows (the bounded sort buffer) of at most
  `window_rows` rows, and few enough rows that every rank gets a window;
- window g is shuffled, length-bucketed and batched with rng(seed, epoch, window size, g), so its
  batches do not depend on which rank reads it; rank r reads windows r, r + W, r + 2W, ...;
- the position is (epoch, window, batch): resume re-reads the rank's window `window` and skips
  to batch `batch`, which is exact because building a window depends on nothing else;
- with subword regularization (`sampling_alpha`), each train example is segmented again as its
  window is read, seeded by (seed, epoch, the example's row in the split): still nothing that
  depends on the rank, the world size or what was read before.
- at another world size (`redistribute`), the windows and partly read windows that the old
  ranks had left in the epoch are dealt to the new ranks, recorded in their positions as an
  explicit plan: every example is still read exactly once in that epoch.
Ranks may get different numbers of batches in an epoch; the training loop equalises them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import storage
from data_pipeline.batching import Batch, Window, collate, longest_example, packed_batches, plan_token_batches
from data_pipeline.config import StreamConfig
from data_pipeline.errors import InputError
from data_pipeline.manifest import Manifest, check_token_ids
from data_pipeline.tokenizer import sampled_segmentation, tokenizer_from_bytes


@dataclass
class StreamPosition:
    """Where a rank is in its epoch. `plan` is set only for an epoch resumed at another world size:
    that rank's (window, first batch) work items, in windows of `plan_window_units` units."""

    epoch: int = 0
    window: int = 0  # work items of this rank finished in this epoch
    batch: int = 0  # index, in the current window's batches, of the next batch
    plan: tuple[tuple[int, int], ...] | None = None
    plan_window_units: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StreamPosition":
        plan = data.get("plan")
        return cls(int(data["epoch"]), int(data["window"]), int(data["batch"]),
                   None if plan is None else tuple((int(g), int(b)) for g, b in plan),
                   int(data.get("plan_window_units", 0)))


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
        # A mixture's corpora, in the order of their numbers (batches carry each row's; a decoder-only
        # stream packs documents across rows, so it carries none)
        self.corpora = () if self.monolingual else manifest.corpora(split)
        shards = manifest.shard_uris(split)
        self._units = [
            (uri, start, min(start + config.unit_rows, rows))
            for uri, rows in shards
            for start in range(0, rows, config.unit_rows)
        ]
        self._first_row = dict(zip((uri for uri, _ in shards), np.cumsum([0] + [rows for _, rows in shards])))
        self._cached: tuple[str, pa.Table] | None = None
        self._sampling = config.sampling_alpha if split == "train" and not self.monolingual else 0.0
        self._processor = None

    # -- which rows this rank reads ------------------------------------------------------------
    def window_units(self) -> int:
        """Units per window: the configured buffer, or fewer so that every rank gets a window."""
        return max(1, min(self.config.window_rows // self.config.unit_rows, -(-len(self._units) // self.world_size)))

    def _window(self, epoch: int, window_units: int, index: int) -> list[tuple[str, int, int]]:
        order = np.arange(len(self._units))
        if self.shuffle:
            order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self._units))
        return [self._units[i] for i in order[index * window_units : (index + 1) * window_units]]

    def work_items(self, position: StreamPosition) -> tuple[list[tuple[int, int]], int]:
        """([(window, first batch), ...], units per window) of this rank in `position.epoch`."""
        if position.plan is not None:
            return list(position.plan), position.plan_window_units
        units = self.window_units()
        windows = -(-len(self._units) // units)
        return [(g, 0) for g in range(self.rank, windows, self.world_size)], units

    # -- building one window -------------------------------------------------------------------
    # -- building one window -------------------------------------------------------------------
    def _table(self, uri: str) -> pa.Table:
        if self._cached is None or self._cached[0] != uri:
            fs, path = storage.filesystem(uri)
            columns = ["src_ids", "src_len"] + ([] if self.monolingual else ["tgt_ids", "tgt_len"])
            columns += ["corpus"] if self.corpora else []
            table = pq.read_table(path, filesystem=fs, columns=columns)
            check_token_ids(uri, table, self.manifest.vocab_size)  # the driver checked; a node may read other bytes
            self._cached = (uri, table)
        return self._cached[1]

    def _read_window(self, units: list[tuple[str, int, int]]) -> Window:
        pieces = pa.concat_tables([self._table(uri).slice(start, stop - start) for uri, start, stop in units])
        src_values, src_offsets = _list_values(pieces.column("src_ids"))
        if self.monolingual:
            return Window(src_values, src_offsets, None, None)
        tgt_values, tgt_offsets = _list_values(pieces.column("tgt_ids"))
        corpus = pieces.column("corpus").to_numpy() if self.corpora else None
        return Window(src_values, src_offsets, tgt_values, tgt_offsets, corpus)

    def _example_seeds(self, epoch: int, units: list[tuple[str, int, int]]) -> list[int]:
        """One seed per example of the window, from (seed, epoch, its row in the split)."""
        return [hash((self.config.seed, epoch, int(self._first_row[uri]) + row)) & 0xFFFFFFFF
                for uri, start, stop in units for row in range(start, stop)]

    def _resegmented(self, window: Window, epoch: int, units: list[tuple[str, int, int]]) -> Window:
        if self._processor is None:
            with storage.open_input(self.manifest.tokenizer_uri) as handle:
                proto = handle.read()
            if hashlib.sha256(proto).hexdigest() != self.manifest.tokenizer_sha256:
                raise InputError(f"{self.manifest.tokenizer_uri}: the tokenizer differs from the one the manifest "
                                 "names; prepare the dataset again")
            self._processor = tokenizer_from_bytes(proto, self.manifest.tokenizer_uri)
        seeds = self._example_seeds(epoch, units)
        src = sampled_segmentation(self._processor, window.src_values, window.src_offsets, seeds, self._sampling)
        tgt = sampled_segmentation(self._processor, window.tgt_values, window.tgt_offsets,
                                   [seed ^ 0x5BD1E995 for seed in seeds], self._sampling)  # not the source's draws
        return Window(*src, *tgt, window.corpus)

    def _window_batches(self, epoch: int, window_units: int, index: int) -> list[Batch]:
        units = self._window(epoch, window_units, index)
        window = self._read_window(units)
        if self._sampling:
            window = self._resegmented(window, epoch, units)
        rng = np.random.default_rng([self.config.seed, epoch, window_units, index])
        if self.monolingual:
            return packed_batches(window, rng, self.config.packed_length, self.config.max_tokens)
        src_len, tgt_len = np.diff(window.src_offsets), np.diff(window.tgt_offsets)
        limit = longest_example(self.config.max_tokens, self.max_length)
        fits = np.maximum(src_len, tgt_len) <= limit
        self.stats.dropped_too_long += int((~fits).sum())
        keep = np.flatnonzero(fits)
        plans = plan_token_batches(src_len[keep], tgt_len[keep], rng, self.config.max_tokens, self.config.max_sentences)
        return [collate(window, keep[rows]) for rows in plans]

    # -- iteration -----------------------------------------------------------------------------
    def epoch_batches(self) -> Iterator[Batch]:
        """Batches of the current epoch from the current position; afterwards the position is at
        the start of the next epoch. The position always names the next batch to be produced."""
        start = self.position
        epoch = start.epoch
        items, units = self.work_items(start)

        def at(index: int, batch: int) -> StreamPosition:
            return StreamPosition(epoch, index, batch, start.plan, start.plan_window_units)

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as prefetcher:
            upcoming = None
            for index in range(start.window, len(items)):
                window, first = items[index]
                batches = upcoming.result() if upcoming is not None else self._window_batches(epoch, units, window)
                upcoming = (
                    prefetcher.submit(self._window_batches, epoch, units, items[index + 1][0])
                    if self.config.prefetch_windows and index + 1 < len(items) else None
                )
                for batch_index in range(start.batch if index == start.window else first, len(batches)):
                    self.position = at(index, batch_index + 1)
                    yield batches[batch_index]
                self.position = at(index + 1, items[index + 1][1] if index + 1 < len(items) else 0)
        self.position = StreamPosition(epoch + 1, 0, 0)


def redistribute(manifest: Manifest, split: str, config: StreamConfig, old_positions: list[StreamPosition],
                 epoch: int, new_world_size: int) -> list[StreamPosition]:
    """Positions for `new_world_size` ranks that continue `epoch` from where the old ranks (one
    position each, in rank order) stopped: the rest of every old rank's work items, dealt
    round-robin in window order. Every example of the epoch is still read exactly once."""
    remaining: list[tuple[int, int]] = []
    layouts = set()
    for rank, position in enumerate(old_positions):
        if position.epoch != epoch:
            continue  # this old rank had finished the epoch
        old = ShardStream(manifest, split, config, rank=rank, world_size=len(old_positions))
        items, units = old.work_items(position)
        layouts.add(units)
        rest = items[position.window :]
        if rest:
            rest[0] = (rest[0][0], position.batch)
        remaining += rest
    if len(layouts) > 1:
        raise ValueError(f"the old positions of epoch {epoch} disagree on the window size: {sorted(layouts)}")
    units = layouts.pop() if layouts else 1
    remaining.sort()
    plans = [tuple(remaining[rank::new_world_size]) for rank in range(new_world_size)]
    return [StreamPosition(epoch, 0, plan[0][1] if plan else 0, plan, units) for plan in plans]
