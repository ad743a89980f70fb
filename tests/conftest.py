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
