"""A Ray node that shares no disk with the others: the `aiayn cluster up --isolated` simulation.

Each node runs in its own mount namespace (`unshare --mount`, root only) in which /tmp, $HOME and
the directory `up` was started from are new, empty tmpfs mounts. What a real cluster's nodes
share is kept visible: the Python environment (the virtual environment, the interpreter it was
made from, this project's packages: "the same image") and the compiled-extension cache (an image
would ship its ops prebuilt). Ray's token is copied into the node's private home, mode 0600, as a
secret would be mounted. Everything else a node writes stays in its namespace and disappears
with it: mounts die with the last process, so `down` leaves none behind.

Not simulated: separate network stacks (all nodes use 127.0.0.1, so Ray reports one node IP),
separate process tables, and /dev/shm, which Ray's object stores share as on one host.

Run as: unshare --mount --propagation private -- python -m cluster.isolation
            --private DIR ... --keep DIR ... [--token FILE] -- COMMAND ...
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

TOKEN = Path(".ray") / "auth_token"
PROJECT_PACKAGES = ("cluster", "data_pipeline", "jobs", "transformer")


def environment_paths() -> list[Path]:
    """What every node must see: the venv, its base interpreter, this project's packages and the
    torch extension cache. The packages are found, not imported: cluster/ depends on none of them."""
    packages = [Path(importlib.util.find_spec(name).origin).resolve().parent for name in PROJECT_PACKAGES]
    extensions = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    return [Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), *packages, extensions.resolve()]


def node_command(command: list[str], private: list[Path], token: Path | None) -> list[str]:
    """`command` wrapped so that it runs as an isolated node."""
    wrapper = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m", "cluster.isolation"]
    for directory in private:
        wrapper += ["--private", str(directory)]
    for directory in environment_paths():
        wrapper += ["--keep", str(directory)]
    if token is not None:
        wrapper += ["--token", str(token)]
    return [*wrapper, "--", *command]


def _under(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _mount(*args: str) -> None:
    subprocess.run(["mount", "--no-canonicalize", *args], check=True)


def isolate(private: list[Path], keep: list[Path], token: Path | None) -> None:
    """Inside the new mount namespace: cover `private` with empty tmpfs, bring back `keep`."""
    secret = token.read_bytes() if token is not None and token.is_file() else None
    keep = [k for k in keep if k.exists() and not any(other in k.parents for other in keep)]
    handles = {k: os.open(k, os.O_PATH) for k in keep}  # reach a directory after it is covered
    for directory in sorted(set(private), key=lambda p: len(p.parts)):
        if not any(_under(directory, other) for other in private if other != directory):
            directory.mkdir(parents=True, exist_ok=True)
            _mount("-t", "tmpfs", "-o", "mode=1777" if directory == Path("/tmp") else "mode=0755", "aiayn-node", str(directory))
    for directory in private:  # nested private dirs (cwd inside /tmp) exist, empty, in the new mount
        directory.mkdir(parents=True, exist_ok=True)
    for kept, handle in handles.items():
        if any(_under(kept, directory) for directory in private):
            kept.mkdir(parents=True, exist_ok=True)
            _mount("--bind", f"/proc/{os.getpid()}/fd/{handle}", str(kept))
        os.close(handle)
    if secret is not None:
        target = Path.home() / TOKEN
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secret)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.isolation")
    parser.add_argument("--private", action="append", default=[], type=Path)
    parser.add_argument("--keep", action="append", default=[], type=Path)
    parser.add_argument("--token", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    cwd = Path.cwd()
    isolate(args.private, args.keep, args.token)
    os.chdir(cwd)  # the new, empty mount (or a kept directory) at the same path
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
