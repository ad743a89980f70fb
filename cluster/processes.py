"""Telling one process from another across reused process ids and PID namespaces (containers)."""

from __future__ import annotations

import os
import re
from pathlib import Path


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


_LISTEN = "0A"  # the TCP state LISTEN in /proc/net/tcp


def listening_sockets(port: int) -> set[int]:
    """The inodes of the sockets listening on TCP `port` (any local address) in this network
    namespace: every account's, whether or not this one may see their processes."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def socket_holders(inodes: set[int]) -> dict[int, set[int]]:
    """inode -> the processes holding it open, among those this account may look into (another
    account's processes are not seen: their sockets have no holder here)."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    holders: dict[int, set[int]] = {inode: set() for inode in inodes}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:
            continue  # gone, or another account's
        for link in links:
            if link in wanted:
                holders[wanted[link]].add(int(fd_dir.parent.name))
    return holders
