"""Incremental decoding equals recomputation; beam 1 equals greedy; per-sentence stopping."""

import torch

from transformer import build_model, preset
from transformer.decoding import beam_search, greedy_search

VOCAB = 40


def _setup(seed: int = 0, eos_boost: float = 1.0):
    """A random tiny model; eos_boost > 1 makes some sentences end early and others not."""
    torch.manual_seed(seed)
    model = build_model(preset("tiny", vocab_size=VOCAB)).eval()
    with torch.no_grad():
        model.output.proj.weight[model.config.eos_id] *= eos_boost
    src = torch.randint(4, VOCAB, (4, 9))
    src[1, 6:] = model.config.pad_id
    src[3, 3:] = model.config.pad_id
    return model, src


def test_cached_greedy_equals_full_recomputation() -> None:
    model, src = _setup(0, eos_boost=20)
    cached = greedy_search(model, src, max_len_b=12)
    recomputed = greedy_search(model, src, max_len_b=12, use_cache=False)
    assert [h.tokens for h in cached] == [h.tokens for h in recomputed]
    for a, b in zip(cached, recomputed):
        assert abs(a.log_prob - b.log_prob) < 1e-4


def test_cached_beam_equals_full_recomputation() -> None:
    model, src = _setup(2, eos_boost=5)
    cached = beam_search(model, src, beam_size=4, max_len_b=12)
    recomputed = beam_search(model, src, beam_size=4, max_len_b=12, use_cache=False)
    assert [h.tokens for h in cached] == [h.tokens for h in recomputed]
    for a, b in zip(cached, recomputed):
        assert abs(a.score - b.score) < 1e-4


def test_beam_of_one_equals_greedy() -> None:
    for seed, boost in [(0, 1.0), (2, 5.0), (0, 20.0)]:
        model, src = _setup(seed, boost)
        greedy = greedy_search(model, src, max_len_b=10)
        beam = beam_search(model, src, beam_size=1, max_len_b=10)
        assert [h.tokens for h in greedy] == [h.tokens for h in beam]
        for g, b in zip(greedy, beam):
            assert abs(g.log_prob - b.log_prob) < 1e-5  # finished sentences leave the batch: other kernel blocking


def test_each_sentence_respects_its_own_maximum_length() -> None:
    model, src = _setup(2)
    lengths = (src != model.config.pad_id).sum(1).tolist()
    for search in (greedy_search, beam_search):
        for hyp, length in zip(search(model, src, max_len_b=3), lengths):
            assert len(hyp.tokens) + 1 <= length + 3  # EOS counts toward the limit
            assert model.config.eos_id not in hyp.tokens and model.config.pad_id not in hyp.tokens


def test_batched_search_equals_one_sentence_at_a_time() -> None:
    """Each sentence stops at its own EOS: batching changes no output."""
    model, src = _setup(0, eos_boost=20)
    for search in (greedy_search, beam_search):
        batched = search(model, src, max_len_b=8)
        for row, hyp in enumerate(batched):
            length = int((src[row] != model.config.pad_id).sum())
            alone = search(model, src[row : row + 1, :length], max_len_b=8)[0]
            assert alone.tokens == hyp.tokens
            assert abs(alone.log_prob - hyp.log_prob) < 1e-4
        assert len({len(h.tokens) for h in batched}) > 1  # some stopped early, some did not


class _ScriptedStepper:
    """A decoder whose next-token distribution is written out by hand (vocab: pad unk bos eos a):
    after BOS, EOS 0.5 and `a` 0.5; after `a`, EOS 0.95; later, EOS 0.95 again."""

    def __init__(self, *_args) -> None:
        pass

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        probs = torch.full((prefix.shape[0], 5), 1e-9)
        probs[:, 3], probs[:, 4] = (0.5, 0.5) if prefix.shape[1] == 1 else (0.95, 0.05)
        return probs.log()

    def reorder(self, _index: torch.Tensor) -> None:
        pass


def test_length_normalisation_changes_the_winner(monkeypatch) -> None:
    """Raw log-probability prefers the empty translation (ln 0.5 = -0.693 against
    ln 0.5 + ln 0.95 = -0.744); GNMT's length penalty with alpha 0.6 divides the longer one by
    ((5 + 2) / 6) ** 0.6 = 1.097, giving -0.678, so it wins."""
    monkeypatch.setattr("transformer.decoding._Stepper", _ScriptedStepper)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=5)).eval()
    src = torch.tensor([[4, 4, 3]])
    [raw] = beam_search(model, src, beam_size=2, alpha=0.0)
    [normalised] = beam_search(model, src, beam_size=2, alpha=0.6)
    assert raw.tokens == [] and normalised.tokens == [4]
