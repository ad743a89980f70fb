"""Shared fixtures. Services started here are always stopped, even when a test fails."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def local_ray():
    """An embedded single-node Ray for tests of Ray Data jobs; shut down after the module."""
    import ray

    from cluster.runtime import connect

    os.environ.pop("RAY_ADDRESS", None)
    connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 with one bucket; the standard
    AWS_* variables point this process's clients at it while the session runs."""
    from cluster.local import object_store_env, start_object_store

    service, endpoint = start_object_store(tmp_path_factory.mktemp("object-store"), "bucket")
    saved = {name: os.environ.get(name) for name in object_store_env(endpoint)}
    os.environ.update(object_store_env(endpoint))
    try:
        yield "s3://bucket"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        service.stop()
