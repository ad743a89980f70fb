"""Per-node CPU, memory, disk, network and (where present) GPU figures in the run's MLflow run.

MLflow's own SystemMetricsMonitor does the sampling (psutil; pynvml or rocm-smi for GPUs) and
names each series `system/<node>/...`; one runs on each node (its local rank 0). What is added
here: the node's label, numbering that continues across restarts, and a monitor that stopped
(MLflow's stops for good when the server cannot be reached) is started again at the next check.
"""

from __future__ import annotations

import socket


class NodeSystemMetrics:
    def __init__(self, run_id: str, tracking_uri: str, node_id: str, interval_s: float) -> None:
        self.run_id, self.tracking_uri, self.interval_s = run_id, tracking_uri, interval_s
        self.label = f"{socket.gethostname()}-{node_id[:8]}"  # the same label as the node.rankN tags
        self.monitor = None
        self.keep_alive()

    def keep_alive(self) -> None:
        """Starts the monitor, or starts it again if it has stopped. Never raises: these figures
        are a side channel."""
        if self.monitor is not None and self.monitor._process is not None and self.monitor._process.is_alive():
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.interval_s, resume_logging=True,
                                                node_id=self.label, tracking_uri=self.tracking_uri)
            self.monitor.start()
        except Exception:  # noqa: BLE001 - the server is unreachable: tried again at the next check
            self.monitor = None

    def finish(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
