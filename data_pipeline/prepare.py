"""`aiayn prepare`: corpus -> cleaned pairs -> SentencePiece -> Ray Data encoding -> Parquet shards.

Two phases so that bad input fails before any cluster resource is taken:
- `plan_prepare` (no Ray): validates every input completely, computes the fingerprint of inputs
  and settings, and finds out whether an identical dataset already exists;
- `run_prepare` (a Ray Data job on whatever Ray the caller connected to): streams and cleans the
  pairs into a raw Parquet file per split inside the new dataset version (storage that every
  node reaches, since the encoding actors may run on any node) while sampling sentences for
  SentencePiece, trains the tokenizer, encodes into shards of `shard_rows` rows with `map_batches`
  over an actor pool (each actor loads the tokenizer once, reads the rows of the shards it is
  handed and writes them), removes the raw files, writes the manifest and makes the version current (see
  data_pipeline/manifest.py).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_pipeline import storage
from data_pipeline.cleaning import Cleaner
from data_pipeline.config import PrepareConfig, SourceConfig
from data_pipeline.errors import InputError
from data_pipeline.manifest import (
    MANIFEST, SCHEMA_VERSION, TOKENIZER, check_dataset_location, commit_version, current_version, describe_split,
    new_version_uri, write_manifest,
)
from data_pipeline.sources import SPLITS, SplitInputs, check_split, corpus_source, read_split, split_inputs
from data_pipeline.tokenizer import (
    ReservoirSample, load_tokenizer, tokenizer_from_bytes, train_tokenizer,
)

# Rows per row group of a staged split (fewer when `encode_batch_rows` is smaller): a shard is
# encoded in runs of whole groups, so a group is at most one run.
STAGED_ROW_GROUP_ROWS = 8192


@dataclass(frozen=True)
class Reading:
    """One corpus of a split as prepare reads it: a mixture's train split has one per corpus."""

    source: SourceConfig
    inputs: SplitInputs
    name: str = ""  # the corpus's name in a mixture
    weight: float = 1.0


@dataclass(frozen=True)
class PreparePlan:
    config: PrepareConfig
    inputs: dict[str, tuple[Reading, ...]]  # split -> what it is read from
    described_inputs: list[dict]
    fingerprint: str
    up_to_date: bool


def plan_prepare(config: PrepareConfig) -> PreparePlan:
    """Validate everything a prepare needs, without Ray and without writing anything."""
    skip_invalid = config.cleaning.invalid_utf8 == "skip"
    storage.check_writable(config.output_dir, "data.output_dir")
    if config.tokenizer.path:
        load_tokenizer(config.tokenizer.path)
    inputs, described = {}, []
    for split in SPLITS:
        readings = _readings(config.source, split)
        for reading in readings:
            inside = [path for path in reading.inputs.paths if storage.is_within(path, config.dataset_uri)]
            if inside:
                raise InputError(f"data.source.{split}={inside[0]} lies inside the output {config.dataset_uri}, "
                                 "which prepare manages; keep the corpus elsewhere")
            checked = check_split(reading.source, reading.inputs, skip_invalid)
            described.append({**checked, "corpus": reading.name, "weight": reading.weight} if reading.name else checked)
        if readings:
            inputs[split] = readings
    settings = dataclasses.asdict(config)
    for machine_only in ("output_dir", "name", "encode_actors", "encode_batch_rows"):
        settings.pop(machine_only)
    settings["tokenizer"]["path"] = (
        storage.sha256_of(config.tokenizer.path) if config.tokenizer.path else ""
    )
    fingerprint = hashlib.sha256(
        json.dumps({"schema": SCHEMA_VERSION, "inputs": [
            {**d, "files": [f["sha256"] for f in d["files"]]} for d in described
        ], "settings": settings}, sort_keys=True).encode()
    ).hexdigest()
    check_dataset_location(config.dataset_uri)
    version = current_version(config.dataset_uri)
    existing = None if version is None else storage.read_json(storage.join(version, MANIFEST))
    up_to_date = existing is not None and existing.get("fingerprint") == fingerprint
    return PreparePlan(config, inputs, described, fingerprint, up_to_date)


def _readings(source: SourceConfig, split: str) -> tuple[Reading, ...]:
    """What `split` is read from: each corpus of a mixture's train split, else the source's own."""
    if split == "train" and source.corpora:
        readings = []
        for corpus in source.corpora:
            own = corpus_source(source, corpus)
            readings.append(Reading(own, split_inputs(own, "train"), corpus.name, corpus.weight))
        return tuple(readings)
    found = split_inputs(source, split)
    return () if found is None else (Reading(source, found),)


_STAGED = pa.schema([("index", pa.int64()), ("src_text", pa.string()), ("tgt_text", pa.string())])
_MIXED = _STAGED.append(pa.field("corpus", pa.int16()))  # a mixture's train split: which corpus a row is of


def _stage_split(plan: PreparePlan, split: str, raw_uri: str, sample: ReservoirSample | None) -> dict:
    """Write one split's (cleaned, for train) text pairs to a Parquet file; return counts. A
    mixture's corpora are cleaned together (a pair in two corpora is kept in the first), each
    staged alone, then copied in by weight (`_mix`)."""
    config = plan.config
    cleaner = Cleaner(config.cleaning, config.source.monolingual) if split == "train" else None
    readings = plan.inputs[split]
    if len(readings) == 1 and not readings[0].name:
        return _stage_reading(config, readings[0], raw_uri, cleaner, sample)
    parts, corpora = [], {}
    for number, reading in enumerate(readings):
        part = f"{raw_uri.removesuffix('.parquet')}-corpus{number}.parquet"
        kept_before = cleaner.kept
        _stage_reading(config, reading, part, cleaner, sample)
        parts.append(part)
        corpora[reading.name] = {"weight": reading.weight, "kept": cleaner.kept - kept_before}
    fs, path = storage.filesystem(raw_uri)
    with pq.ParquetWriter(path, _MIXED, filesystem=fs) as writer:
        for number, (reading, part) in enumerate(zip(readings, parts)):
            corpora[reading.name]["rows"] = _mix(part, writer, number, reading, config.seed)
    return {**cleaner.report(), "corpora": corpora}


def _stage_reading(config: PrepareConfig, reading: Reading, raw_uri: str, cleaner: Cleaner | None,
                   sample: ReservoirSample | None) -> dict:
    """One corpus's pairs (those `cleaner` keeps) into a staged Parquet file, sampled for the tokenizer."""
    monolingual = config.source.monolingual
    skip_invalid = config.cleaning.invalid_utf8 == "skip"
    invalid, rows = 0, {"index": [], "src_text": [], "tgt_text": []}
    group_rows = min(STAGED_ROW_GROUP_ROWS, config.encode_batch_rows)
    fs, path = storage.filesystem(raw_uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with pq.ParquetWriter(path, _STAGED, filesystem=fs) as writer:
        for index, pair in enumerate(read_split(reading.source, reading.inputs, skip_invalid)):
            if cleaner is not None:
                if not cleaner.keep(pair):
                    continue
            elif pair is None:
                invalid += 1
                continue
            src, tgt = pair[0].strip(), pair[1].strip()
            rows["index"].append(index)
            rows["src_text"].append(src)
            rows["tgt_text"].append(tgt)
            if sample is not None:
                sample.add(src)
                if not monolingual:
                    sample.add(tgt)
            if len(rows["index"]) >= group_rows:
                writer.write_table(pa.table(rows, schema=_STAGED))
                rows = {key: [] for key in rows}
        writer.write_table(pa.table(rows, schema=_STAGED))
    if cleaner is not None:
        return cleaner.report()
    with storage.open_random_access(raw_uri) as handle:
        return {"kept": pq.ParquetFile(handle).metadata.num_rows, "dropped": {"invalid_utf8": invalid}}


def _mix(part_uri: str, writer: pq.ParquetWriter, number: int, reading: Reading, seed: int) -> int:
    """Write a corpus's staged pairs into the mixture `weight` times over: whole copies, then the
    fraction as a seeded choice of exactly round(fraction x pairs) of them. Copies follow one
    another (a whole corpus apart, as fairseq's upsampled copies), never two of a pair side by
    side; a row group at a time. Returns the rows written."""
    with storage.open_random_access(part_uri) as handle:
        staged = pq.ParquetFile(handle)
        pairs = staged.metadata.num_rows
        whole, fraction = math.floor(reading.weight), reading.weight - math.floor(reading.weight)
        chosen = np.array(sorted(random.Random(f"{seed}:{reading.name}").sample(range(pairs), round(fraction * pairs))),
                          dtype=np.int64)
        written = 0
        for copy in range(whole + (len(chosen) > 0)):
            first = 0
            for group in range(staged.metadata.num_row_groups):
                rows = staged.read_row_group(group)
                if copy == whole:  # the fraction: the chosen rows of this group
                    picked = chosen[(chosen >= first) & (chosen < first + rows.num_rows)] - first
                    first, rows = first + rows.num_rows, rows.take(pa.array(picked))
                writer.write_table(rows.append_column("corpus", pa.array(np.full(rows.num_rows, number, np.int16))))
                written += rows.num_rows
    return written


class _Encoder:
    """Encodes batches of text pairs with a SentencePiece model loaded once.
    `threads`: SentencePiece's encoding threads, None for one per core of the machine."""

    def __init__(self, model_proto: bytes, monolingual: bool, keep_text: bool, *, threads: int | None):
        self.processor = tokenizer_from_bytes(model_proto)
        self.monolingual, self.keep_text, self.threads = monolingual, keep_text, threads

    def _encode(self, texts: list[str]) -> tuple[pa.Array, pa.Array]:
        ids = self.processor.encode(texts, add_eos=True, num_threads=self.threads)
        lists = pa.array(ids, type=pa.list_(pa.int32()))
        return lists, pc.list_value_length(lists)

    def __call__(self, batch: pa.Table) -> pa.Table:
        src_ids, src_len = self._encode(batch.column("src_text").to_pylist())
        columns = {"src_ids": src_ids, "src_len": src_len}
        if not self.monolingual:
            columns["tgt_ids"], columns["tgt_len"] = self._encode(batch.column("tgt_text").to_pylist())
        if self.keep_text:
            columns.update(index=batch.column("index"), src_text=batch.column("src_text"), tgt_text=batch.column("tgt_text"))
        if "corpus" in batch.column_names:  # a mixture's: kept for the manifest's shares
            columns["corpus"] = batch.column("corpus")
        return pa.table(columns)


def _encode_split(plan: PreparePlan, split: str, raw_uri: str, model_proto: bytes, out_uri: str) -> None:
    """Encode one staged split into shards of `shard_rows` rows. A split that fits in one encoding
    batch is encoded in this process: Ray Data would hand all of it to a single actor anyway, after
    starting a pipeline and the actor's process (7-50 s for a few thousand pairs on 2 cores; every
    split of Multi30K is one batch). Larger splits go through Ray Data's actor pool."""
    config = plan.config
    encoder_args = (model_proto, config.source.monolingual, split != "train")
    with storage.open_random_access(raw_uri) as handle:
        rows = pq.ParquetFile(handle).metadata.num_rows
    out_fs, out_path = storage.filesystem(out_uri)
    out_fs.create_dir(out_path, recursive=True)
    shards = -(-rows // config.shard_rows)
    writer_args = (storage.filesystem(raw_uri), (out_fs, out_path), config.shard_rows, config.encode_batch_rows,
                   encoder_args)
    if rows > config.encode_batch_rows:
        _encode_with_ray_data(config, shards, writer_args)
        return
    writer = _ShardWriter(*writer_args, threads=None)
    for shard in range(shards):
        writer.write(shard)


class _ShardWriter:
    """Encodes and writes whole shards: `part-NNNNN.parquet` holds rows [N, N + 1) x `shard_rows`
    of the staged split, so the same input always gives the same shards, however many processes
    wrote them. A shard is read, encoded and written in runs of whole row groups of about
    `batch_rows` rows, so a writer holds one run at a time whatever the shard's size.
    `threads`: SentencePiece's encoding threads, None for one per core of the machine."""

    def __init__(self, raw: tuple[pafs.FileSystem, str], out: tuple[pafs.FileSystem, str], shard_rows: int,
                 batch_rows: int, encoder_args: tuple, threads: int | None):
        raw_fs, raw_path = raw  # resolved by the driver, as Ray Data's readers are handed theirs
        self.raw = pq.ParquetFile(raw_fs.open_input_file(raw_path))
        self.group_starts = [0]  # the first row of each row group, then the number of rows
        for group in range(self.raw.metadata.num_row_groups):
            self.group_starts.append(self.group_starts[-1] + self.raw.metadata.row_group(group).num_rows)
        self.out, self.shard_rows, self.batch_rows = out, shard_rows, batch_rows
        self.encoder = _Encoder(*encoder_args, threads=threads)

    def _runs(self, first: int, stop: int) -> Iterator[pa.Table]:
        """Rows [first, stop) of the staged split, in runs of whole row groups (cut at both ends)."""
        starts, groups = self.group_starts, len(self.group_starts) - 1
        group = bisect.bisect_right(starts, first) - 1
        while starts[group] < stop:
            last = group  # the run's last group: add groups while the run is short of batch_rows
            while last + 1 < groups and starts[last + 1] < stop and starts[last + 1] - starts[group] < self.batch_rows:
                last += 1
            table = self.raw.read_row_groups(list(range(group, last + 1)))
            begin = max(first, starts[group])
            yield table.slice(begin - starts[group], min(stop, starts[last + 1]) - begin)
            group = last + 1

    def write(self, shard: int) -> int:
        """Encode and write one shard; returns its rows."""
        first = shard * self.shard_rows
        stop = min(first + self.shard_rows, self.group_starts[-1])
        fs, path = self.out
        writer = None
        try:
            for run in self._runs(first, stop):
                encoded = self.encoder(run)
                writer = writer or pq.ParquetWriter(f"{path}/part-{shard:05d}.parquet", encoded.schema, filesystem=fs)
                writer.write_table(encoded)
        finally:
            if writer is not None:
                writer.close()
        return stop - first

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray Data's batch of shard numbers -> the rows written of each."""
        return pa.table({"rows": [self.write(shard) for shard in batch.column("shard").to_pylist()]})


def _encode_with_ray_data(config: PrepareConfig, shards: int, writer_args: tuple) -> None:
    """One task per shard, on a pool of single-threaded `_ShardWriter` actors: each reads its own
    rows of the staged split and writes its own shard, so nothing but shard numbers passes
    through this process or Ray's object store."""
    import ray.data

    context = ray.data.DataContext.get_current()
    # Ray Data's own progress bars for a person at a terminal; its execution-plan lines stay in
    # Ray's logs (ray-data.log in the session directory).
    context.enable_progress_bars = sys.stderr.isatty()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # The pipeline's input is the shard numbers, held by this process: no read task takes a CPU,
    # so the writers may reserve all of them, on every node; no more actors than shards.
    cpus = ray.cluster_resources().get("CPU", 1.0)
    actors = min(config.encode_actors or max(1, int(cpus)), shards)
    # One SentencePiece thread per actor on the one CPU it holds, as the peer loop's processes:
    # one actor per CPU beats one per node with a thread per core, whose batch's conversions to
    # and from Python lists leave the other cores idle (bench/prepare_encoding.py: 0.87x the
    # peer's steady state, against 0.80x, before the actors wrote their shards; bench/results/,
    # 2026-12-04).
    ray.data.from_items([{"shard": shard} for shard in range(shards)]).map_batches(
        _ShardWriter, fn_constructor_args=(*writer_args, 1), batch_format="pyarrow", batch_size=1,
        num_cpus=max(0.05, min(1.0, cpus / actors)), compute=ray.data.ActorPoolStrategy(size=actors),
    ).materialize()


def run_prepare(plan: PreparePlan) -> dict:
    """Build a new version of the dataset (Ray must be reachable) and make it current; returns its
    manifest. An interrupted prepare leaves the current version as it was."""
    config = plan.config
    version = new_version_uri(config.dataset_uri, plan.fingerprint)
    raw = storage.join(version, "_raw")
    scratch = Path(tempfile.mkdtemp(prefix="aiayn-prepare-"))  # the tokenizer's training sample
    started = time.time()
    try:
        sample = ReservoirSample(config.tokenizer.sample_sentences, config.seed)
        cleaning = {}
        for split in plan.inputs:
            cleaning[split] = _stage_split(plan, split, storage.join(raw, f"{split}.parquet"),
                                           sample if split == "train" else None)
        if cleaning["train"]["kept"] == 0:
            raise InputError(f"{plan.inputs['train'][0].inputs.paths[0]}: every training pair was dropped by "
                             f"cleaning: {cleaning['train']['dropped']}")
        if config.tokenizer.path:  # a path or a URI: a local copy to read below
            model_path = scratch / TOKENIZER
            with storage.open_input(config.tokenizer.path) as handle:
                model_path.write_bytes(handle.read())
        else:
            model_path = train_tokenizer(sample.items, config.tokenizer, scratch / "tokenizer")
        processor = load_tokenizer(str(model_path))
        storage.write_bytes_atomic(storage.join(version, TOKENIZER), model_path.read_bytes())
        splits = {}
        for split in plan.inputs:
            _encode_split(plan, split, storage.join(raw, f"{split}.parquet"), model_path.read_bytes(),
                          storage.join(version, split))
        storage.delete_dir(raw)
        for split, readings in plan.inputs.items():
            splits[split] = describe_split(version, split, [reading.name for reading in readings if reading.name])
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": config.dataset_name,
            "fingerprint": plan.fingerprint,
            "created_unix": int(started),
            "prepare_seconds": round(time.time() - started, 1),
            "monolingual": config.source.monolingual,
            "source": dataclasses.asdict(config.source),
            "settings": dataclasses.asdict(config),
            "inputs": plan.described_inputs,
            "cleaning": cleaning,
            "tokenizer": {
                "file": TOKENIZER, "sha256": storage.sha256_of(str(model_path)),
                "vocab_size": processor.vocab_size(), "model_type": config.tokenizer.model_type,
                "pad_id": processor.pad_id(), "unk_id": processor.unk_id(),
                "bos_id": processor.bos_id(), "eos_id": processor.eos_id(),
            },
            "splits": splits,
        }
        # Exactly what readers will load (tuples become lists), with no credential of a source URI.
        manifest = json.loads(json.dumps(storage.redact_tree(manifest)))
        write_manifest(version, manifest)
        commit_version(config.dataset_uri, version)
        return manifest
    except BaseException:
        if current_version(config.dataset_uri) != version:  # never the version CURRENT already names
            storage.delete_dir(version)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
