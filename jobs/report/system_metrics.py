"""Each node's CPU, memory, disk, network and (where present) GPU figures, in the run's MLflow run
as a fixed set of names whatever the number of nodes.

MLflow's own collectors (those of its SystemMetricsMonitor: psutil, and pynvml for NVIDIA GPUs)
sample on each node's local rank 0, on a thread of their own, from the attempt's start. At each
log window the samples since the last one (MLflow's aggregation: their mean) travel to rank 0
with the window's other figures, which logs, per figure, the lowest, the median and the highest
over the nodes (over every GPU for a GPU's figures): `system/<figure>/min|median|max`. MLflow's
monitor would log `system/<node>/<figure>` for each node, a dozen names a node, which MLflow's
store and charts do not carry on a large cluster; every node's figures go to the run's per-node
table instead (`RankReport.rank_figures`). Nothing here calls MLflow or raises: a side channel.
"""

from __future__ import annotations

import re
import statistics
import threading

_GPU_INDEX = re.compile(r"^gpu_\d+_")  # MLflow names a GPU's figures gpu_<index>_<figure>


class NodeSampler:
    """This node's figures, sampled every `interval_s` by MLflow's collectors."""

    def __init__(self, interval_s: float, tracking_uri: str) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Only its collectors are used (it picks the GPU's where there is one): it is never started,
        # so it logs nothing and asks the server nothing. It still makes a client at once: given no
        # URI, MLflow's default made a SQLite store in the worker's working directory, schema and
        # all, and a worker killed while making it left one that failed every later worker there.
        self._collectors = SystemMetricsMonitor(run_id=None, tracking_uri=tracking_uri)
        self.interval_s, self._lock, self._stop = interval_s, threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._sample, name="aiayn-system-metrics", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            try:
                with self._lock:
                    self._collectors.collect_metrics()
            except Exception:  # noqa: BLE001 - a figure that cannot be read this time is missing this time
                pass
            if self._stop.wait(self.interval_s):
                return

    def take(self) -> dict[str, float]:
        """The mean of each figure over the samples since the last take ({} when none was taken)."""
        with self._lock:
            figures = self._collectors.aggregate_metrics()
            for collector in self._collectors.monitors:
                collector.clear_metrics()
        return {key: float(value) for key, value in figures.items()}

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def node_metrics(figures: list[dict[str, float] | None]) -> dict[str, float]:
    """Rank 0's metrics from every rank's `take()` (None where a rank samples nothing): per figure
    the lowest, median and highest over the nodes and their GPUs."""
    values: dict[str, list[float]] = {}
    for node in figures:
        for key, value in (node or {}).items():
            values.setdefault(_GPU_INDEX.sub("gpu_", key), []).append(value)
    metrics = {}
    for key, seen in values.items():
        metrics.update({f"system/{key}/min": min(seen), f"system/{key}/median": statistics.median(seen),
                        f"system/{key}/max": max(seen)})
    return metrics
