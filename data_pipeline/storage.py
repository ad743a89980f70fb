"""Local paths and object-store URIs (s3://, gs://, ...) through one PyArrow filesystem interface.

Past the CLI every location is a URI string: a local path is a URI too. Object stores are
configured the standard way (AWS_ENDPOINT_URL, AWS_* credentials, GOOGLE_APPLICATION_CREDENTIALS)
and read on whichever node the code runs. Object stores have no rename, so what must appear
atomically is published by writing its marker file last (see `publish_directory`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import IO

import pyarrow.fs as pafs

from data_pipeline.redaction import redact, redact_tree  # noqa: F401 - where callers find them


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://") or uri.startswith("local://")


def local_path(uri: str) -> Path:
    for scheme in ("file://", "local://"):
        if uri.startswith(scheme):
            return Path(uri[len(scheme):]).resolve()
    return Path(uri).resolve()


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_local(uri):
        return pafs.LocalFileSystem(), str(local_path(uri))
    return pafs.FileSystem.from_uri(uri)


def is_within(uri: str, directory: str) -> bool:
    """Whether `uri` is `directory` or lies below it (local paths compared resolved)."""
    if is_local(uri) != is_local(directory):
        return False
    if is_local(uri):
        path, root = local_path(uri), local_path(directory)
        return path == root or root in path.parents
    return (uri.rstrip("/") + "/").startswith(directory.rstrip("/") + "/")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _type(uri: str) -> pafs.FileType:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type


def is_file(uri: str) -> bool:
    return _type(uri) == pafs.FileType.File


def exists(uri: str) -> bool:
    return _type(uri) != pafs.FileType.NotFound


def open_input(uri: str) -> IO[bytes]:
    """A buffered binary reader of a local file or an object: its bytes as stored (no
    decompression), iterable by line."""
    fs, path = filesystem(uri)
    return io.BufferedReader(fs.open_input_stream(path, compression=None))


def open_random_access(uri: str):
    """A seekable reader (Parquet needs one)."""
    fs, path = filesystem(uri)
    return fs.open_input_file(path)


def file_sizes(uri: str) -> dict[str, int]:
    """Every file below a directory URI: its path relative to that directory -> its size."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    root = path.rstrip("/") + "/"
    return {info.path[len(root):]: info.size for info in infos if info.type == pafs.FileType.File}


def list_dirs(uri: str) -> list[str]:
    """Names of the directories directly under a directory URI, sorted."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def modified_time(uri: str) -> float:
    """A file's modification time (seconds since the epoch) by its store's own clock."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File or info.mtime is None:
        raise FileNotFoundError(uri)
    return info.mtime.timestamp()


def store_now(directory_uri: str) -> float:
    """The current time by the clock of the store that holds `directory_uri`: the modification
    time of a probe written there (and removed), so that no two machines' clocks are compared."""
    probe = join(directory_uri, f".clock-{uuid.uuid4().hex[:8]}")
    write_bytes_atomic(probe, b"")
    try:
        return modified_time(probe)
    finally:
        delete_file(probe)


def newest_modified_time(directory_uri: str) -> float | None:
    """The latest modification time of any file below a directory, by the store's clock (None: no file)."""
    fs, path = filesystem(directory_uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    times = [info.mtime.timestamp() for info in infos if info.type == pafs.FileType.File and info.mtime is not None]
    return max(times, default=None)


def delete_file(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def copy_dir(source: str, destination: str) -> None:
    """Copy a directory tree between any two locations (download, upload or both remote)."""
    source_fs, source_path = filesystem(source)
    destination_fs, destination_path = filesystem(destination)
    if isinstance(destination_fs, pafs.LocalFileSystem):
        Path(destination_path).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(source_path, destination_path, source_filesystem=source_fs,
                    destination_filesystem=destination_fs, chunk_size=64 << 20,  # few requests per shard
                    use_threads=True)


def publish_directory(local: Path, destination: str, marker: str) -> None:
    """Put a finished local directory at `destination`, replacing an older copy, so that a reader
    never takes a half-written one for complete.

    Local: a hidden sibling renamed into place. Object stores: the old marker is deleted first,
    every other file uploaded, and the marker last; readers require the marker. `destination`
    must be absent or hold `marker` (something aiayn wrote): anything else is refused."""
    from data_pipeline.errors import InputError

    if exists(destination) and not is_file(join(destination, marker)):
        raise InputError(f"{destination} exists and is not aiayn's (no {marker}); remove it or choose another place")
    if is_local(destination):
        final = local_path(destination)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        shutil.copytree(local, staging)
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
        return
    delete_file(join(destination, marker))
    for path in sorted(local.rglob("*")):
        relative = path.relative_to(local).as_posix()
        if path.is_file() and relative != marker:
            write_bytes_atomic(join(destination, relative), path.read_bytes())
    write_bytes_atomic(join(destination, marker), (local / marker).read_bytes())


def read_text(uri: str) -> str | None:
    if not exists(uri):
        return None
    with open_input(uri) as handle:
        return handle.read().decode("utf-8")


def read_json(uri: str) -> dict | None:
    text = read_text(uri)
    return None if text is None else json.loads(text)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Local: temp file + rename. Object stores: a single PUT is already atomic."""
    if is_local(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        temp.write_bytes(data)
        os.replace(temp, path)
        return
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as handle:
        handle.write(data)


def sha256_of(uri: str) -> str:
    digest = hashlib.sha256()
    with open_input(uri) as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(uri: str, suffix: str) -> list[str]:
    """Files directly under a directory URI, sorted, as URIs of the same form."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(info.base_name for info in infos if info.type == pafs.FileType.File and info.base_name.endswith(suffix))
    return [f"{uri.rstrip('/')}/{name}" for name in names]


def nearest_existing(uri: str) -> Path:
    """The local path itself, or its closest ancestor that exists (where a probe can go without
    creating directories)."""
    existing = local_path(uri)
    while not existing.exists():
        existing = existing.parent
    return existing


def check_writable(uri: str, key: str) -> None:
    """Fail early, naming the config key, when a local output location cannot be written.
    Writes and removes a probe file in the nearest existing directory (permission bits say
    nothing for root) and creates nothing else."""
    from data_pipeline.errors import InputError

    if not is_local(uri):
        return
    existing = nearest_existing(uri)
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        probe = existing / f".aiayn-write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(f"{key}={uri}: cannot write there ({error}); choose a writable directory") from None
