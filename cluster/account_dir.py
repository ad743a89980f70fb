"""This account's own directory under the system temp dir, for what no other local account may
read, replace or plant: Ray's session directories and the checkpoint parts staged for upload."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from data_pipeline.errors import InputError


def account_dir(purpose: str = "") -> Path:
    """`<temp dir>/aiayn-<uid>[-<purpose>]`, made mode 0700 if missing. One that another account
    owns or may enter (or a link) is refused rather than used. A purpose of its own where another
    program may make the directory first: `ray start --temp-dir` makes the parents of its temp
    dir with the default mode, as on a node that never ran `aiayn cluster up`."""
    private = Path(tempfile.gettempdir()) / "-".join(filter(None, ("aiayn", str(os.getuid()), purpose)))
    with contextlib.suppress(FileExistsError):
        private.mkdir(mode=0o700)
    info = private.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise InputError(f"{private}: this account's directory for aiayn must be its own with mode 0700 (found owner "
                         f"{info.st_uid}, mode {oct(stat.S_IMODE(info.st_mode))}); remove it and start again")
    return private


def ray_temp_dir() -> Path:
    """The root of Ray's session directories for this account (`aiayn cluster up`'s nodes and the
    embedded Ray of `aiayn train`). Ray makes it and what is below it (the session, its logs, the
    jobs' unpacked code) mode 777, so it lies inside a directory of this account's alone. Short
    and under the system temp dir: Ray's Unix sockets live below it, and a socket's path has at
    most 107 bytes."""
    return account_dir() / "ray"
