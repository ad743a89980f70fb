"""Incremental decoding equals recomputation; beam 1 equals greedy; per-sentence stopping."""

from dataclasses import replace

import pytest
import torch

from tests.agreement import (
    beam_disagreements,
    gnmt,
    greedy_disagreements,
    sequence_log_prob,
    teacher_forced,
)
from transformer import build_model, preset
from transformer.decoding import Decoding, beam_search, greedy_search, length_penalty

VOCAB = 40


def _setup(seed: int = 0, eos_boost: float = 1.0, sentences: int = 4):
    """A random tiny model; eos_boost > 1 makes some sentences end early and others not."""
    torch.manual_seed(seed)
    model = build_model(preset("tiny", vocab_size=VOCAB)).eval()
    with torch.no_grad():
        model.output.proj.weight[model.config.eos_id] *= eos_boost
    src = torch.randint(4, VOCAB, (sentences, 9))
    src[1, 6:] = model.config.pad_id
    src[3, 3:] = model.config.pad_id
    return model, src


def _sentences(model, src: torch.Tensor) -> list[list[int]]:
    return [row[row != model.config.pad_id].tolist() for row in src]


def _same_search(model, src: torch.Tensor, ours: list, theirs: list, *, beam: bool) -> None:
    """The two searches chose alike wherever the decision was not a near-tie (tests/agreement.py):
    they run on other kernel shapes, whose rounding can flip a near-tie on some CPU. Where they
    chose alike, their scores agree."""
    a, b = [h.tokens for h in ours], [h.tokens for h in theirs]
    reference = teacher_forced(model)
    if beam:
        problems = beam_disagreements(reference, _sentences(model, src), a, b, CLOSE,
                                      our_criterion=gnmt(0.6), their_criterion=gnmt(0.6))
    else:
        problems = greedy_disagreements(reference, _sentences(model, src), a, b, CLOSE)
    assert problems == []
    for x, y in zip(ours, theirs):
        if x.tokens == y.tokens:
            assert abs(x.log_prob - y.log_prob) < CLOSE and abs(x.score - y.score) < CLOSE


CLOSE = 1e-4  # nats: rounding of one engine on two kernel shapes is below 1e-5


def test_cached_greedy_equals_full_recomputation() -> None:
    model, src = _setup(0, eos_boost=20)
    _same_search(model, src, greedy_search(model, src, Decoding(max_len_b=12)),
                 greedy_search(model, src, Decoding(max_len_b=12), use_cache=False), beam=False)


def test_cached_beam_equals_full_recomputation() -> None:
    model, src = _setup(2, eos_boost=5)
    _same_search(model, src, beam_search(model, src, Decoding(max_len_b=12)),
                 beam_search(model, src, Decoding(max_len_b=12), use_cache=False), beam=True)


def test_beam_of_one_equals_greedy() -> None:
    for seed, boost in [(0, 1.0), (2, 5.0), (0, 20.0)]:
        model, src = _setup(seed, boost)
        greedy = greedy_search(model, src, Decoding(max_len_b=10))
        beam = beam_search(model, src, Decoding(beam_size=1, max_len_b=10))
        _same_search(model, src, greedy, [replace(h, score=h.log_prob) for h in beam], beam=False)


def test_each_sentence_respects_its_own_maximum_length() -> None:
    model, src = _setup(2)
    lengths = (src != model.config.pad_id).sum(1).tolist()
    for search in (greedy_search, beam_search):
        for hyp, length in zip(search(model, src, Decoding(max_len_b=3)), lengths):
            assert len(hyp.tokens) + 1 <= length + 3  # EOS counts toward the limit
            assert model.config.eos_id not in hyp.tokens and model.config.pad_id not in hyp.tokens


@pytest.mark.parametrize("sentences", [4, 12])
def test_batched_search_equals_one_sentence_at_a_time(sentences: int) -> None:
    """Each sentence stops at its own EOS: batching changes no output. With 12 sentences, the first
    ones done stay in the batch (their rows searched on, their results taken) until a quarter are."""
    model, src = _setup(0, eos_boost=20, sentences=sentences)
    for search in (greedy_search, beam_search):
        batched = search(model, src, Decoding(max_len_b=8))
        alone = [search(model, torch.tensor([row]), Decoding(max_len_b=8))[0] for row in _sentences(model, src)]
        _same_search(model, src, batched, alone, beam=search is beam_search)
        assert len({len(h.tokens) for h in batched}) > 1  # some stopped early, some did not


def test_the_model_trains_on_after_a_search() -> None:
    """Search runs under inference mode, whose tensors autograd refuses: none may stay in the model
    (a lazily built table, a cache kept on a module), as validation BLEU searches mid-training."""
    model, src = _setup(0, eos_boost=20)
    for search in (greedy_search, beam_search):
        search(model, src, Decoding(max_len_b=4))
    model.train()
    logits = model(src, src[:, :5])
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in model.parameters() if p is not model.src_embed.positions.learned)


def test_hypothesis_scores_are_the_models_log_probabilities() -> None:
    """A hypothesis' log-probability is what the whole model gives its tokens and EOS (one
    sentence, no cache, a full log-softmax), and its score that over GNMT's length penalty."""
    model, src = _setup(2, eos_boost=5)
    reference = teacher_forced(model)
    for search in (greedy_search, beam_search):
        for hyp, source in zip(search(model, src, Decoding(max_len_b=10)), _sentences(model, src)):
            expected = sequence_log_prob(reference, source, hyp.tokens)
            assert abs(hyp.log_prob - expected) < CLOSE
            penalty = length_penalty(len(hyp.tokens) + 1, 0.6) if search is beam_search else 1.0
            assert abs(hyp.score - expected / penalty) < CLOSE


class _ScriptedStepper:
    """A decoder whose next-token distribution is written out by hand (vocab: pad unk bos eos a):
    after BOS, EOS and `a` with the probabilities `FIRST`; after that, `LATER`."""

    FIRST, LATER = (0.5, 0.5), (0.95, 0.05)

    def __init__(self, *_args) -> None:
        pass

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        probs = torch.full((prefix.shape[0], 5), 1e-9)
        probs[:, 3], probs[:, 4] = self.FIRST if prefix.shape[1] == 1 else self.LATER
        return probs.log()

    def reorder(self, _rows: torch.Tensor, sentences: torch.Tensor | None = None) -> None:
        pass


def test_length_normalisation_changes_the_winner(monkeypatch) -> None:
    """Raw log-probability prefers the empty translation (ln 0.5 = -0.693 against
    ln 0.5 + ln 0.95 = -0.744); GNMT's length penalty with alpha 0.6 divides the longer one by
    ((5 + 2) / 6) ** 0.6 = 1.097, giving -0.678, so it wins."""
    monkeypatch.setattr("transformer.decoding._Stepper", _ScriptedStepper)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=5)).eval()
    src = torch.tensor([[4, 4, 3]])
    [raw] = beam_search(model, src, Decoding(beam_size=2, alpha=0.0))
    [normalised] = beam_search(model, src, Decoding(beam_size=2))
    assert raw.tokens == [] and normalised.tokens == [4]


def test_early_exit_stops_a_sentence_once_its_best_extension_is_eos(monkeypatch) -> None:
    """After BOS, EOS 0.51 beats `a` 0.49, so early exit ends the search with the empty
    translation (ln 0.51 = -0.673). Searching on (fairseq's rule) finds `a EOS`, EOS 0.999 after
    `a`: ln(0.49 x 0.999) / 1.097 = -0.651, which wins."""

    class _Scripted(_ScriptedStepper):
        FIRST, LATER = (0.51, 0.49), (0.999, 0.001)

    monkeypatch.setattr("transformer.decoding._Stepper", _Scripted)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=5)).eval()
    src = torch.tensor([[4, 4, 3]])
    [searched_on] = beam_search(model, src, Decoding(beam_size=2))
    [exited] = beam_search(model, src, Decoding(beam_size=2, early_exit=True))
    assert searched_on.tokens == [4] and exited.tokens == []


def test_search_ends_once_no_live_beam_can_beat_the_best_finished(monkeypatch) -> None:
    """After BOS, EOS 0.9 and `a` 0.1; after `a`, `a` again. The empty translation scores
    ln 0.9 = -0.105; a live beam's log-probability (ln 0.1 = -2.30 at best) can only fall, and
    over the largest length penalty it can reach (length 3 + 50: ((5 + 53) / 6) ** 0.6 = 3.90) it
    scores at most -0.59. So the search ends after its first step, where waiting for a second
    finished hypothesis (fairseq's rule alone) would run to the length limit."""
    steps = []

    class _Scripted(_ScriptedStepper):
        FIRST, LATER = (0.9, 0.1), (1e-9, 1.0)

        def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
            steps.append(prefix.shape[1])
            return super().__call__(prefix)

    monkeypatch.setattr("transformer.decoding._Stepper", _Scripted)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=5)).eval()
    [best] = beam_search(model, torch.tensor([[4, 4, 3]]), Decoding(beam_size=2))
    assert best.tokens == [] and len(steps) == 1


def test_two_stage_top_k_equals_torch_top_k() -> None:
    """Rows as long as a vocabulary (one with a partial last block of 64), with their best entries
    crowded into one block, and a row of -inf but one entry (a sentence at its length limit)."""
    from transformer.decoding import _row_topk

    torch.manual_seed(0)
    x = torch.randn(12, 8000 + 37).log_softmax(-1)
    x[3, 640:648] += 20.0  # the 8 best of row 3 in one block
    x[5, -5:] += 20.0  # the best of row 5 in the partial block
    x[7] = float("-inf")
    x[7, 3] = 0.0
    values, columns = _row_topk(x, 8)
    expected, _ = x.topk(8, dim=1)
    assert torch.equal(values, expected)
    assert torch.equal(x.gather(1, columns), values)
    assert columns[3].sort().values.tolist() == list(range(640, 648))
    assert columns[7, 0] == 3 and all(len(set(row)) == 8 for row in columns.tolist())  # no column twice
