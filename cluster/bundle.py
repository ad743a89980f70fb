"""An offline bundle: a wheelhouse of the project and every dependency, for nodes without internet.

    aiayn bundle --output wheelhouse/          # on a machine with access to the package index
    pip install --no-index --find-links wheelhouse/ aiayn     # on the offline node
The torch wheel included is the one this machine resolves (CPU here, CUDA on a GPU machine), so
build the bundle on a machine of the kind the nodes are.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cluster import PROJECT_ROOT

INSTALL_NOTE = """Offline install of aiayn (built by `aiayn bundle`):

    python3 -m venv .venv && .venv/bin/pip install --no-index --find-links {here} aiayn
"""


def build_wheelhouse(output: Path, *, with_dependencies: bool = True) -> list[Path]:
    """Wheels of the project (and, unless told otherwise, of all its dependencies) in `output`."""
    output.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(output), str(PROJECT_ROOT)]
    if not with_dependencies:
        command.insert(4, "--no-deps")
    subprocess.run(command, check=True)
    (output / "INSTALL.txt").write_text(INSTALL_NOTE.format(here=output.resolve()))
    return sorted(output.glob("*.whl"))
