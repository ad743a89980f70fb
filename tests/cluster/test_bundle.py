"""The offline bundle holds an installable wheel of the project with its built-in corpus."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.slow


def test_bundle_builds_an_installable_project_wheel(tmp_path) -> None:
    out = tmp_path / "wheelhouse"
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "bundle", "--output", str(out), "--no-deps"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    wheels = list(out.glob("aiayn-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    for expected in ("transformer/model.py", "data_pipeline/stream.py", "jobs/cli.py", "cluster/launcher/aws.yaml",
                     "data_pipeline/corpora/multi30k/train.de.gz", "data_pipeline/corpora/multi30k/README.md"):
        assert expected in names, expected
    assert "--no-index --find-links" in (out / "INSTALL.txt").read_text()
