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
