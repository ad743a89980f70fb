"""Bad input fails with one line on stderr and exit status 2, before the driver contacts the cluster."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.jobs.helpers import tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tiny_corpus, ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-config")
    overrides = tiny_overrides(tiny_corpus, root, "bad", address=ray_cluster)
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", *overrides], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return overrides


@pytest.mark.parametrize("override, expected", [
    ("train.nope=1", "train.nope: unknown key"),
    ("train.zero_stage=4", "train.zero_stage must be 0, 1, 2 or 3"),
    ("stream.max_tokens=3", "stream.max_tokens=3"),
    ("cluster.storage_path=/etc/hostname/runs", "cluster.storage_path=/etc/hostname/runs: cannot write"),
])
def test_bad_config_fails_fast_with_one_line(prepared, override: str, expected: str) -> None:
    # Nothing listens at this address: a driver that contacted the cluster before its checks would
    # fail with a connection error (or hang until the timeout), not with the line expected.
    nowhere = "cluster.address=127.0.0.1:9"
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "train", *prepared, nowhere, override],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], done.stderr
