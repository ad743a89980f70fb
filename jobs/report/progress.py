"""What a person sees while training: one aiayn line per log window, validation and checkpoint.

Rank 0 formats the lines and hands them to a small relay actor; the driver drains the relay and
prints them to the console and to the run's log file. Ray's own output (worker banners, report
dumps, DeepSpeed's messages) stays in Ray's logs: the driver connects with log_to_driver off.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, TextIO

from data_pipeline.storage import redact
from jobs.run.metric_names import (
    TRAIN_DATA_WAIT_S,
    TRAIN_LOSS,
    TRAIN_LR,
    TRAIN_MFU,
    TRAIN_PPL,
    TRAIN_TOKENS_PER_S,
    VALID_BLEU,
    VALID_LOSS,
    VALID_PPL,
)


def duration(seconds: float) -> str:
    """`3m07s`, `1h05m07s`: an ETA, a phase's share of a run."""
    minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def window_line(step: int, max_steps: int, metrics: dict[str, float], eta_s: float | None) -> str:
    """`step 120/450  loss 4.213  ppl 67.6  lr 1.80e-03  3,512 tok/s  MFU 3.1%  data 2 ms  ETA 9m12s`"""
    parts = [f"step {step}/{max_steps}" if max_steps else f"step {step}",
             f"loss {metrics[TRAIN_LOSS]:.3f}", f"ppl {metrics[TRAIN_PPL]:.1f}", f"lr {metrics[TRAIN_LR]:.2e}",
             f"{metrics[TRAIN_TOKENS_PER_S]:,.0f} tok/s"]
    if TRAIN_MFU in metrics:
        parts.append(f"MFU {100 * metrics[TRAIN_MFU]:.1f}%")
    parts.append(f"data {1000 * metrics[TRAIN_DATA_WAIT_S]:.0f} ms")
    if eta_s is not None:
        parts.append(f"ETA {duration(eta_s)}")
    return "  ".join(parts)


def validation_line(step: int, metrics: dict[str, float]) -> str | None:
    parts = []
    if VALID_LOSS in metrics:
        parts += [f"valid loss {metrics[VALID_LOSS]:.3f}", f"ppl {metrics[VALID_PPL]:.1f}"]
    if VALID_BLEU in metrics:
        parts.append(f"BLEU {metrics[VALID_BLEU]:.2f}")
    return f"step {step}  " + "  ".join(parts) if parts else None


class RankZeroReporter:
    """Rank 0's side: sends lines to the driver's relay (or prints them when there is none)."""

    def __init__(self, relay) -> None:
        self.relay = relay

    def line(self, text: str) -> None:
        if self.relay is None:
            print(text, flush=True)
        else:
            self.relay.put.remote(text)


class Console:
    """The driver's side: every line to the console and to the run's log file."""

    def __init__(self, log_path: Path | None = None, stream: TextIO | None = None) -> None:
        self.stream, self.log_path, self._log = stream or sys.stdout, log_path, None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = log_path.open("a", encoding="utf-8")

    def __call__(self, text: str) -> None:
        text = redact(text)  # a URI with credentials in it (s3://KEY:SECRET@bucket, a signed URL) never shows
        print(text, file=self.stream, flush=True)
        if self._log is not None:
            self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {text}\n")
            self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


@contextlib.contextmanager
def libraries_output_to(path: Path) -> Iterator[None]:
    """While the block runs, what libraries print in this process (Ray's `(raylet) ...` paragraphs
    about dead workers, MLflow's messages and progress bars, Python's warnings) goes to `path`
    instead of the terminal, which keeps aiayn's own lines (a Console holds the terminal's stream
    from before). Python's streams only: what native code writes to fd 1 and 2 stays. Restored
    on the way out, so that an error ending the block still shows where the user looks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = sys.stdout, sys.stderr
    with path.open("a", encoding="utf-8") as handle:
        sink = _Sink(handle, saved[1])
        sys.stdout = sys.stderr = sink
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved


class _Sink:
    """A stream to the libraries' log that a thread holding it after the block (a logging handler
    resolves sys.stderr as it writes) sees fall back to the terminal instead of a closed file."""

    def __init__(self, handle: TextIO, after: TextIO) -> None:
        self._handle, self._after = handle, after

    def _target(self) -> TextIO:
        return self._after if self._handle.closed else self._handle

    def write(self, text: str) -> int:
        return self._target().write(redact(text))  # a library may print a URI with its credentials

    def flush(self) -> None:
        self._target().flush()

    def __getattr__(self, name: str):  # fileno, isatty, encoding, ...: the file's while it is open
        return getattr(self._target(), name)


@contextlib.contextmanager
def relay_to(console: Console, poll_s: float = 1.0) -> Iterator[object]:
    """A relay actor whose lines `console` prints while the block runs; yields its handle."""
    import ray

    @ray.remote(num_cpus=0)
    class Relay:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def put(self, line: str) -> None:
            self.lines.append(line)

        def drain(self) -> list[str]:
            lines, self.lines = self.lines, []
            return lines

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's own node: the relay must outlive any other node leaving the cluster.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    relay = Relay.options(scheduling_strategy=here).remote()
    done = threading.Event()

    def follow() -> None:
        while True:
            stopping = done.wait(poll_s)
            try:
                for line in ray.get(relay.drain.remote(), timeout=30):
                    console(line)
            except Exception:  # noqa: BLE001 - the console never fails a run
                pass
            if stopping:
                return

    thread = threading.Thread(target=follow, name="aiayn-progress", daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        done.set()
        thread.join(timeout=35)
        ray.kill(relay)


def failure_lines(relay, max_failures: int):
    """A Ray Train callback (it runs in Train's controller) that puts one console line through the
    relay whenever the worker group fails, naming the rank and Ray's reason, before Train restarts
    it: Ray Train's own account stays in its logs, which the driver does not forward, and a
    restart would otherwise show only as `training from step N`."""
    from ray.train import UserCallback

    class FailureLines(UserCallback):
        def __init__(self) -> None:
            self.failures = 0

        def after_exception(self, run_context, worker_exceptions: dict) -> None:
            self.failures += 1
            rank, error = min(worker_exceptions.items(), key=lambda item: item[0])
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            detail = next((line for line in lines if "exit detail:" in line), lines[0] if lines else type(error).__name__)
            more = f" (and {len(worker_exceptions) - 1} other rank{'s' if len(worker_exceptions) > 2 else ''})" \
                if len(worker_exceptions) > 1 else ""
            relay.put.remote(redact(f"[aiayn] the worker group failed: rank {rank}{more}: {detail[:300]}; "
                                    f"Ray Train restarts it from the last checkpoint if failures remain "
                                    f"(failure {self.failures}, cluster.max_failures={max_failures})"))

    return FailureLines()
