"""`aiayn train`: validate, prepare if needed, run Ray Train's TorchTrainer, export, score.

Everything that can be checked without a cluster is checked first, so bad input fails in
seconds with one line and before any worker starts.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_pipeline import storage
from data_pipeline.errors import InputError
from data_pipeline.manifest import Manifest, load_manifest, verify_dataset
from data_pipeline.prepare import PreparePlan, plan_prepare, run_prepare
from jobs import checkpoint as ckpt
from jobs.config import JobConfig, config_to_dict, flatten, public_config
from jobs.tracking import find_or_create_run, git_commit, local_store_dir, resolve_tracking_uri


@dataclass(frozen=True)
class TrainOutcome:
    run_name: str
    run_id: str
    tracking_uri: str
    export_uri: str  # <storage>/<run name>/export: a local path or an object-store URI
    steps: int
    test_bleu: float | None = None
    bleu_signature: str = ""
    samples: tuple[tuple[str, str, str], ...] = ()  # (source, reference, hypothesis)


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
    limit = min(job.stream.max_tokens, job.model.max_positions)
    if manifest.monolingual:
        if job.stream.packed_length > limit:
            raise InputError(f"stream.packed_length={job.stream.packed_length} exceeds the budget or model.max_positions ({limit})")
        return
    if float(np.mean(longest > limit)) > 0.5:
        raise InputError(
            f"stream.max_tokens={job.stream.max_tokens} (or model.max_positions={job.model.max_positions}) is smaller "
            f"than most sentences (median {int(np.median(longest))} tokens); raise stream.max_tokens"
        )


def _storage_root(job: JobConfig) -> str:
    root = job.cluster.storage_path
    storage.check_writable(root, "cluster.storage_path")
    return str(storage.local_path(root)) if storage.is_local(root) else root


def shared_locations(job: JobConfig, tracking_uri: str) -> dict[str, str]:
    """What every node must reach: checkpoints, data and (if it lives in files) the MLflow store."""
    locations = {"cluster.storage_path": job.cluster.storage_path, "data.output_dir": job.data.output_dir}
    store = local_store_dir(tracking_uri)
    if store is not None:
        locations["tracking.uri"] = store
    return locations


def validate(job: JobConfig) -> PreparePlan:
    """Every check that needs no cluster. Raises InputError / ConfigError with one line.

    Returns the data plan (one pass over the inputs' checksums) for the caller to act on."""
    _storage_root(job)
    plan = plan_prepare(job.data)
    if plan.up_to_date:
        manifest = load_manifest(job.data.dataset_uri)
        verify_dataset(manifest)  # a changed or corrupted shard: refused before any resource is taken
        _check_budget(job, manifest)
    if job.train.precision != "fp32" and not job.cluster.use_gpu:
        raise InputError(f"train.precision={job.train.precision} needs GPUs (cluster.use_gpu=true); use fp32 on CPU")
    return plan


def _trainer(job: JobConfig, name: str, loop_config: dict):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.worker import train_loop_per_worker

    scaling = ScalingConfig(
        num_workers=job.cluster.num_workers, use_gpu=job.cluster.use_gpu,
        resources_per_worker={"CPU": job.cluster.cpus_per_worker},
        placement_strategy=job.cluster.placement_strategy,
    )
    run = RunConfig(
        name=name, storage_path=_storage_root(job),
        failure_config=FailureConfig(max_failures=job.cluster.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints),
    )
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling, run_config=run,
        torch_config=TorchConfig(backend="nccl" if job.cluster.use_gpu else "gloo"),
    )


def with_absolute_paths(job: JobConfig) -> JobConfig:
    """Workers run in other directories: local paths must not be relative to the driver's."""
    import dataclasses

    def absolute(uri: str) -> str:
        return str(storage.local_path(uri)) if storage.is_local(uri) else uri

    data = dataclasses.replace(job.data, output_dir=absolute(job.data.output_dir))
    cluster = dataclasses.replace(job.cluster, storage_path=absolute(job.cluster.storage_path))
    return dataclasses.replace(job, data=data, cluster=cluster)


def train(job: JobConfig, *, resume_from: str = "", log=print) -> TrainOutcome:
    """Run (or continue) the training job to completion and export the model."""
    from cluster.reachability import check_reaches_every_node
    from cluster.runtime import connect

    job = with_absolute_paths(job)
    plan = validate(job)
    name = run_name(job)
    tracking_uri = resolve_tracking_uri(job.tracking.uri)
    if resume_from:
        try:
            ckpt.verify(resume_from)
        except ckpt.CheckpointError as error:
            raise InputError(f"--resume {resume_from}: not a complete, unchanged aiayn checkpoint ({error})") from None
    connect(job.cluster.address)
    check_reaches_every_node(shared_locations(job, tracking_uri))
    if not plan.up_to_date:
        log(f"preparing {job.data.dataset_uri} ...")
        run_prepare(plan)
        _check_budget(job, load_manifest(job.data.dataset_uri))  # validate() could not: no data yet
    manifest = load_manifest(job.data.dataset_uri)  # pinned: the workers read this version
    import ray

    tags = {"git_commit": git_commit(), "ray_job_id": ray.get_runtime_context().get_job_id(),
            "world_size": str(job.cluster.num_workers), "zero_stage": str(job.train.zero_stage)}
    run_id, created = find_or_create_run(tracking_uri, job.tracking.experiment, name,
                                         flatten(public_config(job)), tags)
    log(f"run {name}: MLflow run {run_id} ({'new' if created else 'continued'}) at {storage.redact(tracking_uri)}")
    loop_config = {"job": config_to_dict(job), "dataset_uri": manifest.uri,
                   "tracking_uri": tracking_uri, "run_id": run_id, "resume_from": resume_from}
    started = time.time()
    _trainer(job, name, loop_config).fit()
    log(f"training finished in {time.time() - started:.0f} s")
    return _finish(job, name, run_id, tracking_uri, manifest)


def _finish(job: JobConfig, name: str, run_id: str, tracking_uri: str, manifest: Manifest) -> TrainOutcome:
    """Export the average of the last checkpoints next to them, score it on test, log it all.

    The checkpoints may be in an object store: the chosen ones are downloaded into a temporary
    directory (under cluster.staging_dir if set) that is removed afterwards."""
    import tempfile

    from jobs.export import INFO, export_model

    run_uri = storage.join(_storage_root(job), name)
    complete = [c for c in ckpt.list_checkpoints(run_uri) if ckpt.is_complete(c)]
    if not complete:
        raise ckpt.CheckpointError(f"{run_uri}: training produced no complete checkpoint")
    chosen = complete[-job.train.average_last:]
    final_state = ckpt.read_job_state(chosen[-1])
    with storage.open_input(manifest.tokenizer_uri) as handle:
        tokenizer_bytes = handle.read()
    export_uri = storage.join(run_uri, "export")
    with tempfile.TemporaryDirectory(prefix="aiayn-finish-", dir=job.cluster.staging_dir or None) as scratch:
        local = [ckpt.local_copy(c, Path(scratch)) for c in chosen]
        for directory in local:
            ckpt.verify(str(directory))  # the export unpickles DeepSpeed's files
        local_export = export_model(
            local, job.model.replace(vocab_size=manifest.vocab_size),
            tokenizer_bytes,
            {"run_name": name, "mlflow_run_id": run_id, "step": final_state.step,
             "tokenizer_sha256": manifest.tokenizer_sha256, "dataset": manifest.uri},
            Path(scratch) / "export",
        )
        storage.publish_directory(local_export, export_uri, INFO)
        outcome = TrainOutcome(name, run_id, tracking_uri, export_uri, final_state.step)
        if manifest.has_split("test") and not manifest.monolingual:
            outcome = _score_test(job, outcome, manifest, local_export)
        _track_results(job, outcome, manifest, local_export, final_state.pending_metrics, chosen[-1])
    return outcome


def _track_results(job: JobConfig, outcome: TrainOutcome, manifest: Manifest, export_dir: Path,
                   pending_metrics: list, checkpoint_uri: str) -> None:
    """Send what the workers could not (an outage at the end) and the artifacts. MLflow being down
    now costs the artifacts of this run, not the run: the export is in storage already."""
    from jobs.tracking import MetricLogger

    logger = MetricLogger(outcome.tracking_uri, outcome.run_id)
    logger.restore_spool(pending_metrics)
    if logger.flush():
        print(f"[aiayn] some metrics of this run are not in MLflow; they are kept in {checkpoint_uri}/{ckpt.JOB_STATE}")
    try:
        _log_artifacts(job, outcome, manifest, export_dir)
    except Exception as error:  # noqa: BLE001 - tracking never fails a finished run
        print(f"[aiayn] MLflow is unreachable ({str(error).splitlines()[0][:200]}); the export is at "
              f"{outcome.export_uri}, not logged as an artifact")


def _score_test(job: JobConfig, outcome: TrainOutcome, manifest: Manifest, export_dir: Path) -> TrainOutcome:
    """sacreBLEU of beam search on the test split, with the exported (averaged) model."""
    import dataclasses

    from jobs.evaluation import bleu, bleu_signature, detokenize, load_processor, read_eval_split, translate_ids
    from jobs.export import load_export

    model, _, _ = load_export(export_dir)
    split = read_eval_split(manifest, "test")
    hyps = detokenize(load_processor(manifest.tokenizer_uri), translate_ids(
        model, split.src_ids, beam_size=job.train.beam_size, alpha=job.train.length_penalty))
    score = bleu(hyps, split.references)
    samples = tuple(zip(split.src_text[:5], split.references[:5], hyps[:5]))
    return dataclasses.replace(outcome, test_bleu=score.score, bleu_signature=bleu_signature(hyps, split.references),
                               samples=samples)


def _log_artifacts(job: JobConfig, outcome: TrainOutcome, manifest: Manifest, export_dir: Path) -> None:
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(outcome.tracking_uri)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "resolved_config.json").write_text(json.dumps(public_config(job), indent=2))
        (folder / "data_manifest.json").write_text(json.dumps(manifest.data, indent=2))
        if outcome.samples:
            (folder / "sample_translations.txt").write_text("\n\n".join(
                f"SRC {s}\nREF {r}\nHYP {h}" for s, r, h in outcome.samples) + "\n")
        client.log_artifacts(outcome.run_id, str(folder))
    client.log_artifacts(outcome.run_id, str(export_dir), "export")
    if outcome.test_bleu is not None:
        client.log_metric(outcome.run_id, "test/bleu", outcome.test_bleu, step=outcome.steps)
        client.set_tag(outcome.run_id, "bleu_signature", outcome.bleu_signature)
    client.set_terminated(outcome.run_id, "FINISHED")
