"""Readers for every supported corpus format, yielding one split as (source, target) text pairs.

`check_split` is a first pass that catches bad input (missing files, mismatched line counts,
invalid UTF-8, malformed rows, an empty corpus) before anything is written, and returns input
checksums for the manifest. `read_split` then streams the pairs; with invalid_utf8=skip an
undecodable line is yielded as None so that the cleaner counts it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from data_pipeline import storage
from data_pipeline.config import CorpusConfig, SourceConfig
from data_pipeline.errors import InputError

Pair = tuple[str, str]
SPLITS = ("train", "valid", "test")
BUILTIN_MULTI30K = Path(__file__).resolve().parent / "corpora" / "multi30k"
_MULTI30K_PREFIX = {"train": "train", "valid": "val", "test": "test_2016_flickr"}


@dataclass(frozen=True)
class SplitInputs:
    """The files (or dataset name) a split is read from: local paths or object-store URIs."""

    split: str
    paths: tuple[str, ...]  # text: one file per language; others: one path or name


def corpus_source(source: SourceConfig, corpus: CorpusConfig) -> SourceConfig:
    """The source that reads `corpus` as its train split: the mixture's languages, the corpus's
    own format, path, fields and Hugging Face configuration."""
    return dataclasses.replace(source, format=corpus.format, train=corpus.path, valid="", test="", corpora=(),
                               src_field=corpus.src_field, tgt_field=corpus.tgt_field, hf_config=corpus.hf_config,
                               hf_splits=(corpus.hf_split, *source.hf_splits[1:]))


def split_inputs(source: SourceConfig, split: str) -> SplitInputs | None:
    """The inputs of a split, or None when the config names none."""
    if source.format == "multi30k":
        prefix = str(BUILTIN_MULTI30K / _MULTI30K_PREFIX[split])
        langs = [source.src_lang] + ([source.tgt_lang] if source.tgt_lang else [])
        return SplitInputs(split, tuple(f"{prefix}.{lang}.gz" for lang in langs))
    if source.format == "hf":
        return SplitInputs(split, (source.train,))
    location = getattr(source, split)
    if not location:
        return None
    if source.format == "text":
        langs = [source.src_lang] + ([source.tgt_lang] if source.tgt_lang else [])
        return SplitInputs(split, tuple(_text_file(location, lang, split) for lang in langs))
    return SplitInputs(split, (location,))


def _text_file(prefix: str, lang: str, split: str) -> str:
    for candidate in (f"{prefix}.{lang}", f"{prefix}.{lang}.gz"):
        if storage.is_file(candidate):
            return candidate
    raise InputError(
        f"data.source.{split}: neither {prefix}.{lang} nor {prefix}.{lang}.gz exists; "
        "give the prefix of files named PREFIX.<lang>[.gz]"
    )


@contextlib.contextmanager
def _open_binary(path: str) -> Iterator[IO[bytes]]:
    if not storage.is_file(path):
        raise InputError(f"{path}: no such file; check the data.source paths")
    with storage.open_input(path) as raw:
        if not path.endswith(".gz"):
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            yield unzipped


MAX_LINE_BYTES = 1 << 20  # a longer "line" is not a sentence: the file is not line-oriented text


def _lines(path: str) -> Iterator[bytes]:
    """Raw lines, each read with a byte bound; a truncated or broken gzip file is one clear error."""
    with _open_binary(path) as handle:
        number = 0
        while True:
            try:
                raw = handle.readline(MAX_LINE_BYTES + 1)
            except (EOFError, OSError, zlib.error) as error:
                raise InputError(f"{path}: cannot be read to its end ({error}); is it a complete file?") from None
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise InputError(f"{path}:{number}: a line longer than {MAX_LINE_BYTES} bytes; give text with one "
                                 "sentence per line")
            yield raw


def _decoded_lines(path: str, skip_invalid: bool) -> Iterator[str | None]:
    """Lines without their newline; None for an undecodable line when skipping."""
    for number, raw in enumerate(_lines(path), start=1):
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            if skip_invalid:
                yield None
                continue
            raise InputError(
                f"{path}:{number}: invalid UTF-8 at byte {error.start}; fix the file or set "
                "data.cleaning.invalid_utf8=skip to drop and count such lines"
            ) from None


def _row_field(row: dict, name: str, where: str) -> str:
    translation = row.get("translation")
    if isinstance(translation, dict) and name in translation:
        return str(translation[name] or "")
    if name in row:
        return str(row[name] or "")
    raise InputError(f"{where}: no field {name!r} (nor translation.{name}); set data.source.src_field/tgt_field")


def _row_pair(row: dict, source: SourceConfig, where: str) -> Pair:
    src = _row_field(row, source.src_field or source.src_lang, where)
    tgt = "" if source.monolingual else _row_field(row, source.tgt_field or source.tgt_lang, where)
    return src, tgt


def _dict_pairs(rows: Iterator[dict], source: SourceConfig, where: str) -> Iterator[Pair]:
    for number, row in enumerate(rows, start=1):
        yield _row_pair(row, source, f"{where}:{number}")


def _text_pairs(inputs: SplitInputs, skip_invalid: bool) -> Iterator[Pair | None]:
    streams = [_decoded_lines(path, skip_invalid) for path in inputs.paths]
    if len(streams) == 1:
        for line in streams[0]:
            yield None if line is None else (line, "")
        return
    sentinel = object()
    src_lines, tgt_lines = streams
    while True:
        src, tgt = next(src_lines, sentinel), next(tgt_lines, sentinel)
        if src is sentinel or tgt is sentinel:
            return
        yield None if src is None or tgt is None else (src, tgt)


def _tsv_pairs(path: str, source: SourceConfig, skip_invalid: bool) -> Iterator[Pair | None]:
    columns = 1 if source.monolingual else 2
    for number, line in enumerate(_decoded_lines(path, skip_invalid), start=1):
        if line is None:
            yield None
            continue
        parts = line.split("\t")
        if len(parts) < columns:
            raise InputError(f"{path}:{number}: expected {columns} tab-separated columns, found {len(parts)}")
        yield parts[0], parts[1] if columns == 2 else ""


def _jsonl_rows(path: str, skip_invalid: bool) -> Iterator[dict | None]:
    for number, line in enumerate(_decoded_lines(path, skip_invalid), start=1):
        if line is None:
            yield None
            continue
        if not line.strip():
            yield {}
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number}: a JSON line must be an object ({{\"en\": ..., \"de\": ...}}), "
                             f"not {type(row).__name__}")
        yield row


def _parquet_rows(path: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    if not storage.is_file(path):
        raise InputError(f"{path}: no such file; check the data.source paths")
    import pyarrow as pa

    with storage.open_random_access(path) as handle:
        try:
            parquet = pq.ParquetFile(handle)
            for batch in parquet.iter_batches(batch_size=8192):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as error:
            raise InputError(f"{path}: not a readable Parquet file ({str(error).splitlines()[0]})") from None


def _hf_split(source: SourceConfig, split: str):
    import datasets

    location = source.train
    split_name = source.hf_splits[SPLITS.index(split)]
    path = Path(location)
    saved = path.is_dir() and any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json"))
    try:
        if saved:
            loaded = datasets.load_from_disk(location)
        elif path.is_file():
            kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}.get(path.suffix)
            if kind is None:
                raise InputError(f"{location}: unsupported data file type for data.source.format=hf")
            loaded = datasets.load_dataset(kind, data_files={split_name: location})
        else:
            loaded = datasets.load_dataset(location, source.hf_config or None)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - datasets raises many types; the user needs one line
        raise InputError(f"data.source.train={location!r}: cannot load the Hugging Face dataset "
                         f"({str(error).splitlines()[0]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        return loaded[split_name] if split_name in loaded else None
    return loaded if split == "train" else None


def read_split(source: SourceConfig, inputs: SplitInputs, skip_invalid: bool) -> Iterator[Pair | None]:
    """Stream the pairs of one split (target '' for monolingual corpora)."""
    where = inputs.paths[0]
    if source.format in ("multi30k", "text"):
        yield from _text_pairs(inputs, skip_invalid)
    elif source.format == "tsv":
        yield from _tsv_pairs(where, source, skip_invalid)
    elif source.format == "jsonl":
        for number, row in enumerate(_jsonl_rows(where, skip_invalid), start=1):
            if row is None:
                yield None
            else:
                yield _row_pair(row, source, f"{where}:{number}") if row else ("", "")
    elif source.format == "parquet":
        yield from _dict_pairs(_parquet_rows(where), source, where)
    else:
        dataset = _hf_split(source, inputs.split)
        if dataset is not None:
            yield from _dict_pairs(iter(dataset), source, f"{where}[{inputs.split}]")


def check_split(source: SourceConfig, inputs: SplitInputs, skip_invalid: bool) -> dict:
    """Validate one split completely and describe its inputs (paths, sha256, rows) for the manifest."""
    if source.format in ("multi30k", "text") and len(inputs.paths) == 2:
        counts = [sum(1 for _ in _decoded_lines(path, skip_invalid)) for path in inputs.paths]
        if counts[0] != counts[1]:
            raise InputError(
                f"{inputs.paths[0]} has {counts[0]} lines but {inputs.paths[1]} has {counts[1]}; "
                "parallel files must have the same number of lines"
            )
        rows = counts[0]
    else:
        rows = sum(1 for _ in read_split(source, inputs, skip_invalid))
    if inputs.split == "train" and rows == 0:
        raise InputError(f"{', '.join(inputs.paths)}: the training corpus is empty")
    described = []
    for path in inputs.paths:
        checksum = storage.sha256_of(path) if storage.is_file(path) else f"name:{path}"
        described.append({"path": path, "sha256": checksum})
    return {"split": inputs.split, "files": described, "rows": rows}
