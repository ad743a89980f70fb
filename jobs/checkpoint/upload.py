"""A checkpoint's upload from a rank's staging directory to the run's storage, while training goes on.

Each rank writes its part of a checkpoint into node-local staging (fast), then hands it to Ray
Train's report. In the asynchronous mode (`train.async_checkpoint`, the default) Ray Train copies
the part in a background thread and commits the checkpoint once every rank's part is there, in
the order of the reports; training continues meanwhile. A checkpoint is loaded only once it is
complete and verified (files.py), so a kill during an upload costs that checkpoint, never a
resume from half of one.

`Uploads` is this rank's side: at most one checkpoint staged at a time (the next save waits for
the previous upload, which bounds the staging disk), the lease checked just before the copy
starts, the staging copy removed afterwards whatever happened, and the seconds each save held
training up. A rank killed mid-save cannot remove its staging copy: the next rank to start on that
node removes every staging directory whose process is gone, so restarts never fill a node's disk.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from cluster.account_dir import account_dir
from cluster.processes import pid_namespace
from jobs.checkpoint.files import checkpoint_dir_name
from jobs.checkpoint.retention import reported_metrics


class Uploads:
    def __init__(self, rank: int, asynchronous: bool, fence: Callable[[str], None],
                 uploaded: Callable[[int, float, bool], None]) -> None:
        """`fence(what)` raises once this run's lease is lost; `uploaded(step, seconds, in_background)`
        is told of each finished upload (from the upload thread when in the background)."""
        self.rank, self.asynchronous, self.fence, self.uploaded = rank, asynchronous, fence, uploaded
        self._idle = threading.Event()
        self._idle.set()
        self._root = staging_root()
        remove_orphaned_staging(self._root)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh staging directory, once the previous upload has finished. If the save fails
        before its upload starts, the directory is removed here."""
        self._idle.wait()
        self._idle.clear()
        local = Path(tempfile.mkdtemp(prefix=f"r{self.rank}-{pid_namespace()}-{os.getpid()}-", dir=self._root))
        try:
            yield local
        except BaseException:
            self._finished(local)
            raise

    def report(self, metrics: dict, local: Path, step: int, wait: bool, validate: bool = False) -> None:
        """Hands the staged part of the checkpoint of `step` to Ray Train. `wait`: upload before
        returning (a preemption notice, the end of the run), whatever the mode. `validate`: once
        committed, Ray Train runs the trainer's validation function on it (with `step`)."""
        import ray.train

        mode = ray.train.CheckpointUploadMode
        background = self.asynchronous and not wait
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                         checkpoint_dir_name=checkpoint_dir_name(step), delete_local_checkpoint_after_upload=False,
                         checkpoint_upload_fn=lambda checkpoint, name: self._upload(checkpoint, name, step, background),
                         checkpoint_upload_mode=mode.ASYNC if background else mode.SYNC,
                         validation=ray.train.ValidationTaskConfig(fn_kwargs={"step": step}) if validate else False)
        if wait:
            self._idle.wait()

    def register(self, name: str, step: int, validate: bool) -> None:
        """Hands Ray Train a complete checkpoint of the run's storage that it never registered (its
        upload finished after the last driver was gone), which this attempt resumed from: so that
        Ray Train's retention knows it and, `validate`, its valid BLEU is computed. Every rank."""
        import ray.train

        self.fence(f"checkpoint {name}")  # committing it also runs Ray Train's retention
        storage = ray.train.get_context().get_storage()
        checkpoint = ray.train.Checkpoint(f"{storage.experiment_fs_path}/{name}", filesystem=storage.storage_filesystem)
        ray.train.report(reported_metrics({}, step), checkpoint=checkpoint, checkpoint_dir_name=name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
                         validation=ray.train.ValidationTaskConfig(fn_kwargs={"step": step}) if validate else False)

    def _upload(self, checkpoint, name: str, step: int, background: bool):
        """Called by Ray Train (in its upload thread when asynchronous) with this rank's part, which
        it removes itself, also when the copy fails."""
        import ray.train

        try:
            self.fence(f"checkpoint {name}")  # committing it also runs Ray Train's retention
            started = time.monotonic()
            persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, name)
            self.uploaded(step, time.monotonic() - started, background)
            return persisted
        finally:
            self._finished(Path(checkpoint.path))

    def _finished(self, local: Path) -> None:
        shutil.rmtree(local, ignore_errors=True)  # made by `staging`, for this upload only
        self._idle.set()


def staging_root() -> Path:
    """Where the staging directories of this account's ranks on this node lie: nothing else is
    written there, so what is there was made by a rank."""
    return account_dir("checkpoint-staging")


def remove_orphaned_staging(root: Path) -> None:
    """Removes the staging directories of ranks that are gone (killed mid-save). Only those of this
    process id namespace are judged: a process id from another (a container sharing the disk)
    says nothing about the processes seen here."""
    namespace = pid_namespace()
    for child in root.iterdir():
        named = re.fullmatch(r"r\d+-(\d+)-(\d+)-.+", child.name)
        if named and named[1] == namespace and not _alive(int(named[2])):
            shutil.rmtree(child, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process
        return True
