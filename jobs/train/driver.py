"""`aiayn train`: validate, prepare if needed, run Ray Train's TorchTrainer, export, score.

Everything that can be checked without a cluster is checked first, so bad input fails in
seconds with one line and before any worker starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import posixpath
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import yaml

from data_pipeline import storage
from data_pipeline.batching import longest_example
from data_pipeline.errors import InputError
from data_pipeline.manifest import Manifest, load_manifest, verify_dataset
from data_pipeline.prepare import PreparePlan, plan_prepare, run_prepare
from jobs import checkpoint as ckpt
from jobs.inference.evaluation import open_translator, score_split
from jobs.inference.export import INFO, export_model
from jobs.report.goodput import GoodputLedger
from jobs.report.progress import Console, failure_lines, libraries_output_to, relay_to
from jobs.run.config import JobConfig, config_to_dict, flatten, public_config
from jobs.run.layout import RunLayout
from jobs.run.lease import LeaseKeeper, LeaseLost, acquire
from jobs.train.cpu_allocator import worker_environment
from jobs.train.deepspeed_config import with_step_budget
from jobs.train.launch import Launch
from jobs.train.run_report import RunReport, TrainOutcome
from jobs.train.watchdog import HangPolicy, collective_timeout_s, watch_progress


def run_name(job: JobConfig) -> str:
    """The given name, else one derived from the resolved config: the same command, the same run."""
    if job.name:
        return job.name
    digest = hashlib.sha256(json.dumps(config_to_dict(job), sort_keys=True).encode()).hexdigest()[:8]
    return f"{job.data.dataset_name}-{digest}"


def _check_budget(job: JobConfig, manifest: Manifest) -> None:
    """Refuse a batch budget that most training sentences cannot fit into."""
    uri, _ = manifest.shard_uris("train")[0]
    fs, path = storage.filesystem(uri)
    columns = ["src_len"] + ([] if manifest.monolingual else ["tgt_len"])
    table = pq.read_table(path, filesystem=fs, columns=columns)
    longest = np.max([table.column(c).to_numpy() for c in columns], axis=0)
    limit = longest_example(job.stream.max_tokens, job.model.max_positions)
    if manifest.monolingual:
        if job.stream.packed_length > limit:
            raise InputError(f"stream.packed_length={job.stream.packed_length} exceeds the budget or model.max_positions ({limit})")
        return
    if float(np.mean(longest > limit)) > 0.5:
        raise InputError(
            f"stream.max_tokens={job.stream.max_tokens} (or model.max_positions={job.model.max_positions}) is smaller "
            f"than most sentences (median {int(np.median(longest))} tokens); raise stream.max_tokens"
        )


def shared_locations(job: JobConfig, tracking_uri: str) -> dict[str, str]:
    """What every node must reach: checkpoints, data and (if it lives in files) the MLflow store."""
    locations = {"cluster.storage_path": job.cluster.storage_path, "data.output_dir": job.data.output_dir}
    from jobs.report.tracking import local_store_dir  # MLflow, after the checks

    store = local_store_dir(tracking_uri)
    if store is not None:
        locations["tracking.uri"] = store
    return locations


def validate(job: JobConfig, layout: RunLayout) -> tuple[PreparePlan, Manifest | None]:
    """Every check that needs no cluster. Raises InputError / ConfigError with one line.

    Returns the data plan (one pass over the inputs' checksums) for the caller to act on, and the
    dataset, opened and verified once, when it is prepared already."""
    layout.check_writable()
    plan, manifest = plan_prepare(job.data), None
    if plan.up_to_date:
        manifest = load_manifest(job.data.dataset_uri)
        verify_dataset(manifest)  # a changed or corrupted shard: refused before any resource is taken
        _check_budget(job, manifest)
    if job.train.precision == "fp16" and not job.cluster.use_gpu:
        raise InputError("train.precision=fp16 needs GPUs (cluster.use_gpu=true); use bf16 or fp32 on CPU")
    return plan, manifest


def _trainer(launch: Launch, callbacks: tuple = ()):
    # Ray Train, and what builds on it, only once the checks have passed: bad input answers sooner.
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.train.checkpoint_bleu import validation_config
    from jobs.train.rendezvous import BoundTorchConfig
    from jobs.train.worker import train_loop_per_worker

    job, layout = launch.job, launch.layout
    cluster = job.cluster
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cluster.poll_interval_s)  # read by Train's controller
    scaling = ScalingConfig(
        num_workers=(cluster.min_workers, cluster.num_workers) if cluster.elastic else cluster.num_workers,
        elastic_resize_monitor_interval_s=cluster.resize_check_s, use_gpu=cluster.use_gpu,
        resources_per_worker={"CPU": cluster.cpus_per_worker}, placement_strategy=cluster.placement_strategy,
    )
    run = RunConfig(
        name=layout.name, storage_path=layout.root,  # Ray Train's checkpoints: under layout.uri
        failure_config=FailureConfig(max_failures=cluster.max_failures),
        checkpoint_config=ckpt.checkpoint_config(job.train),
        callbacks=[failure_lines(launch.relay, cluster.max_failures), *callbacks],
        worker_runtime_env={"env_vars": worker_environment(cluster, uses_gpu=cluster.use_gpu)},
    )
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=launch.loop_config(), scaling_config=scaling, run_config=run,
        validation_config=(validation_config(launch)
                           if job.train.bleu_every and job.train.bleu_in_background else None),
        torch_config=BoundTorchConfig(backend="nccl" if job.cluster.use_gpu else "gloo",
                                      timeout_s=int(collective_timeout_s(job.train.long_phase_timeout_s))),
    )


def with_absolute_paths(job: JobConfig) -> JobConfig:
    """Workers run in other directories: local paths must not be relative to the driver's."""
    def absolute(uri: str) -> str:
        return str(storage.local_path(uri)) if storage.is_local(uri) else uri

    data = dataclasses.replace(job.data, output_dir=absolute(job.data.output_dir))
    cluster = dataclasses.replace(job.cluster, storage_path=absolute(job.cluster.storage_path))
    return dataclasses.replace(job, data=data, cluster=cluster)


def train(job: JobConfig, *, resume_from: str = "", log: Callable[[str], None] | None = None,
          callbacks: tuple = ()) -> TrainOutcome:
    """Run (or continue) the training job to completion and export the model. `log` receives
    aiayn's console lines (default: stdout and the run's log file); `callbacks`: more of Ray
    Train's for the worker group (a sweep's trial reports to Ray Tune through one)."""
    started_at = time.time()  # the run's time ledger starts here (jobs/report/goodput.py)
    job = with_absolute_paths(job)
    layout = RunLayout.of(job.cluster, run_name(job))
    data_plan, manifest = validate(job, layout)
    from jobs.report.tracking import request_budget  # MLflow, after the checks: bad input answers sooner

    with request_budget(job.tracking.environment()):  # every MLflow call of this driver is bounded
        return _train_validated(job, layout, data_plan, manifest, resume_from, log, started_at, callbacks)


def end(job: JobConfig, status: str) -> str:
    """Mark the MLflow run of `job` ended (FAILED or KILLED) without training: for a run whose driver
    was killed and that will not be resumed. Refused while a driver trains it (it takes the run's
    lease for the moment it writes). Returns what it did, in one line."""
    from mlflow.tracking import MlflowClient

    from jobs.report.tracking import find_run, request_budget, resolve_tracking_uri  # MLflow, after the checks

    job = with_absolute_paths(job)
    layout = RunLayout.of(job.cluster, run_name(job))
    if not storage.exists(layout.uri):
        raise InputError(f"run {layout.name}: nothing at {storage.redact(layout.uri)}; give the run's --name and the "
                         "cluster.storage_path it was trained with")
    lease = acquire(layout.uri, layout.name, job.cluster.lease_ttl_s)
    with LeaseKeeper(layout.uri, lease, job.cluster.lease_ttl_s, print), request_budget(job.tracking.environment()):
        tracking_uri = resolve_tracking_uri(job.tracking.uri)
        experiment = MlflowClient(tracking_uri).get_experiment_by_name(job.tracking.experiment)
        run = find_run(tracking_uri, experiment.experiment_id, layout.name) if experiment else None
        if run is None:
            raise InputError(f"run {layout.name}: no MLflow run of that name in experiment {job.tracking.experiment} "
                             f"at {storage.redact(tracking_uri)}; give the tracking.uri it was trained with")
        if run.info.status != "RUNNING":
            return f"run {layout.name}: already {run.info.status} in MLflow; nothing to do"
        MlflowClient(tracking_uri).set_terminated(run.info.run_id, status)
    return (f"run {layout.name}: MLflow run {run.info.run_id} marked {status}; its checkpoints are kept, and "
            f"`aiayn train --name {layout.name}` with the same settings would still resume it")


def _train_validated(job: JobConfig, layout: RunLayout, data_plan: PreparePlan, manifest: Manifest | None,
                     resume_from: str, log: Callable[[str], None] | None, started_at: float,
                     callbacks: tuple) -> TrainOutcome:
    from jobs.report.tracking import resolve_tracking_uri  # MLflow, after the checks

    tracking_uri = resolve_tracking_uri(job.tracking.uri)
    console = Console(layout.log_path) if log is None else log
    # Before the resume plan: what this driver resumes from cannot change under it any more.
    lease = acquire(layout.uri, layout.name, job.cluster.lease_ttl_s)  # a second driver of this run stops here
    with libraries_output_to(layout.libraries_log_path), \
            LeaseKeeper(layout.uri, lease, job.cluster.lease_ttl_s, console) as keeper:
        try:
            return _train_holding_lease(job, layout, data_plan, manifest, resume_from, console, tracking_uri, keeper,
                                        started_at, callbacks)
        except BaseException as error:
            if keeper.lost:  # the lease was lost: say that, not whatever it interrupted
                raise LeaseLost(f"run {layout.name}: this driver lost its lease ({keeper.lost}) and stopped") from error
            raise


def _train_holding_lease(job: JobConfig, layout: RunLayout, data_plan: PreparePlan, manifest: Manifest | None,
                         resume_from: str,
                         console: Callable[[str], None], tracking_uri: str,
                         keeper: LeaseKeeper, started_at: float, callbacks: tuple) -> TrainOutcome:
    # Ray and MLflow only once the checks have passed: bad input answers sooner.
    from cluster.ray_connection import connect
    from cluster.reachability import check_reaches_every_node
    from jobs.report.tracking import dataset_inputs, find_or_create_run, git_commit

    signer = ckpt.Signer.of_account(job.train.accept_unsigned_checkpoints)
    source = ckpt.resume_source(layout.uri, resume_from, signer, console)
    resume = _plan_resume(job, source, manifest) if manifest is not None else None
    connect(job.cluster.address)
    check_reaches_every_node(shared_locations(job, tracking_uri))
    if manifest is None:
        console(f"preparing {job.data.dataset_uri} ...")
        run_prepare(data_plan)
        manifest = load_manifest(job.data.dataset_uri)
        _check_budget(job, manifest)  # validate() could not: no data yet
        resume = _plan_resume(job, source, manifest)
    job = job.with_dataset(manifest)  # the model's vocabulary and special ids are the dataset's
    saved_config = ckpt.read_job_state(resume.checkpoint).config if resume.checkpoint else None
    job = with_step_budget(job, saved_config)  # a resized run keeps the step size it started with
    import ray

    # world_size and zero_stage: rank 0's tags, set by the worker group that trains (an elastic run's varies)
    tags = {"git_commit": git_commit(), "ray_job_id": ray.get_runtime_context().get_job_id(),
            **({"mlflow.parentRunId": job.tracking.parent_run} if job.tracking.parent_run else {})}
    run_id, created = find_or_create_run(tracking_uri, job.tracking.experiment, layout.name,
                                         flatten(public_config(job)), tags, dataset_inputs(manifest))
    console("resolved config:\n" + yaml.safe_dump(public_config(job), sort_keys=False).rstrip())
    console(f"run {layout.name}: MLflow run {run_id} ({'new' if created else 'continued'}) at {storage.redact(tracking_uri)}")
    console(f"{resume.describe()}; data {manifest.uri}")
    if isinstance(console, Console):
        console(f"this run's log: {console.log_path}  (what libraries print here: {layout.libraries_log_path}; "
                "Ray's worker logs: the session's logs/ on each node)")
    report = RunReport(console, tracking_uri, run_id, layout)
    with report.ended_on_failure(still_ours=lambda: not keeper.lost):
        return _train_tracked(job, layout, manifest, resume, console, keeper, report, signer, started_at, callbacks)


def _train_tracked(job: JobConfig, layout: RunLayout, manifest: Manifest, resume: ckpt.ResumePlan,
                   console: Callable[[str], None], keeper: LeaseKeeper, report: RunReport, signer: ckpt.Signer,
                   started_at: float, callbacks: tuple) -> TrainOutcome:
    """Train on the cluster, then export, score and report: the part of a run that MLflow follows."""
    started = time.time()
    policy = HangPolicy(job.train.hang_timeout_s, job.train.long_phase_timeout_s)
    with relay_to(console) as relay, watch_progress(policy, report.hang) as monitor:
        launch = Launch(job, manifest.uri, report.tracking_uri, report.run_id, layout, resume, keeper.uri,
                        keeper.lease.holder, uuid.uuid4().hex, started_at, signing_key_for_workers(signer), relay, monitor)
        result = _fit(_trainer(launch, callbacks))
    console(f"training finished in {time.time() - started:.0f} s; exporting and scoring ...")
    keeper.check("removing checkpoints Ray Train no longer tracks")
    _delete_untracked(layout.uri, result, signer, console)
    scores = ckpt.scores_of(result.best_checkpoints)
    if job.train.average == "best" and not scores:
        console("no checkpoint has a valid BLEU (train.average=best): exporting the newest")
    outcome = _finish(job, layout, report, manifest, started_at, scores, signer, keeper.check)
    console(outcome.time_table)
    return dataclasses.replace(outcome, log_path=str(getattr(console, "log_path", "") or ""))


def signing_key_for_workers(signer: ckpt.Signer):
    """The signing key as the workers and the BLEU task receive it: a Ray object owned by this
    driver (64 bytes: kept in its own memory, never spilled), of which the loop's config holds only
    the reference. Ray logs a runtime environment's variables verbatim, and records the loop's
    config in Ray Train's run state: neither may hold the key."""
    import ray

    return ray.put(signer.key)


def _delete_untracked(run_uri: str, result, signer: ckpt.Signer, console: Callable[[str], None]) -> None:
    """Retention for the checkpoints Ray Train never registered (`ckpt.untracked`): what its own
    retention would have done had it known them. Only this account's (signed): never delete what
    aiayn did not write."""
    kept = {posixpath.basename(c.path.rstrip("/")) for c, _ in result.best_checkpoints or []}
    complete, _ = ckpt.signed_checkpoints(run_uri, signer)
    for uri in ckpt.untracked(complete, kept):
        storage.delete_dir(uri)
        console(f"deleted {posixpath.basename(uri)}: finished after its run's driver was gone, so Ray Train's "
                "retention never knew it")


def _fit(trainer):
    """trainer.fit(). Ray Train installs a SIGINT handler for it (Ctrl-C, and the lease keeper's
    interrupt, abort the run gracefully) and leaves it installed, with a controller that is gone:
    a later Ctrl-C (during the export) would be swallowed. The previous handler comes back here."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()  # Ray Train installs nothing off the main thread
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGINT, previous)


def _plan_resume(job: JobConfig, source: str | None, manifest: Manifest) -> ckpt.ResumePlan:
    return ckpt.plan_resume(source, public_config(job.with_dataset(manifest)), manifest,
                            job.cluster.num_workers, job.train.zero_stage)


def _finish(job: JobConfig, layout: RunLayout, report: RunReport, manifest: Manifest, started_at: float,
            scores: dict[str, float], signer: ckpt.Signer, fence: Callable[[str], None]) -> TrainOutcome:
    """Export the average of the chosen checkpoints (`scores`: their valid BLEU, for
    train.average=best) next to them, score it on test, log it all, with the run's time ledger:
    the newest checkpoint's, and the time since it was saved as `finish`. `fence(what)` raises
    once the run's lease is lost: checked right before the export is published and logged.

    The checkpoints may be in an object store: the chosen ones are downloaded into a temporary
    directory (under cluster.staging_dir if set) that is removed afterwards."""
    chosen = ckpt.to_average(layout.uri, job.train, scores, signer)
    newest = ckpt.signed_checkpoints(layout.uri, signer)[0][-1]
    final_state = ckpt.read_job_state(newest)
    with storage.open_input(manifest.tokenizer_uri) as handle:
        tokenizer_bytes = handle.read()
    export_uri = layout.export_uri
    with layout.scratch("aiayn-finish-") as scratch:
        local = [ckpt.local_copy(c, scratch) for c in chosen]
        for directory in local:
            ckpt.verify(str(directory), signer)  # the export unpickles DeepSpeed's files
        local_export = export_model(
            local, job.model, tokenizer_bytes,
            {"run_name": layout.name, "mlflow_run_id": report.run_id, "step": final_state.step,
             "tokenizer_sha256": manifest.tokenizer_sha256, "dataset": storage.redact(manifest.uri),
             "decoding": {"beam_size": job.train.beam_size, "length_penalty": job.train.length_penalty}},
            scratch / "export", moving_average=bool(job.train.ema_decay), signer=signer,
        )
        fence("the export")
        storage.publish_directory(local_export, export_uri, INFO)
        best = final_state.best_valid_loss if math.isfinite(final_state.best_valid_loss) else None
        outcome = TrainOutcome(layout.name, report.run_id, report.tracking_uri, export_uri, final_state.step, final_state.tokens_seen,
                               final_state.elapsed_seconds, best)
        if manifest.has_split("test") and not manifest.monolingual:
            outcome = _score_test(job, outcome, manifest, local_export)
        fence("the run's results in MLflow")
        model_uri = report.results(job, outcome, manifest, local_export, final_state.pending_metrics, newest)
    # The end's tracking too (an outage's backlog, the artifacts): the ledger is the last thing sent.
    ledger = GoodputLedger.from_dict(final_state.goodput)
    ledger.add("finish", time.time() - max(final_state.saved_at, started_at))  # a finished run rerun: its own
    outcome = dataclasses.replace(outcome, time_table=ledger.table(), model_uri=model_uri)
    report.ledger(ledger, outcome.steps)
    return dataclasses.replace(outcome, mlflow_lacks=tuple(report.unsent))


def _score_test(job: JobConfig, outcome: TrainOutcome, manifest: Manifest, export_dir: Path) -> TrainOutcome:
    """sacreBLEU of beam search on the test split with the exported (averaged) model: the same
    function as `aiayn evaluate`, so the two figures agree."""
    translate, _ = open_translator(export_dir, "torch", job.train.decoding)
    score = score_split(translate, manifest, "test")
    return dataclasses.replace(outcome, test=score.scores, samples=score.samples)
