"""Telling one process from another across reused process ids and PID namespaces (containers)."""

from __future__ import annotations

import os
import re


def pid_namespace() -> str:
    """This process's PID namespace: a process id means something only inside its own."""
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))  # "pid:[4026531836]"
    except OSError:  # no /proc (not Linux): one namespace
        return "0"


def process_started(pid: int) -> str:
    """The process's start time (clock ticks since boot), so that a reused pid is not taken for
    the process that had it; empty when there is no such process here."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""
