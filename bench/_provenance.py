"""What a recorded benchmark result was measured with: the commit, the machine and the library
versions, so that two files can be compared (or not) without guessing."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "deepspeed", "ray", "mlflow", "sentencepiece", "sacrebleu", "ctranslate2", "pyarrow")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    """git's HEAD, marked if the tree differs from it; AIAYN_COMMIT instead where it is set, for a
    copy of the tree whose .git is missing or stale (a device machine's copy read 3ad6751+uncommitted
    for b91265a's tree)."""
    if named := os.environ.get("AIAYN_COMMIT"):
        return named
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+uncommitted" if dirty else "")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance() -> dict:
    """For the `provenance` key of a benchmark's printed JSON."""
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"commit": _commit(), "cpu": _cpu_model(), "cpus": os.cpu_count(), "gpu": gpu,
            "python": platform.python_version(),
            "versions": {name: version for name in LIBRARIES if (version := _version(name))}}
