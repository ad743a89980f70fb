"""Where one run's things live: one object, built once by the driver and handed to the workers.

Everything of run NAME is under `cluster.storage_path/NAME`, a local path or an object-store URI
that every node reaches: Ray Train's `checkpoint_*` directories (Ray Train is given the same root
and name), `export/`, `hangs/`, the driver's lease and, when the root is local, the run's log.
What is node-local (a rank's checkpoint part before its upload, the checkpoints the export
downloads) goes under `cluster.staging_dir`, else the system's temp directory.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from cluster.account_dir import account_dir
from cluster.config import ClusterConfig
from data_pipeline import storage

LOG_NAME = "aiayn.log"


@dataclass(frozen=True)
class RunLayout:
    name: str
    root: str  # cluster.storage_path, made absolute when local (workers run in other directories)
    staging_dir: str = ""  # node-local scratch; empty: the system's temp directory

    @classmethod
    def of(cls, cluster: ClusterConfig, name: str) -> "RunLayout":
        """The layout of run `name` under a config whose local paths are absolute already
        (`jobs.train.driver.with_absolute_paths`, the one place that makes them so)."""
        if storage.is_local(cluster.storage_path) and str(storage.local_path(cluster.storage_path)) != cluster.storage_path:
            raise ValueError(f"cluster.storage_path={cluster.storage_path!r} is not absolute yet")
        return cls(name=name, root=cluster.storage_path, staging_dir=cluster.staging_dir)

    @classmethod
    def from_dict(cls, data: dict) -> "RunLayout":
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    def check_writable(self) -> None:
        """One line naming cluster.storage_path when a local root cannot be written (the run's first
        write would fail otherwise, after the cluster was taken)."""
        storage.check_writable(self.root, "cluster.storage_path")

    @property
    def uri(self) -> str:
        return storage.join(self.root, self.name)

    @property
    def export_uri(self) -> str:
        return storage.join(self.uri, "export")

    def hang_stacks_uri(self, file_name: str) -> str:
        return storage.join(self.uri, "hangs", file_name)

    @property
    def log_path(self) -> Path:
        """The console's copy: in the run's directory when that is local, else in this account's
        own directory under the temp dir (object stores take no appends; a shared name there could
        be another account's first)."""
        if storage.is_local(self.root):
            return Path(self.root) / self.name / LOG_NAME
        return account_dir("logs") / f"{self.name}.log"

    @property
    def libraries_log_path(self) -> Path:
        """Where what libraries print on the driver goes (progress.libraries_output_to), beside the log."""
        return self.log_path.with_name(f"{self.log_path.stem}.libraries.log")

    def use_staging(self) -> None:
        """Make `staging_dir` this process's temp directory, so that every scratch file of a worker
        (checkpoint parts, Ray's downloads of a checkpoint) lands on the disk the user chose."""
        if self.staging_dir:
            Path(self.staging_dir).mkdir(parents=True, exist_ok=True)
            tempfile.tempdir = self.staging_dir

    @contextlib.contextmanager
    def scratch(self, prefix: str) -> Iterator[Path]:
        """A node-local directory under the staging disk, removed afterwards."""
        with tempfile.TemporaryDirectory(prefix=prefix, dir=self.staging_dir or None) as directory:
            yield Path(directory)
