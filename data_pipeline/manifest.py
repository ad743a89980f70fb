"""manifest.json: what a prepared dataset holds and how it was made; its presence marks completion.

Layout of a prepared dataset. Every prepare writes a new, immutable version and then swaps the
small CURRENT pointer (one atomic write on every store, object stores included), so a reader
never sees a mix of two prepares, and a training job pins the version it started with by using
the version's own URI (`Manifest.uri`):
    <dataset>/CURRENT                            {"version": "<version>"}
    <dataset>/versions/<version>/manifest.json  tokenizer.model  train/part-00000.parquet ...  valid/ test/
A version directory (or a dataset written before versions existed) holds manifest.json itself;
`load_manifest` accepts either.
Shard columns: src_ids (list<int32>, ends with EOS), src_len (int32), and for translation data
tgt_ids / tgt_len; valid and test shards also keep `index` (input line order), src_text, tgt_text.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import storage
from data_pipeline.errors import InputError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
CURRENT = "CURRENT"
VERSIONS = "versions"
HISTOGRAM_EDGES = [0, 8, 16, 32, 64, 128, 256, 512, 1024]


def length_histogram(lengths: np.ndarray) -> dict[str, int]:
    """Counts of lengths in [0,8), [8,16), ... [1024, inf)."""
    edges = HISTOGRAM_EDGES + [np.iinfo(np.int64).max]
    counts, _ = np.histogram(lengths, bins=edges)
    labels = [f"{low}-{high - 1}" for low, high in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:])] + [f"{HISTOGRAM_EDGES[-1]}+"]
    return {label: int(count) for label, count in zip(labels, counts)}


def describe_split(dataset_uri: str, split: str, corpora: list[str] | None = None) -> dict:
    """Rows, tokens, length histograms and per-shard checksums of a written split; for a mixture
    (`corpora`: its names, in order) each corpus's share of the rows and tokens."""
    shards, src_lengths, tgt_lengths, corpus_ids = [], [], [], []
    for shard in storage.list_files(f"{dataset_uri}/{split}", ".parquet"):
        fs, path = storage.filesystem(shard)
        table = pq.read_table(path, filesystem=fs, columns=None)
        src_lengths.append(table.column("src_len").to_numpy())
        if "tgt_len" in table.column_names:
            tgt_lengths.append(table.column("tgt_len").to_numpy())
        if corpora:
            corpus_ids.append(table.column("corpus").to_numpy())
        shards.append({"file": f"{split}/{shard.rsplit('/', 1)[1]}", "rows": table.num_rows, "sha256": storage.sha256_of(shard)})
    src = np.concatenate(src_lengths) if src_lengths else np.zeros(0, dtype=np.int64)
    described = {
        "rows": int(src.size),
        "src_tokens": int(src.sum()),
        "length_histogram": {"src": length_histogram(src)},
        "shards": shards,
    }
    if tgt_lengths:
        tgt = np.concatenate(tgt_lengths)
        described["tgt_tokens"] = int(tgt.sum())
        described["length_histogram"]["tgt"] = length_histogram(tgt)
    if corpora:
        ids, tokens = np.concatenate(corpus_ids), np.concatenate(tgt_lengths) if tgt_lengths else src
        described["corpora"] = [  # a list: a corpus's place is its number in the shards' corpus column
            {"name": name, "rows": int((ids == number).sum()),
             "row_share": round(float((ids == number).mean()), 4) if ids.size else 0.0,
             "token_share": round(float(tokens[ids == number].sum() / max(1, tokens.sum())), 4)}
            for number, name in enumerate(corpora)]
    return described


@dataclass(frozen=True)
class Manifest:
    uri: str  # the dataset directory
    data: dict

    def corpora(self, split: str) -> tuple[str, ...]:
        """The names of a mixture's corpora in `split`, in the order of their numbers; () for one corpus."""
        return tuple(corpus["name"] for corpus in self.data["splits"][split].get("corpora", []))

    @property
    def tokenizer_uri(self) -> str:
        return f"{self.uri}/{self.data['tokenizer']['file']}"

    @property
    def tokenizer_sha256(self) -> str:
        return self.data["tokenizer"]["sha256"]

    @property
    def fingerprint(self) -> str:
        """Of the inputs and prepare settings: equal fingerprints, equal shards."""
        return str(self.data.get("fingerprint", ""))

    @property
    def vocab_size(self) -> int:
        return int(self.data["tokenizer"]["vocab_size"])

    @property
    def target_language(self) -> str:
        """The target side's language code as the source config gave it ("" if none was given)."""
        return str(self.data.get("source", {}).get("tgt_lang", ""))

    @property
    def monolingual(self) -> bool:
        return bool(self.data["monolingual"])

    def has_split(self, split: str) -> bool:
        return split in self.data["splits"] and self.data["splits"][split]["rows"] > 0

    def shard_uris(self, split: str) -> list[tuple[str, int]]:
        """(uri, rows) of each shard of a split, in order."""
        if split not in self.data["splits"]:
            raise InputError(f"{self.uri}/{MANIFEST}: the dataset has no {split!r} split")
        return [(f"{self.uri}/{s['file']}", int(s["rows"])) for s in self.data["splits"][split]["shards"]]


def current_version(dataset_uri: str) -> str | None:
    """The URI of the version CURRENT names, or of `dataset_uri` itself if it holds a manifest."""
    pointer = storage.read_json(storage.join(dataset_uri, CURRENT))
    if pointer is not None:
        return storage.join(dataset_uri, VERSIONS, pointer["version"])
    return dataset_uri if storage.is_file(storage.join(dataset_uri, MANIFEST)) else None


KEEP_VERSIONS = 2  # the current version and the one before, which a running job may still read
ABANDONED_AFTER_SECONDS = 24 * 3600  # an unfinished version this old belongs to a prepare that died


def new_version_uri(dataset_uri: str, fingerprint: str) -> str:
    """A fresh version directory; names sort by creation time (UTC, to the second)."""
    name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{fingerprint[:12]}-{uuid.uuid4().hex[:6]}"
    return storage.join(dataset_uri, VERSIONS, name)


def commit_version(dataset_uri: str, version_uri: str) -> None:
    """Make a fully written version current (one atomic write), then prune what no reader needs.
    The commit stands whatever the prune does: a prune that fails is said, not raised."""
    name = version_uri.rsplit("/", 1)[1]
    storage.write_bytes_atomic(storage.join(dataset_uri, CURRENT), json.dumps({"version": name}).encode())
    try:
        prune_versions(dataset_uri)
    except Exception as error:  # noqa: BLE001 - the new version is committed; old ones can wait
        print(f"[aiayn] {storage.redact(dataset_uri)}: old versions not removed ({str(error).splitlines()[0][:200]}); "
              "the next prepare tries again", file=sys.stderr)


def prune_versions(dataset_uri: str) -> None:
    """Remove versions that no reader should need: complete ones older than the last KEEP_VERSIONS,
    and unfinished ones that nothing wrote to for a day (a prepare that died), judged by the
    store's own clock. The current version is never removed, nor anything outside the layout."""
    current = (storage.read_json(storage.join(dataset_uri, CURRENT)) or {}).get("version")
    versions_uri = storage.join(dataset_uri, VERSIONS)
    names = storage.list_dirs(versions_uri)
    complete = [n for n in names if storage.is_file(storage.join(versions_uri, n, MANIFEST))]
    keep = set(complete[-KEEP_VERSIONS:]) | {current}
    unfinished = [n for n in names if n not in complete and n not in keep]
    now = storage.store_now(versions_uri) if unfinished else 0.0
    for other in names:
        if other in keep:
            continue
        if other in unfinished:
            written = storage.newest_modified_time(storage.join(versions_uri, other))
            if written is None or now - written < ABANDONED_AFTER_SECONDS:
                continue
        storage.delete_dir(storage.join(versions_uri, other))


def check_dataset_location(dataset_uri: str) -> None:
    """Prepare writes only into a dataset directory of its own (or a new one): never over other files."""
    if not storage.exists(dataset_uri) or current_version(dataset_uri) is not None:
        return
    if storage.file_sizes(dataset_uri):
        raise InputError(
            f"{dataset_uri} holds files but no prepared dataset ({CURRENT} or {MANIFEST}); aiayn will not write "
            "there: choose another data.output_dir or data.name"
        )


def load_manifest(dataset_uri: str) -> Manifest:
    """The manifest of the dataset's current version (or of a version given directly); a clear
    error if there is none or it is too new. `Manifest.uri` is the version: reading through it
    keeps reading that version whatever later prepares do."""
    version = current_version(dataset_uri)
    data = None if version is None else storage.read_json(storage.join(version, MANIFEST))
    if data is None:
        raise InputError(f"{dataset_uri}: no {MANIFEST}, so no complete dataset is there; run `aiayn prepare` first")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise InputError(
            f"{dataset_uri}/{MANIFEST}: schema_version {data.get('schema_version')} is not {SCHEMA_VERSION}; "
            "prepare the data again with this version of aiayn"
        )
    return Manifest(version, data)


def check_token_ids(uri: str, table: pa.Table, vocab_size: int) -> None:
    """Token ids outside the vocabulary would index past the embedding (a device-side assert on
    GPU, with no hint of where it came from): name the shard instead."""
    for column in ("src_ids", "tgt_ids"):
        if column not in table.column_names:
            continue
        bounds = pc.min_max(pc.list_flatten(table.column(column)))
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if low is not None and (low < 0 or high >= vocab_size):
            raise InputError(f"{uri}: {column} holds ids in [{low}, {high}] but the vocabulary has {vocab_size}; "
                             "the shard does not belong to this dataset: prepare it again")


def verify_dataset(manifest: Manifest) -> None:
    """Every shard and the tokenizer are byte for byte what prepare recorded (sha256) and every
    token id fits the vocabulary, so a corrupted, changed or foreign file is named before training
    takes any resource (a worker could only fail, and be retried, on it)."""
    files = [(manifest.tokenizer_uri, manifest.tokenizer_sha256)] + [
        (f"{manifest.uri}/{shard['file']}", shard["sha256"])
        for split in manifest.data["splits"].values() for shard in split["shards"]
    ]
    for index, (uri, expected) in enumerate(files):
        if not storage.is_file(uri):
            raise InputError(f"{uri}: missing from the prepared dataset; prepare it again")
        if storage.sha256_of(uri) != expected:
            raise InputError(f"{uri}: its sha256 differs from the one in {MANIFEST} (corrupted or changed since "
                             "prepare); prepare the dataset again")
        if index:  # a shard
            with storage.open_random_access(uri) as handle:
                shard = pq.ParquetFile(handle)
                columns = [c for c in ("src_ids", "tgt_ids") if c in shard.schema_arrow.names]
                check_token_ids(uri, shard.read(columns=columns), manifest.vocab_size)


def write_manifest(dataset_uri: str, data: dict) -> None:
    storage.write_bytes_atomic(f"{dataset_uri}/{MANIFEST}", json.dumps(data, indent=2, sort_keys=True).encode())


def check_tokenizer_matches(manifest: Manifest, tokenizer_sha256: str, where: str) -> None:
    """Refuse data encoded with another tokenizer than the model's."""
    if manifest.tokenizer_sha256 != tokenizer_sha256:
        raise InputError(
            f"{manifest.uri}/{MANIFEST}: data was encoded with tokenizer {manifest.tokenizer_sha256[:12]} but "
            f"{where} uses {tokenizer_sha256[:12]}; prepare the data with the model's tokenizer "
            "(data.tokenizer.path) or train a new model"
        )
