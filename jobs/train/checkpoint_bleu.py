"""Valid BLEU of a committed checkpoint, off the training loop.

With `train.bleu_every` (and `train.bleu_in_background`, the default) the loop saves a checkpoint
at each such step and hands it to Ray Train's asynchronous validation (`ValidationConfig`): a
separate Ray task exports that checkpoint, translates valid with beam search exactly as `aiayn
evaluate` does (`score_split`), and logs `valid/bleu` at the checkpoint's step while training goes
on. Ray Train keeps a validation that did not finish pending across restarts and reruns (in the
run's storage) and runs it again; the metric logger skips a step the run already holds, so each
step's BLEU is logged once.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from pathlib import Path

from data_pipeline import storage
from data_pipeline.manifest import load_manifest
from jobs import checkpoint as ckpt
from jobs.inference.evaluation import open_translator, score_split
from jobs.inference.export import export_model
from jobs.report.progress import validation_line
from jobs.report.tracking import END_OF_RUN_WAIT_S, local_store_dir
from jobs.train.cpu_allocator import worker_environment
from jobs.train.launch import Launch
from jobs.train.run_report import RankReport


def score_checkpoint(checkpoint, *, launch: Launch, step: int) -> dict[str, float]:
    """Ray Train's validation function: `checkpoint` is the committed one of `step`. Its lines
    reach the console through the driver's relay, as rank 0's do."""
    config = launch.job
    os.environ.update(config.tracking.environment())
    manifest = load_manifest(launch.dataset_uri)
    with storage.open_input(manifest.tokenizer_uri) as handle:
        tokenizer_bytes = handle.read()
    import ray

    signer = ckpt.Signer(ray.get(launch.signing_key), config.train.accept_unsigned_checkpoints)  # the driver's key
    with checkpoint.as_directory() as directory, tempfile.TemporaryDirectory(prefix="aiayn-bleu-") as scratch:
        ckpt.verify(directory, signer, posixpath.basename(checkpoint.path.rstrip("/")))  # before DeepSpeed unpickles
        export = export_model([Path(directory)], config.model, tokenizer_bytes, {"step": step}, Path(scratch) / "export",
                              moving_average=bool(config.train.ema_decay))
        translate, _ = open_translator(export, "torch", config.train.decoding)
        score = score_split(translate, manifest, "valid", limit=config.train.bleu_valid_sentences)
    metrics = score.scores.metrics("valid")
    report = RankReport.to_run(launch.relay, launch.tracking_uri, launch.run_id)
    report.line(f"{validation_line(step, metrics)}  (checkpoint {step}, scored in the background)")
    report.log(metrics, step)
    if report.close(timeout_s=END_OF_RUN_WAIT_S):  # the run goes on
        report.line(f"[aiayn] valid/bleu {score.scores.bleu:.2f} of step {step} could not be sent to MLflow")
    return metrics


def validation_config(launch: Launch):
    """The TorchTrainer's `validation_config`: one task at a time, with one CPU (and no GPU), in a
    process that keeps freed memory as CPU training workers do, on the driver's node when the
    tracking store is a file there (no other node can write it)."""
    import ray
    from ray.train import ValidationConfig, ValidationTaskConfig
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    job = launch.job
    options: dict = {"num_cpus": 1, "max_retries": 1,
                     "runtime_env": {"env_vars": worker_environment(job.cluster, uses_gpu=False)}}
    if local_store_dir(launch.tracking_uri) is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                        soft=False)
    # Ray Train keeps these defaults in memory; only the per-checkpoint `step` goes to its snapshot.
    return ValidationConfig(score_checkpoint, task_config=ValidationTaskConfig(fn_kwargs={"launch": launch},
                                                                               timeout_s=job.train.long_phase_timeout_s),
                            ray_remote_kwargs=options)
