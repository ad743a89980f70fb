"""A translation's scores: sacreBLEU's BLEU and chrF with their signatures, the one place that
computes them (evaluation, validation and the registry's tags read them from here)."""

from __future__ import annotations

from dataclasses import dataclass

import sacrebleu


@dataclass(frozen=True)
class Scores:
    """sacreBLEU's corpus BLEU and chrF (character n-gram F-score, which fairseq, Marian and WMT
    report beside BLEU) of detokenized text, with the signatures that make them reproducible."""

    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/bleu": self.bleu, f"{prefix}/chrf": self.chrf}


def corpus_scores(hypotheses: list[str], references: list[str]) -> Scores:
    """BLEU with sacreBLEU's defaults (13a tokenization) and chrF (chrF2, character 6-grams)."""
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    return Scores(bleu.corpus_score(hypotheses, [references]).score, chrf.corpus_score(hypotheses, [references]).score,
                  str(bleu.get_signature()), str(chrf.get_signature()))
