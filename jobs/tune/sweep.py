"""`aiayn tune`: a Ray Tune sweep in which every trial is an aiayn training run.

Each trial runs `jobs.train.driver.train` on the cluster: its own worker group under ZeRO, its own
run name (`<sweep>-<trial id>`), lease, checkpoints and export, and an MLflow run that is a child
of the sweep's run. Ray Train's callback for Tune (`TuneReportCallback`, jobs/tune/callbacks.py)
hands what the workers report with each checkpoint (the validation metrics among them) to Tune,
whose scheduler (ASHA, or FIFO: none) stops the weak trials early. The sweep's MLflow run keeps the search space, the
scheduler, a table of the trials and the best one; with `tracking.registered_model` the best
trial's model is registered.

The sweep survives its driver: Tune keeps its state under `<cluster.storage_path>/sweeps/<name>`,
and `aiayn tune --name NAME` again restores it: finished trials are kept, unfinished ones start
again, and each of those is `train` of the same run name, which resumes from its checkpoints
exactly as a rerun of `aiayn train` does; the MLflow parent is found again by its name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cluster.credentials import aiayn_home, check_own_tree, private_dir
from data_pipeline import storage
from data_pipeline.config import check_name
from data_pipeline.errors import InputError
from jobs.run.config import ConfigError, JobConfig, with_values
from jobs.tune.spaces import Search

METRICS = {"valid/loss": "min", "valid/bleu": "max"}  # what a trial reports with its checkpoints
SCHEDULERS = ("asha", "fifo")
SWEEP_TAG = "aiayn.sweep"
# What a trial's own process (its driver) asks Tune for: next to nothing (Tune refuses none at all);
# its worker group is what takes the cluster.
TRIAL_CPU = 0.01


@dataclass(frozen=True)
class SweepPlan:
    name: str
    base: JobConfig  # every trial's config but the searched keys
    searches: tuple[Search, ...]
    trials: int  # samples of the space (each grid point that many times)
    scheduler: str
    metric: str
    concurrent: int  # trials at once; 0: as many as the cluster's CPUs (or GPUs) hold

    @property
    def mode(self) -> str:
        return METRICS[self.metric]


def plan_sweep(base: JobConfig, searches: list[Search], *, name: str, trials: int, scheduler: str, metric: str,
               concurrent: int) -> SweepPlan:
    """Every check a sweep makes before Ray: the options, and each trial's config at every edge of
    every space (a bad key or value is one line naming the --search)."""
    if not name:
        raise InputError("aiayn tune needs --name: the sweep's name, under which it is resumed")
    try:
        check_name(name, "--name")
    except ValueError as error:
        raise InputError(str(error)) from None
    if not searches:
        raise InputError("aiayn tune needs at least one --search KEY=SPACE")
    for search in searches:
        for value in search.extremes():
            try:
                with_values(base, {search.key: value})
            except ConfigError as error:
                raise InputError(f"--search {search.text}: {error}") from None
    if metric not in METRICS:
        raise InputError(f"--metric {metric}: use {' or '.join(METRICS)}")
    if scheduler not in SCHEDULERS:
        raise InputError(f"--scheduler {scheduler}: use {' or '.join(SCHEDULERS)}")
    if trials < 1 or concurrent < 0:
        raise InputError("--trials must be at least 1 and --concurrent 0 (as many as fit) or more")
    train = base.train
    if not (train.validate_every and train.checkpoint_every_steps
            and train.checkpoint_every_steps % train.validate_every == 0):
        raise InputError(f"{metric} reaches the scheduler with each checkpoint: set train.checkpoint_every_steps "
                         f"to a multiple of train.validate_every (now {train.checkpoint_every_steps} and "
                         f"{train.validate_every})")
    if metric == "valid/bleu" and not (train.bleu_every and not train.bleu_in_background
                                       and train.checkpoint_every_steps % train.bleu_every == 0):
        raise InputError("--metric valid/bleu: set train.bleu_every to a divisor of train.checkpoint_every_steps "
                         "and train.bleu_in_background=false, so that each checkpoint reports it")
    if scheduler == "asha" and not train.max_steps:
        raise InputError("--scheduler asha stops trials by step: set train.max_steps")
    return SweepPlan(name, base, tuple(searches), trials, scheduler, metric, concurrent)


def trial_job(base: JobConfig, values: dict[str, Any], sweep: str, trial_id: str, parent_run: str) -> JobConfig:
    """A trial's run: the searched values, its own name, the sweep's run as its MLflow parent, and
    no registration (the sweep registers its best trial's model)."""
    job = with_values(base, values)
    tracking = dataclasses.replace(job.tracking, parent_run=parent_run, registered_model="")
    return dataclasses.replace(job, name=f"{sweep}-{trial_id}", tracking=tracking)


def _trial(values: dict[str, Any], base: JobConfig, sweep: str, parent_run: str, metric: str) -> None:
    """One trial, in a Tune trial's process: an aiayn training run reporting to Tune."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from jobs.train.driver import train
    from jobs.tune.callbacks import ReportsBeforeTheEnd

    job = trial_job(base, values, sweep, tune.get_context().get_trial_id(), parent_run)
    outcome = train(job, callbacks=(ReportsBeforeTheEnd(metric, job.train.max_steps or float("inf")),))
    history = MlflowClient(outcome.tracking_uri).get_metric_history(outcome.run_id, metric)
    final = {metric: history[-1].value} if history else {}
    tune.report({"step": outcome.steps, **final, "run_id": outcome.run_id, "export_uri": outcome.export_uri})


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    values: dict[str, Any]
    status: str  # finished, stopped early at step N, failed
    step: int
    value: float | None  # the metric's last value
    run_id: str
    export_uri: str


def run_sweep(plan: SweepPlan, say: Callable[[str], None] = print) -> list[TrialRow]:
    """Run (or resume) the sweep on the connected cluster; its trials, best first."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from cluster.ray_connection import connect
    from data_pipeline.prepare import run_prepare
    from jobs.report.tracking import find_or_create_run, request_budget, resolve_tracking_uri
    from jobs.run.layout import RunLayout
    from jobs.train.driver import validate, with_absolute_paths
    from jobs.tune.callbacks import TrialLines

    base = with_absolute_paths(plan.base)
    data_plan, manifest = validate(base, RunLayout.of(base.cluster, plan.name))
    root = _state_root(base)
    state = root / plan.name
    if state.exists():
        check_own_tree(state)  # Tune restores a sweep by unpickling its state
    connect(base.cluster.address)
    if manifest is None:  # once, here: trials started together would each prepare it
        say(f"preparing {storage.redact(base.data.dataset_uri)} ...")
        run_prepare(data_plan)
    tracking_uri = resolve_tracking_uri(base.tracking.uri)
    with request_budget(base.tracking.environment()):
        parent, created = find_or_create_run(tracking_uri, base.tracking.experiment, plan.name, {
            **{f"search.{s.key}": s.text.split("=", 1)[1] for s in plan.searches},
            "scheduler": plan.scheduler, "metric": plan.metric, "trials": plan.trials}, {SWEEP_TAG: plan.name})
    say(f"sweep {plan.name}: MLflow run {parent} ({'new' if created else 'continued'})")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own tables and banners off: TrialLines says it
    # The store as resolved here: a trial works in a directory of Tune's, where the default ./mlruns
    # would be a store of its own that no one looks at.
    in_trials = dataclasses.replace(base, tracking=dataclasses.replace(base.tracking, uri=tracking_uri))
    trial = tune.with_parameters(_trial, base=in_trials, sweep=plan.name, parent_run=parent, metric=plan.metric)
    trainable = tune.with_resources(trial, {"CPU": TRIAL_CPU})
    space = {search.key: search.domain() for search in plan.searches}
    if tune.Tuner.can_restore(str(state)):
        say(f"sweep {plan.name}: resuming: finished trials are kept, the others continue from their checkpoints")
        tuner = tune.Tuner.restore(str(state), trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=space)
    else:
        at_once = plan.concurrent or _fits(base)  # the generator itself holds the rest back, in its order
        tuner = tune.Tuner(trainable, param_space=space, tune_config=tune.TuneConfig(
            num_samples=plan.trials, metric=plan.metric, mode=plan.mode, scheduler=_scheduler(plan),
            search_alg=BasicVariantGenerator(random_state=base.train.seed, max_concurrent=at_once),
            reuse_actors=False),  # a stopped trial's process ends, and its training with it
            run_config=tune.RunConfig(name=plan.name, storage_path=str(root), verbose=0, callbacks=[
                TrialLines(plan.name, plan.metric, plan.scheduler, tracking_uri, base.tracking.experiment,
                           base.tracking.environment())]))
    grid = tuner.fit()
    rows = sorted((_row(result, plan) for result in grid), key=lambda row: _rank(row, plan.mode))
    with request_budget(base.tracking.environment()):
        _record(rows, plan, tracking_uri, parent, say)
    return rows


def _state_root(job: JobConfig) -> Path:
    """Where Ray Tune keeps the sweeps of `job`'s storage: in this account's private aiayn home on
    the driver's machine, never in the storage others may share, since Tune pickles its state and
    restores a sweep by unpickling it (a submitted sweep's driver runs on the head node)."""
    storage_key = hashlib.sha256(job.cluster.storage_path.encode()).hexdigest()[:12]
    return private_dir(private_dir(private_dir(aiayn_home()) / "sweeps") / storage_key)


def _scheduler(plan: SweepPlan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if plan.scheduler == "fifo":
        return FIFOScheduler()
    train = plan.base.train
    # stop_last_trials=False: a trial at max_t ends as its run does (export, test scores), not killed there
    return ASHAScheduler(time_attr="step", max_t=train.max_steps, grace_period=train.checkpoint_every_steps,
                         reduction_factor=2, stop_last_trials=False)


def _fits(job: JobConfig) -> int:
    """How many trials' worker groups the cluster holds at once."""
    import ray

    have = ray.cluster_resources()
    if job.cluster.use_gpu:
        return max(1, int(have.get("GPU", 0) // job.cluster.num_workers))
    return max(1, int(have.get("CPU", 0) // (job.cluster.num_workers * job.cluster.cpus_per_worker)))


def _row(result, plan: SweepPlan) -> TrialRow:
    last = result.metrics or {}
    values = {search.key: result.config.get(search.key) for search in plan.searches}
    if result.error is not None:
        status = "failed"
    elif last.get("run_id"):
        status = "finished"
    else:
        status = f"stopped early at step {last.get('step', 0)}"
    return TrialRow(last.get("trial_id", result.path.rsplit("/", 1)[-1]), values, status, int(last.get("step", 0)),
                    last.get(plan.metric), last.get("run_id", ""), last.get("export_uri", ""))


def _rank(row: TrialRow, mode: str) -> tuple:
    if row.value is None:
        return (1, 0.0)
    return (0, row.value if mode == "min" else -row.value)


def _record(rows: list[TrialRow], plan: SweepPlan, tracking_uri: str, parent: str, say: Callable[[str], None]) -> None:
    """The sweep's table on the console and in its MLflow run; the best trial's model registered."""
    from mlflow.tracking import MlflowClient

    keys = [search.key for search in plan.searches]
    header = ["trial", *keys, plan.metric, "step", "status"]
    table = [[row.trial_id, *(row.values[key] for key in keys),
              "" if row.value is None else f"{row.value:.4f}", row.step, row.status] for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *table)]
    for line in [header, *table]:
        say("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))
    client = MlflowClient(tracking_uri)
    client.log_text(parent, "\n".join(",".join(str(cell) for cell in line) for line in [header, *table]) + "\n",
                    "trials.csv")
    best = next((row for row in rows if row.status == "finished"), None)
    if best is None:
        say(f"sweep {plan.name}: no trial finished")
        client.set_terminated(parent, "FAILED")
        return
    client.set_tag(parent, "best_trial", best.trial_id)
    client.set_tag(parent, "best_run_id", best.run_id)
    for key, value in best.values.items():
        client.set_tag(parent, f"best.{key}", str(value))
    client.log_metric(parent, f"best/{plan.metric}", best.value)
    say(f"sweep {plan.name}: best trial {best.trial_id} ({plan.metric} {best.value:.4f}), export {best.export_uri}")
    if plan.base.tracking.registered_model:
        from jobs.inference.model_registry import log_translation_model

        uri = log_translation_model(tracking_uri, best.run_id, Path(best.export_uri), None,
                                    plan.base.tracking.registered_model)  # logged by the trial: registered here
        say(f"sweep {plan.name}: the best trial's model is {uri}")
    client.set_terminated(parent, "FINISHED")
