"""The paper's BLEU (Table 2): Moses-tokenized, compounds split, never mixed up with sacreBLEU."""

from __future__ import annotations

import pytest
import sacrebleu
from sacremoses import MosesTokenizer

from jobs.inference.scores import corpus_scores, tokenized_bleu

HYPOTHESES = ["Ein Mann fährt ein rot-weißes Fahrrad.", "Zwei Hunde spielen im Schnee, oder?"]
REFERENCES = ["Ein Mann fährt ein rot-blaues Fahrrad.", "Zwei Hunde spielen im tiefen Schnee, oder?"]


def test_a_hyphenated_compound_is_split_so_its_shared_half_counts() -> None:
    """"rot-weißes" against "rot-blaues": one token each, no match, without the split; with it,
    "rot" and the hyphen token match, as in tensor2tensor's get_ende_bleu.sh."""
    moses = MosesTokenizer(lang="de")
    unsplit = sacrebleu.corpus_bleu([moses.tokenize(h, return_str=True) for h in HYPOTHESES],
                                    [[moses.tokenize(r, return_str=True) for r in REFERENCES]],
                                    tokenize="none", force=True).score
    assert tokenized_bleu(HYPOTHESES, REFERENCES, "de") > unsplit
    # the same sentences twice score 100
    assert tokenized_bleu(REFERENCES, REFERENCES, "de") == pytest.approx(100.0)


def test_the_moses_tokenizer_decides_what_a_token_is() -> None:
    """Punctuation is split off by Moses' rules, so "Fahrrad." matches "Fahrrad ." and the
    sentence-final period counts once; a hypothesis that differs only in spacing scores 100."""
    spaced = ["Ein Mann fährt ein rot-blaues Fahrrad .", "Zwei Hunde spielen im tiefen Schnee , oder ?"]
    assert tokenized_bleu(spaced, REFERENCES, "de") == pytest.approx(100.0)


def test_it_is_its_own_figure_beside_sacrebleus_and_only_with_a_language() -> None:
    scores = corpus_scores(HYPOTHESES, REFERENCES, "de")
    assert scores.tokenized_bleu is not None and scores.tokenized_bleu != scores.bleu
    assert set(scores.metrics("test")) == {"test/bleu", "test/chrf", "test/tokenized_bleu"}
    without = corpus_scores(HYPOTHESES, REFERENCES)
    assert without.tokenized_bleu is None and set(without.metrics("test")) == {"test/bleu", "test/chrf"}
    assert without.bleu == scores.bleu  # sacreBLEU's figure is untouched by the other


def test_the_figures_agree_with_n_grams_counted_by_hand() -> None:
    """One pair whose n-grams are counted here by hand, as multi-bleu.perl counts them.

    Moses splits the final period off and keeps "rot-weißes" whole; the compound split then makes
    it "rot ##AT##-##AT## weißes": 12 tokens a side, differing in the 7th only (weißes / blaues).
    Matches: 1-grams 11 of 12, 2-grams 9 of 11, 3-grams 7 of 10, 4-grams 5 of 9 (every n-gram
    over the 7th token misses); equal lengths, no brevity penalty:
    100 * (11/12 * 9/11 * 7/10 * 5/9) ** (1/4) = 73.489.
    sacreBLEU's 13a keeps "rot-weißes" whole (it splits a hyphen only after a digit): 10 tokens,
    differing in the 5th: 9/10, 7/9, 5/8, 3/7: 100 * (0.9 * 7/9 * 5/8 * 3/7) ** (1/4) = 65.804."""
    hypothesis = ["ein Mann fährt ein rot-weißes Fahrrad durch die Stadt."]
    reference = ["ein Mann fährt ein rot-blaues Fahrrad durch die Stadt."]
    scores = corpus_scores(hypothesis, reference, "de")
    assert scores.tokenized_bleu == pytest.approx(73.489, abs=0.001)
    assert scores.bleu == pytest.approx(65.804, abs=0.001)
