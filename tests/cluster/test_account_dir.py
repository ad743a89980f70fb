"""This account's directories under the shared temp dir: another account that takes the name
first gets nothing of ours; we never write into its directory."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from cluster.account_dir import account_dir
from data_pipeline.errors import InputError


@pytest.fixture
def shared_temp(monkeypatch) -> Path:
    """A temp dir like /tmp: everyone may create names in it (sticky)."""
    shared = Path(tempfile.mkdtemp(prefix="aiayn-shared-tmp-"))
    shared.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    yield shared
    subprocess.run(["rm", "-rf", str(shared)], check=True)


def test_a_fresh_directory_is_this_accounts_alone(shared_temp) -> None:
    made = account_dir("logs")
    assert made == shared_temp / f"aiayn-{os.getuid()}-logs"
    assert made.stat().st_uid == os.getuid() and stat.S_IMODE(made.stat().st_mode) == 0o700
    assert account_dir("logs") == made  # and used again as it is


def test_a_name_another_account_took_first_is_refused(shared_temp) -> None:
    squatted = shared_temp / f"aiayn-{os.getuid()}-logs"
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "mkdir", "-m", "777", str(squatted)],
                   check=True)
    with pytest.raises(InputError, match=f"{squatted}: .* must be its own with mode 0700 .*owner 65534"):
        account_dir("logs")
    assert list(squatted.iterdir()) == []  # nothing of ours went in
    loose = shared_temp / f"aiayn-{os.getuid()}-other"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)  # ours, but others may enter: made by something else
    with pytest.raises(InputError, match="mode 0o755"):
        account_dir("other")
