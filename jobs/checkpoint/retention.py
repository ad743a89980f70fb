"""Which checkpoints a run keeps and which of them the export averages, decided together so that
the export never asks for a checkpoint that retention deleted.

`train.average=last`: Ray Train keeps the newest `train.keep_checkpoints`, the export averages
the newest `train.average_checkpoints` (the paper's last-checkpoint average, §6.1).
`train.average=best`: Ray Train orders the checkpoints by their valid BLEU (`SCORE`, the metric
the BLEU validation attaches to a checkpoint) and keeps the best ones, besides the newest, which
a resume needs; the export averages the best `train.average_checkpoints` that were scored.
"""

from __future__ import annotations

import posixpath
from typing import Any

from jobs.checkpoint.files import CheckpointError, signed_checkpoints
from jobs.checkpoint.signing import Signer
from jobs.run.metric_names import VALID_BLEU

SCORE = VALID_BLEU
# What a checkpoint reports until its BLEU is known: below every BLEU, so Ray Train drops those
# first. Finite: Ray Train keeps the metrics in JSON, which turns -inf into null.
UNSCORED = -1.0


def checkpoint_config(train):
    """The RunConfig's CheckpointConfig for `train` (a TrainConfig)."""
    from ray.train import CheckpointConfig

    if train.average == "best":
        return CheckpointConfig(num_to_keep=train.keep_checkpoints, checkpoint_score_attribute=SCORE,
                                checkpoint_score_order="max")
    return CheckpointConfig(num_to_keep=train.keep_checkpoints)


def reported_metrics(metrics: dict[str, float], step: int) -> dict[str, float]:
    """The metrics a rank reports with the checkpoint of `step`: Ray Train scores the checkpoint
    by `SCORE`, which only the BLEU validation knows (in the loop: already in `metrics`)."""
    return {SCORE: UNSCORED, **metrics, "step": step}


def scores_of(best_checkpoints: list[tuple[Any, dict]] | None) -> dict[str, float]:
    """Checkpoint directory name -> valid BLEU, from Ray Train's `Result.best_checkpoints`."""
    return {posixpath.basename(checkpoint.path.rstrip("/")): float(metrics[SCORE])
            for checkpoint, metrics in best_checkpoints or []
            if float(metrics.get(SCORE, UNSCORED)) > UNSCORED}


def untracked(complete: list[str], kept: set[str]) -> list[str]:
    """Of a run's complete checkpoints (oldest first), those that Ray Train's retention will never
    delete because it never registered them, and that are not the newest: a checkpoint whose
    upload finished after its run's driver was gone, which a rerun may resume from (the newer of
    Ray Train's and the plan's). `kept`: the names of the checkpoints Ray Train keeps; an empty
    set (nothing known) keeps everything."""
    if not kept:
        return []
    return [uri for uri in complete[:-1] if posixpath.basename(uri.rstrip("/")) not in kept]


def to_average(run_uri: str, train, scores: dict[str, float], signer: Signer) -> list[str]:
    """The complete checkpoints signed with `signer`'s key that the export averages, oldest
    first. `scores`: see `scores_of`; with `average=best` and no checkpoint scored, the newest
    (said by the caller)."""
    complete, _ = signed_checkpoints(run_uri, signer)
    if not complete:
        raise CheckpointError(f"{run_uri}: training produced no complete checkpoint signed with this account's key")
    if train.average == "last":
        return complete[-train.average_checkpoints:]
    scored = [uri for uri in complete if posixpath.basename(uri) in scores]
    best = sorted(scored, key=lambda uri: scores[posixpath.basename(uri)], reverse=True)[:train.average_checkpoints]
    return [uri for uri in complete if uri in best] or complete[-1:]
