"""Where the cores go while `aiayn train` runs: CPU seconds of every process on the machine over a
window of steady-state steps, grouped into the training workers, our own actors, Ray Train's
actors, Ray's daemons, the driver and the rest. It explains the full stack's gap to the bare loop
(bench/training_stack.py): on a small machine every process beside the workers takes its share
of the cores the step would use.

    python bench/stack_cpu.py --data-dir data --workers 1 --from-step 20 --to-step 80
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from _provenance import provenance
from training_stack import train_command

TICKS = os.sysconf("SC_CLK_TCK")
STEP_LINE = re.compile(r"^step (\d+)/")
# process title (Ray names an actor's process ray::<Class>, truncated to 15 characters) -> group;
# the first group with a matching marker wins, so Ray's own agents come before the `ray::` of any
# other actor (Ray Train's controller, synchronisation, placement and dataset actors)
GROUPS = (
    ("training workers", ("ray::RayTrainWo",)),
    ("aiayn's actors (hang watchdog, console relay)", ("ray::ProgressMon", "ray::Relay")),
    ("Ray's daemons", ("raylet", "gcs_server", "dashboard", "log_monitor", "ray::DashboardA", "ray::RuntimeEn",
                       "runtime_env", "monitor.py")),
    ("Ray Train's and other actors", ("ray::",)),
    ("the driver (aiayn train)", ("jobs.cli",)),
)


def cpu_seconds() -> dict[int, tuple[float, str]]:
    """(user + system CPU seconds, title and command line) of every process now."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            title = Path(f"/proc/{entry}/comm").read_text().strip()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        found[int(entry)] = ((int(fields[11]) + int(fields[12])) / TICKS, f"{title} {command}"[:200])
    return found


def group_of(description: str) -> str:
    for group, markers in GROUPS:
        if any(marker in description for marker in markers):
            return group
    return "other processes on the machine"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data", help="where `aiayn prepare` put multi30k-en-de")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in all (default: the cores)")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--from-step", type=int, default=20, help="the window starts when this step is logged")
    parser.add_argument("--to-step", type=int, default=80, help="and ends when this one is")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        command = train_command("cpu-shares", str(Path(args.data_dir).resolve()), args.workers, args.threads,
                                args.to_step + 100, args.max_tokens, Path(scratch))
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        before = after = None
        try:
            for line in run.stdout:
                match = STEP_LINE.match(line)
                if match and int(match.group(1)) >= args.from_step and before is None:
                    before, started = cpu_seconds(), time.monotonic()
                if match and int(match.group(1)) >= args.to_step:
                    after, wall = cpu_seconds(), time.monotonic() - started
                    break
        finally:
            run.send_signal(signal.SIGINT)  # as a person's Ctrl-C: the driver stops the run and its Ray
            try:
                run.communicate(timeout=120)  # drains its output: a full pipe would block its shutdown
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        if before is None or after is None:
            raise SystemExit(f"the run ended before step {args.to_step} (exit {run.returncode})")
    groups: collections.Counter = collections.Counter()
    processes: collections.Counter = collections.Counter()
    for pid, (seconds, description) in after.items():
        used = seconds - before.get(pid, (0.0, ""))[0]
        if used > 0:
            groups[group_of(description)] += used
            processes[description.split(" ")[0]] += used
    total = sum(groups.values())
    print(json.dumps({
        "provenance": provenance(), "config": vars(args), "window_s": round(wall, 1),
        "cores_busy": round(total / wall, 2),
        "share_of_the_machine": {group: round(used / wall / (os.cpu_count() or 1), 3)
                                 for group, used in groups.most_common()},
        "cpu_seconds_by_process_title": {title: round(used, 2) for title, used in processes.most_common(25)},
    }, indent=1))


if __name__ == "__main__":
    main()
