"""Run one benchmark several times, each in a fresh process, and print every figure's median and
range across the runs: one run's rounds share a process (its allocator, thread pool and the
machine's state at that minute), so only separate runs show how far a figure moves.

The benchmark must print one JSON object on stdout (every script under bench/ does). Each numeric
figure outside its `config` and `provenance` keys is collected by its key path.

    python bench/repeat.py --runs 3 -- python bench/model_throughput.py --preset small --steps 4 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Iterator

from _provenance import provenance

NOT_FIGURES = ("config", "provenance")


def figures(result: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(key path, value) of every number in a benchmark's result, outside its config and provenance."""
    for key, value in result.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            if not (prefix == "" and key in NOT_FIGURES):
                yield from figures(value, f"{path}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield path, float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark's command line")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.runs < 2:
        parser.error("give --runs of at least 2, then -- and the benchmark's command line")

    runs = []
    for number in range(args.runs):
        print(f"run {number + 1}/{args.runs}: {' '.join(command)}", file=sys.stderr, flush=True)
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output[output.index("{"):]))
    values: dict[str, list[float]] = {}
    for run in runs:
        for path, value in figures(run):
            values.setdefault(path, []).append(value)
    print(json.dumps({
        "command": " ".join(command), "runs": args.runs,
        "figures": {path: {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}
                    for path, v in values.items() if len(v) == args.runs},
        "config": runs[0].get("config"), "provenance": provenance(),
    }, indent=2))


if __name__ == "__main__":
    main()
