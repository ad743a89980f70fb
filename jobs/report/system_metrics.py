"""Per-node CPU, memory, disk, network and (where present) GPU figures in the run's MLflow run.

MLflow's own SystemMetricsMonitor does the sampling (psutil; pynvml for NVIDIA GPUs) and names
each series `system/<node>/...`; one runs on each node (its local rank 0). What is added here:
the node's label, numbering that continues across restarts, and a keeper thread that starts the
monitor again when it has stopped (MLflow's stops for good once the server cannot be reached).
Nothing here runs on the training thread, and nothing raises: these figures are a side channel.
"""

from __future__ import annotations

import socket
import threading


class NodeSystemMetrics:
    def __init__(self, run_id: str, tracking_uri: str, node_id: str, interval_s: float) -> None:
        self.run_id, self.tracking_uri, self.interval_s = run_id, tracking_uri, interval_s
        self.label = f"{socket.gethostname()}-{node_id[:8]}"  # host and Ray node, as in the node.rankN tags
        self.monitor = None
        self._stop = threading.Event()
        self._keeper = threading.Thread(target=self._keep, name="aiayn-system-metrics", daemon=True)
        self._keeper.start()

    def _keep(self) -> None:
        while not self._stop.is_set():
            if not self._running():
                self._start()
            self._stop.wait(2 * self.interval_s)

    def _running(self) -> bool:
        thread = getattr(self.monitor, "_process", None)  # MLflow keeps its sampling thread there
        return thread is not None and thread.is_alive()

    def _start(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.interval_s, resume_logging=True,
                                                node_id=self.label, tracking_uri=self.tracking_uri)
            self.monitor.start()
        except Exception:  # noqa: BLE001 - the server is unreachable: tried again later
            self.monitor = None

    def finish(self) -> None:
        self._stop.set()
        self._keeper.join(timeout=5)
        if self._running():
            self.monitor.finish()
