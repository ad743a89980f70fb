"""Shared fixtures. Services started here are always stopped, even when a test fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.services import start_mlflow_server, start_ray_head, start_ray_worker, wait_for_nodes
from cluster.local_cluster import forget_current_cluster, ray_token
from tests.data_pipeline.synthetic import write_parallel_corpus

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu` tests run where CUDA is; elsewhere they are skipped with the reason in the summary."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def aiayn_home(tmp_path_factory):
    """The tests' own ~/.aiayn (the signing key, a cluster's state): never the account's."""
    home = tmp_path_factory.mktemp("aiayn-home")
    saved = os.environ.get("AIAYN_HOME")
    os.environ["AIAYN_HOME"] = str(home)
    yield home
    if saved is None:
        os.environ.pop("AIAYN_HOME", None)
    else:
        os.environ["AIAYN_HOME"] = saved


@pytest.fixture(scope="module")
def local_ray():
    """An embedded single-node Ray for tests of Ray Data jobs; shut down after the module."""
    import ray

    from cluster.ray_connection import connect

    os.environ.pop("RAY_ADDRESS", None)
    connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """The local cluster's S3 store (cluster/s3_store.py) on 127.0.0.1 with one bucket; the standard
    AWS_* variables point this process's clients at it, with its key, while the session runs."""
    from cluster.services import start_scratch_object_store

    service, variables = start_scratch_object_store(tmp_path_factory.mktemp("object-store"), "bucket")
    try:
        with pytest.MonkeyPatch.context() as patch:  # the session's own values come back afterwards
            for name, value in variables.items():
                patch.setenv(name, value)
            yield "s3://bucket"
    finally:
        service.stop()


# Real services for the training and fault tests: a two-node Ray cluster (`ray start` twice) and an
# `mlflow server`, both on 127.0.0.1, started once per session and always stopped.
@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """Address of a 2-node Ray cluster; two CPUs per node."""
    logs = tmp_path_factory.mktemp("ray-logs")
    os.environ.pop("RAY_ADDRESS", None)
    # The cluster below uses Ray's default token authentication with the account's token, as
    # `aiayn cluster up` does: made if this account has none (a fresh machine), and then removed
    # again. One token for the whole session: a Ray client keeps the first token it read.
    token = Path.home() / ".ray" / "auth_token"
    made_token = not token.exists()
    ray_token()
    os.environ["RAY_AUTH_MODE"] = "token"
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
        if made_token:
            token.unlink(missing_ok=True)


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


# The fault table: tests that inject a fault into a real run (tests/faults, and the cluster tests
# that lose or take away nodes) add a row once their assertions hold; it is printed at the end of
# the session (recorded in bench/results/).
ROWS: list[dict] = []
COLUMNS = ("fault", "injected", "at step", "outcome", "steps lost", "data lost")


@pytest.fixture
def fault_row():
    """Call with the row's cells once the test's assertions hold."""
    def add(**cells: str) -> None:
        ROWS.append({column: str(cells.get(column.replace(" ", "_"), "")) for column in COLUMNS})
    return add


def pytest_terminal_summary(terminalreporter) -> None:
    if not ROWS:
        return
    terminalreporter.write_sep("=", "fault table")
    terminalreporter.write_line("| " + " | ".join(COLUMNS) + " |")
    terminalreporter.write_line("|" + "---|" * len(COLUMNS))
    for row in ROWS:
        terminalreporter.write_line("| " + " | ".join(row[c] for c in COLUMNS) + " |")
