"""A translation's scores, the one place that computes them (evaluation, validation and the
registry's tags read them from here): sacreBLEU's BLEU and chrF with their signatures, and, where
the target language is known, the tokenized BLEU with compound splitting that the paper's Table 2
reports, which is another measure (usually higher on the same output) and is always named as such."""

from __future__ import annotations

import re
from dataclasses import dataclass

import sacrebleu

# tensor2tensor's get_ende_bleu.sh and fairseq's compound_split_bleu.sh: perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'
COMPOUND = re.compile(r"(\S)-(\S)")
TOKENIZED_BLEU = "tokenized BLEU (Moses tokenizer, compounds split, as the paper's Table 2)"


@dataclass(frozen=True)
class Scores:
    """sacreBLEU's corpus BLEU and chrF (character n-gram F-score, which fairseq, Marian and WMT
    report beside BLEU) of detokenized text, with the signatures that make them reproducible."""

    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    tokenized_bleu: float | None = None  # `tokenized_bleu`: comparable with the paper, not with sacreBLEU

    def metrics(self, prefix: str) -> dict[str, float]:
        tokenized = {} if self.tokenized_bleu is None else {f"{prefix}/tokenized_bleu": self.tokenized_bleu}
        return {f"{prefix}/bleu": self.bleu, f"{prefix}/chrf": self.chrf, **tokenized}


def corpus_scores(hypotheses: list[str], references: list[str], language: str = "") -> Scores:
    """BLEU with sacreBLEU's defaults (13a tokenization) and chrF (chrF2, character 6-grams); with
    the target `language`, the paper's tokenized BLEU too."""
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    return Scores(bleu.corpus_score(hypotheses, [references]).score, chrf.corpus_score(hypotheses, [references]).score,
                  str(bleu.get_signature()), str(chrf.get_signature()),
                  tokenized_bleu(hypotheses, references, language) if language else None)


def tokenized_bleu(hypotheses: list[str], references: list[str], language: str) -> float:
    """BLEU as Table 2 reports it, computed as tensor2tensor's get_ende_bleu.sh does: both sides
    tokenized by the Moses tokenizer with `language`'s rules (sacremoses, the Python port of
    tokenizer.perl, escaping as it does), each hyphen between two non-blanks made a token of its
    own (`##AT##-##AT##`), then BLEU over those tokens as they are (multi-bleu.perl's)."""
    from sacremoses import MosesTokenizer  # a third of a second of regexes: only where it is computed

    moses = MosesTokenizer(lang=language)

    def split(line: str) -> str:
        return COMPOUND.sub(r"\1 ##AT##-##AT## \2", moses.tokenize(line, return_str=True))

    return sacrebleu.corpus_bleu([split(h) for h in hypotheses], [[split(r) for r in references]],
                                 tokenize="none", force=True).score
