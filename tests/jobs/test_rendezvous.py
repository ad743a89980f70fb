"""The process group's rendezvous store listens on MASTER_ADDR only, on a real 2-worker Ray Train
group (gloo), where torch alone would listen on every interface."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _listeners(port: int) -> list[str]:
    """The local addresses listening on TCP `port` (`ss` prints `*:port` for the wildcard)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[3] for line in out.splitlines() if line.strip())


def _look_at_the_store(config: dict) -> None:
    import torch.distributed as dist
    from ray import train

    dist.barrier()  # the store has served both ranks
    if train.get_context().get_world_rank() == 0:
        port = int(os.environ["MASTER_PORT"])
        seen = {"master": f"{os.environ['MASTER_ADDR']}:{port}", "listeners": _listeners(port)}
        Path(config["out"]).write_text(json.dumps(seen))
    dist.barrier()


def test_the_store_listens_on_the_masters_address_only(ray_cluster, tmp_path) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.ray_connection import connect
    from jobs.train.rendezvous import BoundTorchConfig

    connect(ray_cluster)
    out = tmp_path / "store.json"
    TorchTrainer(_look_at_the_store, train_loop_config={"out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="rendezvous", storage_path=str(tmp_path / "runs")),
                 torch_config=BoundTorchConfig(backend="gloo", timeout_s=120)).fit()
    seen = json.loads(out.read_text())
    assert seen["listeners"] == [seen["master"]], seen  # not *:port, 0.0.0.0:port or [::]:port
    assert ray.is_initialized()
