"""Batched greedy and beam search for the encoder-decoder (§6.1).

The paper: beam size 4, length penalty alpha = 0.6, maximum output length = input length + 50,
terminating early when possible. Each sentence stops at its own EOS (or its own maximum
length); the encoder keys/values are computed once and the decoder self-attention is cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transformer.layers import LayerCache
from transformer.model import EncoderDecoderTransformer


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    log_prob: float  # sum of token log-probabilities, EOS included
    score: float  # log_prob / length penalty; equals log_prob for greedy search


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al., 2016), which the paper's alpha refers to."""
    return ((5.0 + length) / 6.0) ** alpha


def _max_lengths(src: torch.Tensor, config, max_len_a: float, max_len_b: int) -> torch.Tensor:
    """Per-sentence output limit (EOS included), never beyond the model's positions."""
    lengths = (src != config.pad_id).sum(1).float() * max_len_a + max_len_b
    return lengths.long().clamp(min=1, max=config.max_positions)  # (B,)


class _Stepper:
    """Next-token log-probabilities, either from the caches or by recomputing the whole prefix."""

    def __init__(self, model: EncoderDecoderTransformer, memory: torch.Tensor, src_mask: torch.Tensor,
                 use_cache: bool):
        self.model, self.memory, self.src_mask = model, memory, src_mask
        self.caches: list[LayerCache] | None = model.new_caches() if use_cache else None

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:  # prefix (B', t) -> (B', V)
        step = prefix.shape[1] - 1
        if self.caches is not None:
            return self.model.decode_step(prefix[:, -1:], self.memory, self.src_mask, self.caches, step)
        hidden = self.model.decode(prefix, self.memory, self.src_mask)
        return torch.log_softmax(self.model.output(hidden[:, -1]).float(), dim=-1)

    def reorder(self, index: torch.Tensor) -> None:
        self.memory = self.memory.index_select(0, index)
        self.src_mask = self.src_mask.index_select(0, index)
        for cache in self.caches or []:
            cache.reorder(index)


def _restrict(log_probs: torch.Tensor, step: int, max_lengths: torch.Tensor, pad_id: int, eos_id: int) -> None:
    """Never emit padding; force EOS where a sentence reaches its maximum length. In place."""
    log_probs[:, pad_id] = float("-inf")
    at_limit = max_lengths <= step + 1
    if at_limit.any():
        eos_column = log_probs[at_limit, eos_id].clone()
        log_probs[at_limit] = float("-inf")
        log_probs[at_limit, eos_id] = eos_column


@torch.no_grad()
def greedy_search(
    model: EncoderDecoderTransformer, src: torch.Tensor, *, max_len_a: float = 1.0, max_len_b: int = 50,
    use_cache: bool = True,
) -> list[Hypothesis]:
    config = model.config
    memory, src_mask = model.encode(src)
    stepper = _Stepper(model, memory, src_mask, use_cache)
    max_lengths = _max_lengths(src, config, max_len_a, max_len_b)
    batch = src.shape[0]
    prefix = torch.full((batch, 1), config.bos_id, dtype=torch.long, device=src.device)
    log_prob = torch.zeros(batch, dtype=torch.float64, device=src.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
    for step in range(int(max_lengths.max())):
        log_probs = stepper(prefix)
        _restrict(log_probs, step, max_lengths, config.pad_id, config.eos_id)
        best = log_probs.argmax(-1)
        gained = log_probs.gather(1, best[:, None]).squeeze(1).double()
        log_prob += torch.where(finished, torch.zeros_like(gained), gained)
        best = torch.where(finished, torch.full_like(best, config.pad_id), best)
        prefix = torch.cat([prefix, best[:, None]], dim=1)
        finished |= best == config.eos_id
        if finished.all():
            break
    hypotheses = []
    for row, total in zip(prefix[:, 1:].tolist(), log_prob.tolist()):
        tokens = row[: row.index(config.eos_id)] if config.eos_id in row else row
        hypotheses.append(Hypothesis(tokens, total, total))
    return hypotheses


@torch.no_grad()
def beam_search(
    model: EncoderDecoderTransformer, src: torch.Tensor, *, beam_size: int = 4, alpha: float = 0.6,
    max_len_a: float = 1.0, max_len_b: int = 50, use_cache: bool = True,
) -> list[Hypothesis]:
    """Best hypothesis per sentence by length-penalised score.

    Every step keeps the 2K best extensions of the K live beams: EOS extensions ranked within
    the top K are finalised, the K best non-EOS ones continue (as fairseq does). A sentence is
    done when it has K finalised hypotheses; its live beams are then ignored.
    """
    config = model.config
    batch, k = src.shape[0], beam_size
    device = src.device
    memory, src_mask = model.encode(src)
    expand = torch.arange(batch, device=device).repeat_interleave(k)  # (B*K,)
    stepper = _Stepper(model, memory.index_select(0, expand), src_mask.index_select(0, expand), use_cache)
    max_lengths = _max_lengths(src, config, max_len_a, max_len_b)
    beam_max_lengths = max_lengths.index_select(0, expand)
    prefix = torch.full((batch * k, 1), config.bos_id, dtype=torch.long, device=device)
    scores = torch.full((batch, k), float("-inf"), dtype=torch.float64, device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep only the first alive
    finalized: list[list[Hypothesis]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(int(max_lengths.max())):
        log_probs = stepper(prefix)  # (B*K, V)
        _restrict(log_probs, step, beam_max_lengths, config.pad_id, config.eos_id)
        vocab = log_probs.shape[1]
        candidates = scores[:, :, None] + log_probs.double().view(batch, k, vocab)  # (B, K, V)
        top_scores, top_index = candidates.view(batch, -1).topk(min(2 * k, k * vocab), dim=1)  # (B, 2K)
        top_beam, top_token = top_index // vocab, top_index % vocab
        is_eos = top_token == config.eos_id
        for b, j in (is_eos[:, :k] & torch.isfinite(top_scores[:, :k])).nonzero().tolist():
            if done[b] or len(finalized[b]) >= k:
                continue
            source_row = b * k + int(top_beam[b, j])
            tokens = prefix[source_row, 1:].tolist()
            total = float(top_scores[b, j])
            finalized[b].append(Hypothesis(tokens, total, total / length_penalty(len(tokens) + 1, alpha)))
        for b in range(batch):
            done[b] = done[b] or len(finalized[b]) >= k
        if all(done):
            break
        # The K best non-EOS extensions continue: rank EOS candidates after every other one.
        position = torch.arange(top_token.shape[1], device=device).expand_as(top_token)
        rank = torch.where(is_eos, position + top_token.shape[1], position)
        keep = rank.topk(k, dim=1, largest=False).indices  # (B, K)
        scores = top_scores.gather(1, keep)
        rows = (torch.arange(batch, device=device)[:, None] * k + top_beam.gather(1, keep)).view(-1)
        stepper.reorder(rows)
        prefix = torch.cat([prefix.index_select(0, rows), top_token.gather(1, keep).view(-1, 1)], dim=1)
    return [max(hyps, key=lambda h: h.score) for hyps in finalized]
