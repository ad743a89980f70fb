"""The offline bundle holds an installable wheel of the project with its built-in corpus."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_bundle_builds_an_installable_project_wheel(tmp_path) -> None:
    out = tmp_path / "wheelhouse"
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "bundle", "--output", str(out), "--no-deps"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    wheels = list(out.glob("aiayn-*.whl"))
    assert len(wheels) == 1
    wheel = zipfile.ZipFile(wheels[0])
    names = wheel.namelist()
    # the main job's recipe, as a file (the source tree's link to configs/ followed): `aiayn train`
    # from an installed wheel needs no --config
    assert wheel.read("jobs/recipes/multi30k_small.yaml") == (ROOT / "configs" / "multi30k_small.yaml").read_bytes()
    for expected in ("transformer/model.py", "data_pipeline/stream.py", "jobs/cli.py", "cluster/launcher/aws.yaml",
                     "data_pipeline/corpora/multi30k/train.de.gz", "data_pipeline/corpora/multi30k/README.md"):
        assert expected in names, expected
    assert "--no-index --find-links" in (out / "INSTALL.txt").read_text()
