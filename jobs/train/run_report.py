"""What a run tells a person and its MLflow record, in one place: `RunReport` on the driver,
`RankReport` in the workers.

A person reads the console (stdout and the run's log file, `progress.Console`); the workers' lines
reach it through the relay. MLflow gets, from rank 0, the training metrics and tags (sent in the
background, their backlog kept in each checkpoint) and, from the driver, a hang's stacks, the end
of the run (metrics the workers could not send, the test scores, the artifacts, the model) and the
time ledger. MLflow failing never fails a run: each failure becomes one console line that says
what is not in MLflow and where it is instead.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from data_pipeline import storage
from data_pipeline.errors import InputError
from data_pipeline.manifest import Manifest
from jobs import checkpoint as ckpt
from jobs.inference.scores import Scores
from jobs.report import progress
from jobs.report.goodput import GoodputLedger
from jobs.run.config import JobConfig, public_config
from jobs.run.layout import RunLayout
from jobs.run.metric_names import TRAIN_LOSS, TRAIN_STEP_TIME_S
from jobs.train.cadence import Cadence
from jobs.train.start import Start

if TYPE_CHECKING:  # MLflow is imported only once something is reported: config errors come first
    from jobs.report.tracking import MetricLogger


@dataclass(frozen=True)
class TrainOutcome:
    run_name: str
    run_id: str
    tracking_uri: str
    export_uri: str  # <storage>/<run name>/export: a local path or an object-store URI
    steps: int
    tokens: int = 0  # target tokens trained on, over every restart
    train_seconds: float = 0.0  # training time, over every restart
    best_valid_loss: float | None = None
    log_path: str = ""  # the console's copy: aiayn's lines of this run
    test: Scores | None = None  # BLEU and chrF of the export on the test split
    model_uri: str = ""  # the export as an MLflow model (models:/NAME/VERSION when registered)
    samples: tuple[tuple[str, str, str], ...] = ()  # (source, reference, hypothesis)
    time_table: str = ""  # where the run's time went (jobs/report/goodput.py)
    mlflow_lacks: tuple[str, ...] = ()  # what MLflow did not take at the end (its server did not answer)


class RankReport:
    """A worker's report. Rank 0's sends lines to the driver's relay (the console and the run's log)
    and metrics and tags to MLflow; every other rank's takes the same calls and does nothing, so
    the loop reports without asking which rank it is."""

    def __init__(self, lines: progress.RankZeroReporter | None = None, metrics: MetricLogger | None = None,
                 fence: Callable[[str], None] | None = None):
        """`fence(what)` raises once the run's lease is lost, checked before each window's metrics."""
        self._lines, self._metrics, self._fence = lines, metrics, fence
        self._rank_rows: list[str] = []  # the per-rank table's rows (`rank_figures`)

    @classmethod
    def to_run(cls, relay, tracking_uri: str, run_id: str, pending_metrics: list | None = None,
               fence: Callable[[str], None] | None = None) -> RankReport:
        """A report that is delivered, sending first what a checkpoint had not sent."""
        from jobs.report.tracking import MetricLogger

        lines = progress.RankZeroReporter(relay)
        metrics = MetricLogger(tracking_uri, run_id, say=lines.line)
        metrics.restore_spool(pending_metrics or [])
        return cls(lines, metrics, fence)

    @classmethod
    def of_rank(cls, rank: int, relay, tracking_uri: str, run_id: str, pending_metrics: list,
                fence: Callable[[str], None] | None = None) -> RankReport:
        """Rank 0's report is delivered; every other rank's is silent."""
        return cls.to_run(relay, tracking_uri, run_id, pending_metrics, fence) if rank == 0 else cls()

    @property
    def active(self) -> bool:
        """Whether anything reported is delivered (rank 0): for work done only to be reported."""
        return self._metrics is not None

    def line(self, text: str) -> None:
        if self._lines is not None:
            self._lines.line(text)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._metrics is not None:
            self._metrics.log(metrics, step)

    def set_tags(self, tags: dict) -> None:
        if self._metrics is not None:
            self._metrics.set_tags(tags)

    def started(self, start: Start, world: int, zero_stage: int, nodes: list[str], accumulation: int,
                peak: tuple[float, str]) -> None:
        """What this attempt is: tags (each rank's node, world size, ZeRO stage, any resume or
        resize) and the first console line. `peak`: (FLOP/s per worker, where it comes from)."""
        peak_flops, peak_source = peak
        self.set_tags({"world_size": world, "zero_stage": zero_stage, "peak_flops_source": peak_source,
                       **{f"node.rank{rank}": node for rank, node in enumerate(nodes)}})
        if start.resumed_from_step is not None:
            self.set_tags({"resumed_from_step": start.resumed_from_step})
        resize = start.resize(world)
        if resize is not None:
            self.set_tags({f"resize.step{start.state.step:08d}": resize})
            self.line(f"step {start.state.step}  resized: {resize}")
        begins = "from scratch" if start.resumed_from_step is None else f"from step {start.resumed_from_step}"
        self.line(f"training {begins} on {_count(world, 'worker')} (ZeRO-{zero_stage}, {_count(len(set(nodes)), 'node')}, "
                  f"{_count(accumulation, 'micro-batch', 'es')} per step, peak {peak_flops / 1e12:.2f} "
                  f"TFLOP/s per worker: {peak_source})")

    def publish(self, step: int, metrics: dict[str, float], cadence: Cadence, elapsed_s: float) -> None:
        """A log window's or a validation's metrics to MLflow and their lines to the console."""
        if not (self.active and metrics):
            return
        if self._fence is not None:
            self._fence(f"the metrics of step {step}")
        self.log(metrics, step)
        if TRAIN_LOSS in metrics:
            eta = cadence.eta_s(step, elapsed_s, metrics[TRAIN_STEP_TIME_S])
            self.line(progress.window_line(step, cadence.train.max_steps, metrics, eta))
        line = progress.validation_line(step, metrics)
        if line:
            self.line(line)

    def unsent(self) -> list[dict]:
        """The metrics not yet known to be in MLflow, for the checkpoint to keep."""
        return self._metrics.spool() if self._metrics is not None else []

    def rank_figures(self, step: int, own_ms: list[float | None], nodes: list[str],
                     system: list[dict[str, float] | None]) -> None:
        """Every rank's own time and every node's system figures in the log window ending at
        `step`: the per-rank table that the metrics summarise (`rank_time_metrics`, `node_metrics`),
        sent at the attempt's end."""
        if self._metrics is None:
            return
        for rank, (ms, node, figures) in enumerate(zip(own_ms, nodes, system)):
            if ms is not None:
                self._rank_rows.append(f"{step},{rank},{node},own_ms_per_ktok,{ms:.3f}\n")
            self._rank_rows.extend(f"{step},{rank},{node},{key},{value:.3f}\n" for key, value in (figures or {}).items())

    def close(self, timeout_s: float) -> int:
        """Send what is queued for up to `timeout_s`, and the per-rank table of this attempt's
        steps (`ranks/figures.steps<first>-<last>.csv`); the number of values still unsent."""
        if self._metrics is None:
            return 0
        if self._rank_rows:
            first, last = (row.split(",", 1)[0] for row in (self._rank_rows[0], self._rank_rows[-1]))
            try:
                self._metrics.client.log_text(self._metrics.run_id, "step,rank,node,figure,value\n" + "".join(
                    self._rank_rows), f"ranks/figures.steps{first}-{last}.csv")
            except Exception as error:  # noqa: BLE001 - tracking never fails a run
                self.line(f"the per-rank table of steps {first}-{last} is not in MLflow ({type(error).__name__})")
        return self._metrics.close(timeout_s=timeout_s)


class RunReport:
    def __init__(self, console: Callable[[str], None], tracking_uri: str, run_id: str, layout: RunLayout):
        self.console, self.tracking_uri, self.run_id, self.layout = console, tracking_uri, run_id, layout
        self.unsent: list[str] = []  # what MLflow did not take at the end; a rerun of the run sends it

    def hang(self, line: str, stacks: str) -> None:
        """What the watchdog says; a hang's stacks go to <run>/hangs/ and MLflow."""
        self.console(line)
        if not stacks:
            return
        name = f"hang-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        uri = self.layout.hang_stacks_uri(name)
        storage.write_bytes_atomic(uri, stacks.encode())
        self.console(f"the stacks of every rank: {storage.redact(uri)}")
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(self.tracking_uri).log_text(self.run_id, stacks, f"hangs/{name}")
        except Exception as error:  # noqa: BLE001 - tracking never fails a run
            self.console(f"MLflow did not take the stacks ({first_line(error)}); they are in {storage.redact(uri)}")

    @contextlib.contextmanager
    def ended_on_failure(self, still_ours: Callable[[], bool]) -> Iterator[None]:
        """Whatever stops the run in this block marks its MLflow run ended (KILLED for an interrupt,
        else FAILED) and says in one line how to go on, unless another driver owns the run now."""
        try:
            yield
        except BaseException as error:
            if still_ours():
                self._stopped(error)
            raise

    def _stopped(self, error: BaseException) -> None:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(self.tracking_uri).set_terminated(self.run_id, status)
            marked = f"its MLflow run is marked {status}"
        except Exception as tracking_error:  # noqa: BLE001 - the run's own error is what the user must see
            marked = (f"its MLflow run could not be marked {status} ({first_line(tracking_error)}; "
                      f"`aiayn end --name {self.layout.name}` does it)")
        how_on = "fix what it names, then" if isinstance(error, InputError) else "once the cause is gone,"
        self.console(f"run {self.layout.name} stopped ({first_line(error)}); {marked}; {how_on} the same command "
                     "resumes it from its newest checkpoint")

    def results(self, job: JobConfig, outcome: TrainOutcome, manifest: Manifest, export_dir: Path,
                pending_metrics: list, checkpoint_uri: str) -> str:
        """Send what the workers could not (an outage at the end), the artifacts and the model;
        returns the model's URI. MLflow being down now costs the artifacts of this run, not the
        run: the export is in storage already."""
        from jobs.report.tracking import END_OF_RUN_WAIT_S, MetricLogger

        logger = MetricLogger(self.tracking_uri, self.run_id)
        logger.restore_spool(pending_metrics)
        if logger.close(timeout_s=END_OF_RUN_WAIT_S):
            self.console(f"some metrics of this run are not in MLflow; they are kept in "
                         f"{storage.redact(checkpoint_uri)}/{ckpt.JOB_STATE}")
            self.unsent.append("metrics")
        try:
            self._artifacts(job, outcome, manifest, export_dir)
            from jobs.inference.model_registry import log_translation_model

            return log_translation_model(self.tracking_uri, self.run_id, export_dir, outcome.test,
                                         job.tracking.registered_model)
        except Exception as error:  # noqa: BLE001 - tracking never fails a finished run
            self.console(f"logging the artifacts and the model to MLflow failed ({first_line(error)}); the export "
                         f"is at {storage.redact(outcome.export_uri)}, not logged as an artifact")
            self.unsent.append("the artifacts and the model")
            return ""

    def ledger(self, ledger: GoodputLedger, step: int) -> None:
        """The whole run's time ledger and its table, then the run marked finished. The ledger goes
        in at the last step even where a worker logged its own there (a run bounded by epochs
        learns that a step was its last only after it): a later value at the same step is what
        MLflow shows."""
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        try:
            client = MlflowClient(self.tracking_uri)
            client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step)
                                                   for key, value in ledger.metrics().items()])
            client.log_dict(self.run_id, {**ledger.to_dict(), "table": ledger.table()}, "goodput.json")
            client.set_terminated(self.run_id, "FINISHED")
        except Exception as error:  # noqa: BLE001 - tracking never fails a finished run
            self.console(f"logging the end of the run to MLflow failed ({first_line(error)}); the run's time "
                         "ledger (in this run's log) and its end are not in MLflow")
            self.unsent.append("the time ledger and the run's end")

    def _artifacts(self, job: JobConfig, outcome: TrainOutcome, manifest: Manifest, export_dir: Path) -> None:
        from mlflow.entities import Metric, RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            (folder / "resolved_config.json").write_text(json.dumps(public_config(job), indent=2))
            (folder / "data_manifest.json").write_text(json.dumps(storage.redact_tree(manifest.data), indent=2))
            if outcome.samples:
                (folder / "sample_translations.txt").write_text("\n\n".join(
                    f"SRC {s}\nREF {r}\nHYP {h}" for s, r, h in outcome.samples) + "\n")
            client.log_artifacts(self.run_id, str(folder))
        client.log_artifacts(self.run_id, str(export_dir), "export")
        if outcome.test is not None:
            now = int(time.time() * 1000)
            client.log_batch(self.run_id,
                             metrics=[Metric(key, value, now, outcome.steps)
                                      for key, value in outcome.test.metrics("test").items()],
                             tags=[RunTag("bleu_signature", outcome.test.bleu_signature),
                                   RunTag("chrf_signature", outcome.test.chrf_signature)])


def _count(number: int, noun: str, plural_ending: str = "s") -> str:
    return f"{number} {noun}{plural_ending if number != 1 else ''}"


def first_line(error: BaseException) -> str:
    """An error in one console line: its type (a refusal and a bug read differently) and message."""
    return storage.redact(f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}")
