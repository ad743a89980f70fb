"""Batched greedy and beam search for the encoder-decoder (§6.1).

The paper: beam size 4, length penalty alpha = 0.6, maximum output length = input length + 50,
terminating early when possible. Each sentence stops at its own EOS (or its own maximum length);
`min_len` (fairseq's --min-len) forbids EOS before it, e.g. for fixed-length speed comparisons.

Made for accelerators: the search state (scores, finished hypotheses and their tokens) lives on
the device, so a step never waits for the host; the host looks only every few steps
(`_check_every`) whether sentences are done, takes their results and drops them from the batch, in
the beam reorder that every step makes anyway. The encoder's keys/values are computed once per
sentence and shared by its beams (never copied or reordered); the decoder's self-attention cache
is preallocated.
Search runs in inference mode, not merely without gradients: its tensors carry no version counter
and its views no autograd metadata, which a step of ~350 small tensor operations feels (test2016,
the main job's export: 1.05x, the same translations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transformer.layers import LayerCache
from transformer.model import EncoderDecoderTransformer


@dataclass(frozen=True)
class Decoding:
    """How a translation is searched for, one set for every user of it (training's BLEU, `aiayn
    evaluate` and `translate`, the MLflow model, both engines): the paper's beam size 4, length
    penalty alpha 0.6 and outputs of at most input length + 50 tokens. `beam_size` 1 is greedy."""

    beam_size: int = 4
    alpha: float = 0.6
    max_len_a: float = 1.0
    max_len_b: int = 50
    min_len: int = 0  # EOS forbidden before it (fixed-length speed comparisons)
    # A sentence is done once the best extension of a step is EOS, not only once it has beam_size
    # finished hypotheses (fairseq's and CTranslate2's rule). Faster (fewer steps per sentence), but
    # with a length penalty a longer hypothesis found later could have won: CTranslate2 exits early
    # only without one. Off by default; `aiayn evaluate|translate --early-exit`.
    early_exit: bool = False


PAPER = Decoding()


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    log_prob: float  # sum of token log-probabilities, EOS included
    score: float  # log_prob / length penalty; equals log_prob for greedy search


def length_penalty(length: int | torch.Tensor, alpha: float) -> float | torch.Tensor:
    """GNMT's lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al., 2016), which the paper's alpha refers to."""
    return ((5.0 + length) / 6.0) ** alpha


def _max_lengths(src: torch.Tensor, config, max_len_a: float, max_len_b: int) -> torch.Tensor:
    """Per-sentence output limit (EOS included), never beyond the model's positions."""
    lengths = (src != config.pad_id).sum(1).float() * max_len_a + max_len_b
    return lengths.long().clamp(min=1, max=config.max_positions)  # (B,)


def _check_every(device: torch.device) -> int:
    """Steps between the host's looks at which sentences are done: every step on a CPU, where a
    look costs nothing; every 8 on an accelerator, where each look drains its queue of kernels."""
    return 1 if device.type == "cpu" else 8


class _Stepper:
    """Next-token log-probabilities of the live hypotheses (rows), from the caches or by
    recomputing each whole prefix; the encoder side has one row per sentence."""

    def __init__(self, model: EncoderDecoderTransformer, memory: torch.Tensor, src_mask: torch.Tensor | None,
                 use_cache: bool, capacity: int):
        self.model, self.memory, self.src_mask = model, memory, src_mask
        self.caches: list[LayerCache] | None = model.new_caches(capacity) if use_cache else None

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:  # prefix (rows, t) -> (rows, V)
        step = prefix.shape[1] - 1
        if self.caches is not None:
            return self.model.decode_step(prefix[:, -1:], self.memory, self.src_mask, self.caches, step)
        hidden = self.model.decode(prefix, self.memory, self.src_mask)
        return torch.log_softmax(self.model.output(hidden[:, -1]).float(), dim=-1)

    def reorder(self, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> None:
        """Keep hypothesis `rows`; `sentences`: the sentences still searched, when some are done."""
        if sentences is not None:
            self.memory = self.memory.index_select(0, sentences)
            if self.src_mask is not None:
                self.src_mask = self.src_mask.index_select(0, sentences)
        for cache in self.caches or []:
            cache.reorder(rows, sentences)


def _restrict(log_probs: torch.Tensor, step: int, max_lengths: torch.Tensor, shortest: int, min_len: int,
              pad_id: int, eos_id: int) -> torch.Tensor:
    """Never emit padding, nor EOS before `min_len` tokens (EOS included); only EOS where a
    sentence reaches its maximum length, from step `shortest` (the smallest of `max_lengths`) on:
    before it no row needs the pass over all its logits. In place, without a host sync."""
    log_probs[:, pad_id] = float("-inf")
    if step + 1 < min_len:
        log_probs[:, eos_id] = float("-inf")
    if step + 1 < shortest:
        return log_probs
    at_limit = (max_lengths <= step + 1)[:, None]  # (rows, 1): broadcast, no (rows, V) mask
    eos = log_probs[:, eos_id : eos_id + 1].clone()
    log_probs.masked_fill_(at_limit, float("-inf"))
    log_probs[:, eos_id : eos_id + 1] = torch.where(at_limit, eos, log_probs[:, eos_id : eos_id + 1])
    return log_probs


_BLOCK = 64  # columns per block of `_row_topk`'s first stage


def _row_topk(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.topk(count, dim=1)` (values, columns) in two stages: the `count` largest entries of a row
    all lie in the `count` blocks of 64 columns with the largest maxima (an entry among them is at
    most its block's maximum, and at most `count` maxima can be among them), so the sort-based
    top-k runs over count x 64 columns instead of the whole vocabulary. On a CPU torch's top-k
    costs ~1 ns an entry: 2.5 ms a step for 272 beams of 8000 tokens, 0.9 ms in two stages."""
    rows, columns = x.shape
    full = columns - columns % _BLOCK
    if full < 4 * count * _BLOCK:  # a short row: nothing to gain
        return x.topk(count, dim=1)
    block_maxima = x[:, :full].view(rows, full // _BLOCK, _BLOCK).amax(2)
    blocks = block_maxima.topk(count, dim=1).indices  # (rows, count)
    offsets = torch.arange(_BLOCK, device=x.device)
    candidates = (blocks[:, :, None] * _BLOCK + offsets).flatten(1)  # (rows, count x 64)
    if full < columns:  # the last, partial block always competes
        candidates = torch.cat([candidates, torch.arange(full, columns, device=x.device).expand(rows, -1)], 1)
    values, picked = x.gather(1, candidates).topk(count, dim=1)
    return values, candidates.gather(1, picked)


@torch.inference_mode()
def greedy_search(
    model: EncoderDecoderTransformer, src: torch.Tensor, decoding: Decoding = PAPER, *, use_cache: bool = True,
) -> list[Hypothesis]:
    """The most probable token at each step (`decoding`'s beam size and alpha play no part)."""
    config, min_len = model.config, decoding.min_len
    memory, src_mask = model.encode(src)
    max_lengths = _max_lengths(src, config, decoding.max_len_a, decoding.max_len_b)
    limit, shortest = int(max_lengths.max()), int(max_lengths.min())
    stepper = _Stepper(model, memory, src_mask, use_cache, limit)
    batch, device, every = src.shape[0], src.device, _check_every(src.device)
    tokens = torch.full((batch, limit + 1), config.pad_id, dtype=torch.long, device=device)
    tokens[:, 0] = config.bos_id
    log_prob = torch.zeros(batch, dtype=torch.float64, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(limit):
        log_probs = _restrict(stepper(tokens[:, : step + 1]), step, max_lengths, shortest, min_len, config.pad_id,
                              config.eos_id)
        best = log_probs.argmax(-1)
        log_prob += log_probs.gather(1, best[:, None]).squeeze(1).double().masked_fill(finished, 0.0)
        best = best.masked_fill(finished, config.pad_id)
        tokens[:, step + 1] = best
        finished |= best == config.eos_id
        if (step + 1) % every == 0 and bool(finished.all()):
            break
    hypotheses = []
    for row, total in zip(tokens[:, 1:].tolist(), log_prob.tolist()):
        row = row[: row.index(config.eos_id)] if config.eos_id in row else [t for t in row if t != config.pad_id]
        hypotheses.append(Hypothesis(row, total, total))
    return hypotheses


@dataclass
class _Finished:
    """Up to K finished hypotheses per sentence, on the device; slot K is where extensions that
    are not taken are written (and ignored), so that taking them needs no host decision."""

    score: torch.Tensor  # (n, K+1) length-penalised
    log_prob: torch.Tensor  # (n, K+1)
    length: torch.Tensor  # (n, K+1) tokens before EOS
    tokens: torch.Tensor  # (n, K+1, limit)
    count: torch.Tensor  # (n,)

    @classmethod
    def empty(cls, sentences: int, k: int, limit: int, pad_id: int, device: torch.device) -> "_Finished":
        return cls(torch.full((sentences, k + 1), float("-inf"), device=device),
                   torch.zeros(sentences, k + 1, device=device),
                   torch.zeros(sentences, k + 1, dtype=torch.long, device=device),
                   torch.full((sentences, k + 1, limit), pad_id, dtype=torch.long, device=device),
                   torch.zeros(sentences, dtype=torch.long, device=device))

    def add(self, take: torch.Tensor, scores: torch.Tensor, penalty: float, prefixes: torch.Tensor) -> None:
        """Finalise the candidates `take` (n, K), in rank order, into the free slots.
        `scores` (n, K) their log-probabilities; `prefixes` (n, K, step) their tokens."""
        k = take.shape[1]
        rank = take.long().cumsum(1) - 1
        take = take & (rank < (k - self.count)[:, None])
        slot = torch.where(take, self.count[:, None] + rank, k)
        self.score.scatter_(1, slot, scores / penalty)
        self.log_prob.scatter_(1, slot, scores)
        self.length.scatter_(1, slot, torch.full_like(slot, prefixes.shape[2]))
        if prefixes.shape[2]:
            self.tokens[:, :, : prefixes.shape[2]].scatter_(1, slot[:, :, None].expand_as(prefixes), prefixes)
        self.count += take.sum(1)
        self.score[:, k] = float("-inf")

    def unbeatable(self, live_scores: torch.Tensor, step: int, max_lengths: torch.Tensor, alpha: float) -> torch.Tensor:
        """(n,) sentences whose best finished hypothesis no live beam can beat, so that searching on
        cannot change the result (tensor2tensor's reading of the paper's "terminating early when
        possible"): a beam's log-probability `live_scores` (n, K) only falls as it grows, so its final
        score is at most that over the largest length penalty it can still reach, at length step + 2
        (its earliest EOS) or at its sentence's `max_lengths` (n,). Exact, unlike `early_exit`."""
        k = self.score.shape[1] - 1
        ends = torch.stack([torch.full_like(max_lengths, step + 2), max_lengths.clamp(min=step + 2)])
        largest_penalty = length_penalty(ends.float(), alpha).amax(0)  # either end: alpha may be < 0
        best_live = live_scores.max(1).values / largest_penalty
        return self.score[:, :k].max(1).values > best_live

    def select(self, sentences: torch.Tensor) -> None:
        for name in ("score", "log_prob", "length", "tokens", "count"):
            setattr(self, name, getattr(self, name).index_select(0, sentences))

    def best(self, rows: torch.Tensor) -> list[Hypothesis]:
        """The best finished hypothesis of each sentence in `rows`: one transfer to the host."""
        k = self.score.shape[1] - 1
        pick = self.score[rows, :k].argmax(1)
        score, log_prob, length = (t[rows, :k].gather(1, pick[:, None]).squeeze(1).tolist()
                                   for t in (self.score, self.log_prob, self.length))
        tokens = self.tokens[rows, pick].tolist()
        return [Hypothesis(row[:n], lp, s) for row, n, lp, s in zip(tokens, length, log_prob, score)]


@torch.inference_mode()
def beam_search(
    model: EncoderDecoderTransformer, src: torch.Tensor, decoding: Decoding = PAPER, *, use_cache: bool = True,
) -> list[Hypothesis]:
    """Best hypothesis per sentence by length-penalised score.

    Every step keeps the 2K best extensions of the live beams: EOS extensions ranked within the
    top K are finalised, the K best non-EOS ones continue (as fairseq does). The first step runs
    one row per sentence (its K beams would all be the same BOS) and its K best extensions become
    the beams. A sentence is done when it has K finalised hypotheses, when no live beam can beat
    its best finalised one (`_Finished.unbeatable`) or, with `early_exit`, when the best extension
    of a step is EOS; at the next look its result is taken and its rows are dropped, by the reorder
    that every step makes (dropping only once a quarter of the batch was done paid when a drop was
    a copy of its own: 1.03x then, 1.00x now, test2016).
    """
    config, alpha, min_len = model.config, decoding.alpha, decoding.min_len
    batch, k, device = src.shape[0], decoding.beam_size, src.device
    memory, src_mask = model.encode(src)
    max_lengths = _max_lengths(src, config, decoding.max_len_a, decoding.max_len_b)  # per live sentence
    limit, shortest = int(max_lengths.max()), int(max_lengths.min())
    stepper = _Stepper(model, memory, src_mask, use_cache, limit)
    row_max_lengths = max_lengths  # per row: one row per sentence until the first step's reorder
    prefix = torch.full((batch, limit + 1), config.pad_id, dtype=torch.long, device=device)
    prefix[:, 0] = config.bos_id
    scores = torch.zeros(batch, 1, device=device)  # (sentences, live beams)
    finished = _Finished.empty(batch, k, limit, config.pad_id, device)
    sentence = torch.arange(batch, device=device)  # original index of each live sentence
    best_ended = torch.zeros(batch, dtype=torch.bool, device=device)  # a step's best extension was EOS
    results: list[Hypothesis | None] = [None] * batch
    every = _check_every(device)
    for step in range(limit):
        n, beams = scores.shape
        log_probs = _restrict(stepper(prefix[:, : step + 1]), step, row_max_lengths, shortest, min_len,
                              config.pad_id, config.eos_id)
        # The 2K best extensions of a sentence are among the 2K best of each of its beams.
        beam_best, beam_tokens = _row_topk(log_probs, min(2 * k, log_probs.shape[1]))  # (n*beams, c)
        width = beam_best.shape[1]
        candidates = scores[:, :, None] + beam_best.view(n, beams, width)  # (n, beams, c), fp32 as fairseq
        top_scores, top_index = candidates.view(n, -1).topk(min(2 * k, beams * width), dim=1)  # (n, 2K)
        top_beam, top_token = top_index // width, beam_tokens.view(n, -1).gather(1, top_index)
        is_eos = (top_token == config.eos_id) & torch.isfinite(top_scores)
        best_ended |= is_eos[:, 0]
        first_row = torch.arange(n, device=device)[:, None] * beams
        finished.add(is_eos[:, :k], top_scores[:, :k], length_penalty(step + 1, alpha),
                     prefix[:, 1 : step + 1].index_select(0, (first_row + top_beam[:, :k]).view(-1)).view(n, k, step))
        # The K best non-EOS extensions continue: rank EOS candidates after every other one.
        position = torch.arange(top_token.shape[1], device=device).expand_as(top_token)
        keep = torch.where(is_eos, position + top_token.shape[1], position).topk(k, dim=1, largest=False).indices
        scores = top_scores.gather(1, keep)
        rows, tokens = first_row + top_beam.gather(1, keep), top_token.gather(1, keep)  # (n, K)
        live = None  # the sentences that stay, when done ones are dropped at this step
        if step + 1 == limit or (step + 1) % every == 0:
            done = (finished.count >= k) | finished.unbeatable(scores, step, max_lengths, alpha)
            if decoding.early_exit:
                done |= best_ended
            if step + 1 == limit:
                done = torch.ones_like(done)
            if bool(done.any()):
                gone = done.nonzero().squeeze(1)
                for index, hypothesis in zip(sentence[gone].tolist(), finished.best(gone)):
                    results[index] = hypothesis
                if gone.shape[0] == n:
                    break
                live = (~done).nonzero().squeeze(1)
        if live is not None:
            rows, tokens, scores = (t.index_select(0, live) for t in (rows, tokens, scores))
            sentence, best_ended, max_lengths = (t.index_select(0, live) for t in (sentence, best_ended, max_lengths))
            finished.select(live)
        rows = rows.view(-1)
        stepper.reorder(rows, sentences=live)
        if live is None and beams == k:
            prefix[:, : step + 1] = prefix[:, : step + 1].index_select(0, rows)
        else:  # the first step's beams or a drop: a new prefix, with more or fewer rows
            prefix = prefix.index_select(0, rows)
            row_max_lengths = max_lengths.repeat_interleave(k)
        prefix[:, step + 1] = tokens.view(-1)
    return results  # type: ignore[return-value]  # every sentence was collected by the last step


def search(model: EncoderDecoderTransformer, src: torch.Tensor, decoding: Decoding = PAPER) -> list[Hypothesis]:
    """Beam search, or greedy search for a beam of 1."""
    return beam_search(model, src, decoding) if decoding.beam_size > 1 else greedy_search(model, src, decoding)
