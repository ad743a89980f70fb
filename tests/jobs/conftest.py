"""Real services for the training tests: a two-node Ray cluster (`ray start` twice) and an
`mlflow server`, both on 127.0.0.1, started once per session and always stopped."""

from __future__ import annotations

import os

import pytest

from cluster.local import start_mlflow_server, start_ray_head, start_ray_worker, wait_for_nodes
from cluster.local_cluster import forget_current_cluster
from tests.data_pipeline.synthetic import write_parallel_corpus


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """Address of a 2-node Ray cluster; two CPUs per node."""
    logs = tmp_path_factory.mktemp("ray-logs")
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_AUTH_MODE"] = "token"  # the cluster below uses Ray's default token authentication
    head, address, _ = start_ray_head(logs, num_cpus=2)
    worker = None
    try:
        worker = start_ray_worker(logs, address, num_cpus=2, index=1)
        wait_for_nodes(address, 2, timeout=120, process=worker.process)
        yield address
    finally:
        import ray

        ray.shutdown()
        os.environ.pop("RAY_AUTH_MODE", None)
        if worker is not None:
            worker.stop()
        head.stop()
        forget_current_cluster(address)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    store = tmp_path_factory.mktemp("mlflow")
    service, url = start_mlflow_server(store / "logs", store)
    try:
        yield url
    finally:
        service.stop()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-corpus")
    return {
        "train": write_parallel_corpus(root, 800, seed=1, prefix="train"),
        "valid": write_parallel_corpus(root, 40, seed=2, prefix="valid"),
        "test": write_parallel_corpus(root, 30, seed=3, prefix="test"),
        "root": root,
    }
