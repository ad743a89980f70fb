"""Where a job runs: the Ray address, the worker group and the shared storage for checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


@dataclass(frozen=True)
class ClusterConfig:
    address: str = ""  # empty: start an embedded local Ray; "auto" or ray://host:port: connect
    num_workers: int = 2  # the most workers; with min_workers below it, the run is elastic
    # Elastic training: the run starts with as many workers as the cluster can place between
    # min_workers and num_workers, continues on fewer after a node loss, and grows back when
    # capacity returns. 0: equal to num_workers (a fixed-size worker group).
    min_workers: int = 0
    resize_check_s: float = 60.0  # how often an elastic run looks for room to grow
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # CPU workers keep the memory each step frees for the next one (glibc's malloc settings,
    # jobs/train/cpu_allocator.py): steps 1.07-1.39x faster for a peak resident size 7-14% higher.
    # false: glibc's defaults, for a host whose memory is tighter than its time. GPU workers: no effect.
    keep_freed_memory: bool = True
    placement_strategy: Placement = "PACK"
    storage_path: str = "runs"  # local dir, NFS path, or s3:// / gs:// URI seen by every node
    # Node-local scratch where each worker writes its checkpoint part before Ray Train uploads it
    # (room for one checkpoint shard with its optimizer state); empty: the system temp dir.
    staging_dir: str = ""
    max_failures: int = 3  # worker-group restarts Ray Train attempts before giving up
    # How often Ray Train's controller polls the workers: a reported checkpoint is registered, a
    # failure noticed and the run's end seen within this. Ray's default (2 s) left checkpoints
    # unregistered for seconds (a restart then resumes from an older one) and every run's end
    # waiting about 5 s; a poll costs one small remote call per worker.
    poll_interval_s: float = 0.5
    # A driver renews its lease on the run this often x 4; another driver may take the run over
    # once the lease has gone this long without renewal (jobs/run/lease.py).
    lease_ttl_s: float = 60.0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"cluster.num_workers must be at least 1, got {self.num_workers}")
        if not 0 <= self.min_workers <= self.num_workers:
            raise ValueError(f"cluster.min_workers must be between 0 and cluster.num_workers ({self.num_workers}), "
                             f"got {self.min_workers}")
        if self.resize_check_s <= 0:
            raise ValueError(f"cluster.resize_check_s must be positive, got {self.resize_check_s}")
        if not 0 < self.poll_interval_s < float("inf"):
            raise ValueError(f"cluster.poll_interval_s must be a positive number of seconds, got {self.poll_interval_s}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cluster.cpus_per_worker must be positive, got {self.cpus_per_worker}")
        if not 0 < self.lease_ttl_s < float("inf"):
            raise ValueError(f"cluster.lease_ttl_s must be a positive number of seconds, got {self.lease_ttl_s}")
        if self.max_failures < 0:
            raise ValueError(f"cluster.max_failures must be >= 0 (-1 is not supported), got {self.max_failures}")

    @property
    def elastic(self) -> bool:
        return 0 < self.min_workers < self.num_workers
