"""Comparing the outputs of two searches that ran on different kernels or engines.

Two implementations that multiply in different kernels (CTranslate2 and ours, a cached and a
recomputed decoder, a batch and one sentence) differ in the last bits of their log-probabilities,
and a search turns a near-tie into a different token, on one CPU and not on another. So outputs are
not compared for identity: where they differ, the difference must be a close call as judged by one
reference model (`LogProbs`), and a wrong implementation, whose log-probabilities are off by far
more than rounding, still fails.

- Greedy: at the first token where the outputs part, the reference model's log-probabilities of
  the two tokens chosen there are within the tolerance.
- Beam: each output is at least as good as the other by its own search's criterion (its length
  normalisation, `Criterion`) under the reference model's log-probabilities, within the tolerance.
"""

from __future__ import annotations

from typing import Callable

import torch

from data_pipeline.tokenizer import BOS_ID, EOS_ID
from transformer.decoding import length_penalty

# (source ids, hypothesis ids without EOS) -> (len(hypothesis) + 1, V): the reference model's
# log-probabilities at each target position, teacher-forced on BOS + hypothesis.
LogProbs = Callable[[list[int], list[int]], torch.Tensor]
# (sum of token log-probabilities with EOS, length with EOS) -> the score a beam search maximises.
Criterion = Callable[[float, int], float]


def teacher_forced(model) -> LogProbs:
    """Our model's log-probabilities of a hypothesis, one sentence at a time, without padding."""

    @torch.no_grad()
    def log_probs(source: list[int], hypothesis: list[int]) -> torch.Tensor:
        model.eval()
        logits = model(torch.tensor([source]), torch.tensor([[BOS_ID, *hypothesis]]))
        return torch.log_softmax(logits[0].float(), dim=-1)

    return log_probs


def sequence_log_prob(log_probs: LogProbs, source: list[int], hypothesis: list[int]) -> float:
    """Sum of the hypothesis' token log-probabilities, EOS included."""
    targets = torch.tensor([*hypothesis, EOS_ID])
    return float(log_probs(source, hypothesis).gather(1, targets[:, None]).sum())


def gnmt(alpha: float) -> Criterion:
    """Our beam search's criterion: log-probability / ((5 + length) / 6)^alpha."""
    return lambda total, length: total / length_penalty(length, alpha)


def power(alpha: float) -> Criterion:
    """CTranslate2's: log-probability / length^alpha."""
    return lambda total, length: total / length ** alpha


def greedy_disagreements(log_probs: LogProbs, sources: list[list[int]], ours: list[list[int]],
                         theirs: list[list[int]], tolerance: float) -> list[str]:
    """One line for each sentence whose greedy outputs part where the decision was not close."""
    problems = []
    for index, (source, a, b) in enumerate(zip(sources, ours, theirs)):
        if a == b:
            continue
        a_eos, b_eos = [*a, EOS_ID], [*b, EOS_ID]
        at = next(i for i, (x, y) in enumerate(zip(a_eos, b_eos)) if x != y)
        row = log_probs(source, a)[at]
        margin = float(row[a_eos[at]] - row[b_eos[at]])
        if abs(margin) > tolerance:
            problems.append(f"sentence {index}: at token {at}, {a_eos[at]} and {b_eos[at]} are {margin:.4f} apart "
                            f"(ours {a}, theirs {b})")
    return problems


def beam_disagreements(log_probs: LogProbs, sources: list[list[int]], ours: list[list[int]],
                       theirs: list[list[int]], tolerance: float, *, our_criterion: Criterion,
                       their_criterion: Criterion) -> list[str]:
    """One line for each sentence where an output loses to the other one by its own criterion."""
    problems = []
    for index, (source, a, b) in enumerate(zip(sources, ours, theirs)):
        if a == b:
            continue
        total_a, total_b = sequence_log_prob(log_probs, source, a), sequence_log_prob(log_probs, source, b)
        for name, criterion, chosen, other in (("ours", our_criterion, (total_a, a), (total_b, b)),
                                               ("theirs", their_criterion, (total_b, b), (total_a, a))):
            loss = criterion(other[0], len(other[1]) + 1) - criterion(chosen[0], len(chosen[1]) + 1)
            if loss > tolerance:
                problems.append(f"sentence {index}: {name} chose {chosen[1]}, which its own criterion scores "
                                f"{loss:.4f} below {other[1]}")
    return problems
