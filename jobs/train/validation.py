"""In-training validation: loss and perplexity on valid, and beam-search BLEU on its first
sentences. Collective: every rank scores its share and the results are combined."""

from __future__ import annotations

import math

import torch

from data_pipeline.manifest import Manifest
from data_pipeline.stream import ShardStream
from data_pipeline.tokenizer import load_tokenizer
from jobs.inference.evaluation import corpus_scores, read_eval_split, translate_ids
from jobs.run.config import JobConfig
from jobs.run.metric_names import VALID_LOSS, VALID_NLL, VALID_PPL
from jobs.train.collectives import all_gather, all_sum
from jobs.train.engine import DUMMY_BATCH, forward_loss


@torch.no_grad()
def valid_loss(engine, job: JobConfig, manifest: Manifest, rank: int, world_size: int) -> dict[str, float]:
    """Every rank runs as many forward passes as the rank with the most valid batches, the others'
    on the dummy batch: under ZeRO-3 each forward gathers parameters with every rank, and a rank
    with fewer batches (valid's windows rarely divide evenly; a small valid is one window) would
    leave the others waiting in the gather."""
    if not manifest.has_split("valid"):
        return {}
    engine.eval()
    stream = ShardStream(manifest, "valid", job.stream, rank=rank, world_size=world_size, shuffle=False,
                         max_length=job.model.max_positions)
    batches = list(stream.epoch_batches())
    sums = [0.0, 0.0, 0.0]
    for index in range(max(all_gather(len(batches)))):
        batch = batches[index] if index < len(batches) else None
        loss, nll = forward_loss(engine, batch or DUMMY_BATCH, job.model.label_smoothing)
        if batch is not None:
            sums = [sums[0] + float(loss), sums[1] + float(nll), sums[2] + batch.target_tokens]
    engine.train()
    loss, nll, tokens = all_sum(sums)
    if tokens == 0:
        return {}  # nothing in valid fits the budget
    return {VALID_LOSS: loss / tokens, VALID_NLL: nll / tokens, VALID_PPL: math.exp(min(nll / tokens, 50))}


@torch.no_grad()
def valid_bleu(engine, job: JobConfig, manifest: Manifest, rank: int, world_size: int) -> dict[str, float]:
    """Beam-search BLEU on the first `train.bleu_valid_sentences` of valid, each rank a slice."""
    if manifest.monolingual or not manifest.has_split("valid"):
        return {}
    import deepspeed

    split = read_eval_split(manifest, "valid", job.train.bleu_valid_sentences)
    mine = list(range(rank, len(split.src_ids), world_size))
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=job.train.zero_stage == 3):
        hyps = translate_ids(engine.module, [split.src_ids[i] for i in mine], job.train.decoding)
    engine.train()
    ordered = sorted(pair for part in all_gather(list(zip(mine, hyps))) for pair in part)
    tokenizer = load_tokenizer(manifest.tokenizer_uri)
    return corpus_scores([tokenizer.decode(h) for _, h in ordered], split.references).metrics("valid")
