"""One-command set-up: a virtual environment with the right torch build, the project, then a command.

    python3 -m jobs.bootstrap -- aiayn train     # set up if needed, then run the main job
    python3 -m jobs.bootstrap -- pytest          # set up if needed, then run the test suite

Standard library only, because it runs before anything is installed. The torch build is chosen
before the project's dependencies are resolved: a plain `pip install torch` would pull several GB
of CUDA packages onto a machine that cannot use them. Machines with an NVIDIA GPU get pip's default
(CUDA) build; machines without get a CPU build, from a local wheelhouse if pip is configured with
one, else from PyTorch's CPU index. torch is never pinned. AIAYN_TORCH_SPEC overrides the choice
(for example "torch==2.6.0" or "torch --index-url URL").
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from data_pipeline.redaction import redact  # standard library only, like this script

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("AIAYN_VENV", ROOT / ".venv"))
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
STAMP = VENV / ".aiayn-installed"


def _say(message: str) -> None:
    print(f"[aiayn setup] {message}", file=sys.stderr, flush=True)


def _python() -> Path:
    return VENV / "bin" / "python"


def _pip(*args: str) -> None:
    subprocess.run([str(_python()), "-m", "pip", "install", "--quiet", *args], check=True)


def has_nvidia_gpu() -> bool:
    if Path("/proc/driver/nvidia/version").exists():
        return True
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def _torch_installed() -> bool:
    return subprocess.run([str(_python()), "-c", "import torch"], capture_output=True).returncode == 0


def install_torch() -> None:
    if _torch_installed():
        return
    if spec := os.environ.get("AIAYN_TORCH_SPEC"):
        _say(f"installing {redact(spec)} (AIAYN_TORCH_SPEC)")  # an index URL may carry a login
        _pip(*shlex.split(spec))
        return
    if has_nvidia_gpu():
        _say("NVIDIA GPU found: installing pip's default (CUDA) torch build")
        _pip("torch")
        return
    _say("no NVIDIA GPU: installing a CPU build of torch")
    local = subprocess.run(
        [str(_python()), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "torch"],
        capture_output=True,
    )
    if local.returncode == 0:
        _pip("torch")  # already satisfied: this only brings torch's own dependencies
    else:
        _pip("torch", "--index-url", CPU_INDEX)


def _project_fingerprint() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def ensure_environment() -> None:
    """Create the venv and install torch and the project, unless pyproject.toml is unchanged."""
    if not _python().exists():
        _say(f"creating virtual environment {VENV}")
        venv.create(VENV, with_pip=True)
    if STAMP.exists() and STAMP.read_text() == _project_fingerprint() and _torch_installed():
        return
    install_torch()
    _say("installing aiayn and its dependencies")
    _pip("-e", f"{ROOT}[test]")
    STAMP.write_text(_project_fingerprint())


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--":
        argv = argv[1:]
    ensure_environment()
    if not argv:
        _say(f"ready: {VENV}")
        return 0
    env = dict(os.environ, PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(VENV))
    command = [str(_python()), "-m", "pytest", *argv[1:]] if argv[0] == "pytest" else argv
    return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
