"""Local paths and URIs through one PyArrow filesystem interface, and atomic dataset commits.

Local datasets are built in a hidden sibling directory and renamed into place, so an interrupted
prepare never leaves something that looks complete. Object stores have no rename: there the
shards are written first and manifest.json last, and a dataset counts as complete only when its
manifest exists and names every shard with its checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs


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


def read_text(uri: str) -> str | None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as handle:
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
    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(uri: str, suffix: str) -> list[str]:
    """Files directly under a directory URI, sorted, as URIs of the same form."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(info.base_name for info in infos if info.type == pafs.FileType.File and info.base_name.endswith(suffix))
    return [f"{uri.rstrip('/')}/{name}" for name in names]


def staging_uri(final_uri: str) -> str:
    """Where a dataset is built: a hidden sibling for local paths, the final place for object stores."""
    if not is_local(final_uri):
        return final_uri
    final = local_path(final_uri)
    final.parent.mkdir(parents=True, exist_ok=True)
    return str(final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"))


def commit_directory(staging: str, final_uri: str) -> None:
    """Move a fully written local staging directory into place, replacing an older dataset."""
    if not is_local(final_uri):
        return
    final = local_path(final_uri)
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(local_path(staging), final)
    shutil.rmtree(old, ignore_errors=True)


def discard_staging(staging: str, final_uri: str) -> None:
    if is_local(final_uri) and staging != final_uri:
        shutil.rmtree(local_path(staging), ignore_errors=True)


def check_writable(uri: str, key: str) -> None:
    """Fail early, naming the config key, when a local output location cannot be written.
    Writes and removes a probe file in the nearest existing directory (permission bits say
    nothing for root) and creates nothing else."""
    from data_pipeline.errors import InputError

    if not is_local(uri):
        return
    existing = local_path(uri)
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        probe = existing / f".aiayn-write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(f"{key}={uri}: cannot write there ({error}); choose a writable directory") from None
