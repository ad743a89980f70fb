"""The process group's rendezvous store, listening on the address the ranks are given only.

torch's TCPStore server takes no credentials and listens on every interface whatever MASTER_ADDR
says (its server binds the wildcard address). Ray Train's torch backend asks rank 0 for its node's
address and a free port (`get_address_and_port`), and every rank's `init_process_group("env://")`
then creates a store with `multi_tenant=True`, which reuses a server already running on that port
in the process. So rank 0 first starts that server on a socket bound to its node's address
(`master_listen_fd`) and answers with that port: the store is reached at MASTER_ADDR and nowhere
else. Ray's own servers are not this: they check Ray's token.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch import config as ray_torch_config

_SERVED: list = []  # rank 0's listening socket and store: kept for the worker process's life


def _serve_store(world_size: int, timeout_s: float) -> tuple[str, int]:
    """On rank 0: start the store's server on this node's address only; (address, port)."""
    address = ray.util.get_node_ip_address()
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    listener.bind((address, 0))
    listener.listen(socket.SOMAXCONN)
    port = listener.getsockname()[1]
    store = dist.TCPStore(address, port, world_size, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                          multi_tenant=True, master_listen_fd=listener.fileno())
    _SERVED[:] = [listener, store]
    return address, port


class _BoundTorchBackend(ray_torch_config._TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        world_size, timeout_s = len(worker_group), backend_config.timeout_s  # the closure sent to rank 0 holds these only

        def serve_store() -> tuple[str, int]:
            return _serve_store(world_size, timeout_s)

        ask_rank_0 = ray_torch_config.get_address_and_port
        ray_torch_config.get_address_and_port = serve_store  # what on_start runs on rank 0 for the address
        try:
            super().on_start(worker_group, backend_config)
        finally:
            ray_torch_config.get_address_and_port = ask_rank_0


class BoundTorchConfig(TorchConfig):
    """Ray Train's TorchConfig whose rendezvous store listens on MASTER_ADDR only."""

    @property
    def backend_cls(self):
        return _BoundTorchBackend
