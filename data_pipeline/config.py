"""Typed settings of the data pipeline: what to prepare (`PrepareConfig`) and how to stream it
(`StreamConfig`). Validation messages name the full dotted key, as users write it in YAML."""

from __future__ import annotations

import re

from dataclasses import dataclass, field
from typing import Literal

SourceFormat = Literal["multi30k", "text", "tsv", "jsonl", "parquet", "hf"]
TokenizerModel = Literal["bpe", "unigram"]
InvalidUtf8 = Literal["error", "skip"]


@dataclass(frozen=True)
class CorpusConfig:
    """One training corpus of a mixture (`data.source.corpora`), read as `data.source.train` would
    be with this format and path. `weight` upsamples, as fairseq's and Marian's do: each pair is in
    the dataset `weight` times per epoch (2: twice); a fraction picks that share of the corpus's
    pairs, a fixed seeded choice (0.5: half of them, once)."""

    name: str = ""
    format: SourceFormat = "text"
    path: str = ""
    weight: float = 1.0
    src_field: str = ""
    tgt_field: str = ""
    hf_config: str = ""
    hf_split: str = "train"

    def check(self, key: str) -> None:
        check_name(self.name, f"{key}.name")
        if not self.name or not self.path:
            raise ValueError(f"{key}: a corpus needs a name and a path")
        if self.format == "multi30k":
            raise ValueError(f"{key}.format: the built-in multi30k is not a corpus of a mixture; give its files as text")
        if not 0 < self.weight <= 100:
            raise ValueError(f"{key}.weight={self.weight}: give an upsampling factor above 0 (at most 100)")


@dataclass(frozen=True)
class SourceConfig:
    """Where the corpus is. Paths are per split; `valid` and `test` are optional.

    text: a prefix, read as PREFIX.<lang> or PREFIX.<lang>.gz (one sentence a line);
    tsv / jsonl / parquet: a file (source and target in `src_field` / `tgt_field`);
    hf: a Hugging Face dataset: a local `save_to_disk` directory, a data file, or a dataset
    repository (a hub name, online only, or a local folder laid out as one), with its
    configuration (`hf_config`, e.g. "de-en" of "wmt14") and the split names below; rows hold
    `translation: {src, tgt}` or two columns;
    multi30k: the built-in corpus shipped in data_pipeline/corpora/multi30k (paths are ignored).
    Monolingual corpora (decoder-only models) leave tgt_lang empty.
    `corpora`: several training corpora mixed by weight (then `train` stays empty); `valid` and
    `test` are still read with `format`.
    """

    format: SourceFormat = "multi30k"
    train: str = ""
    valid: str = ""
    test: str = ""
    src_lang: str = "en"
    tgt_lang: str = "de"
    src_field: str = ""  # defaults to src_lang
    tgt_field: str = ""  # defaults to tgt_lang
    hf_splits: tuple[str, str, str] = ("train", "validation", "test")
    hf_config: str = ""  # the dataset's configuration (format hf): "de-en" for wmt14; empty for none
    # training corpora mixed by weight, each {name, format, path, weight, src_field, tgt_field, hf_config,
    # hf_split}: weight 2 reads a corpus twice an epoch, 0.5 a fixed seeded half of it once
    corpora: tuple[CorpusConfig, ...] = ()

    @property
    def monolingual(self) -> bool:
        return not self.tgt_lang

    def __post_init__(self) -> None:
        if self.corpora:
            if self.train:
                raise ValueError("data.source.train and data.source.corpora are both set; list every training "
                                 "corpus under corpora")
            for number, corpus in enumerate(self.corpora):
                corpus.check(f"data.source.corpora[{number}]")
            names = [corpus.name for corpus in self.corpora]
            if len(set(names)) != len(names):
                raise ValueError(f"data.source.corpora: names must differ, got {names}")
        elif self.format != "multi30k" and not self.train:
            raise ValueError(f"data.source.train is required for data.source.format={self.format}")
        if self.format == "multi30k" and {self.src_lang, self.tgt_lang} - {"en", "de", "fr"}:
            raise ValueError("data.source.src_lang / tgt_lang must be en, de or fr for the built-in multi30k")


@dataclass(frozen=True)
class CleaningConfig:
    """Rules applied to the training split; every dropped pair is counted by reason."""

    max_words: int = 250  # per side, whitespace words
    max_length_ratio: float = 3.0  # longer side / shorter side, in words (pairs of >= 1 word)
    deduplicate: bool = True
    invalid_utf8: InvalidUtf8 = "error"  # "skip" drops and counts undecodable lines instead

    def __post_init__(self) -> None:
        if self.max_words <= 0:
            raise ValueError(f"data.cleaning.max_words must be positive, got {self.max_words}")
        if self.max_length_ratio < 1.0:
            raise ValueError(f"data.cleaning.max_length_ratio must be >= 1, got {self.max_length_ratio}")


@dataclass(frozen=True)
class TokenizerConfig:
    """One joint SentencePiece model; ids pad=0, unk=1, bos=2, eos=3 are fixed."""

    path: str = ""  # an existing .model to reuse; empty trains a new one
    model_type: TokenizerModel = "bpe"
    vocab_size: int = 8000
    sample_sentences: int = 1_000_000  # random sample size the model is trained on
    character_coverage: float = 1.0

    def __post_init__(self) -> None:
        if self.vocab_size < 16:
            raise ValueError(f"data.tokenizer.vocab_size must be at least 16, got {self.vocab_size}")
        if self.sample_sentences <= 0:
            raise ValueError("data.tokenizer.sample_sentences must be positive")


_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def check_name(value: str, key: str) -> None:
    """Names become directory names under a storage root: no path separators, no `..`, no hidden files."""
    if value and not _SAFE_NAME.fullmatch(value):
        raise ValueError(f"{key}={value!r}: use letters, digits, '.', '_' and '-' only, not starting with '.'")


@dataclass(frozen=True)
class PrepareConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    output_dir: str = "data"  # local directory or a URI PyArrow can write (s3://, gs://, ...)
    name: str = ""  # dataset directory name; defaults to <format>-<src>-<tgt>
    shard_rows: int = 100_000
    encode_actors: int = 0  # encoding actors, one SentencePiece thread each; 0: one per CPU of the cluster
    encode_batch_rows: int = 32768  # rows per encoded batch: bounds an actor's memory
    seed: int = 1

    def __post_init__(self) -> None:
        for key in ("shard_rows", "encode_batch_rows"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key} must be positive, got {getattr(self, key)}")
        if self.encode_actors < 0:
            raise ValueError(f"data.encode_actors must be 0 (one per CPU) or positive, got {self.encode_actors}")
        check_name(self.name, "data.name")

    @property
    def dataset_name(self) -> str:
        if self.name:
            return self.name
        langs = self.source.src_lang + (f"-{self.source.tgt_lang}" if self.source.tgt_lang else "")
        return f"{self.source.format}-{langs}"

    @property
    def dataset_uri(self) -> str:
        return f"{self.output_dir.rstrip('/')}/{self.dataset_name}"


@dataclass(frozen=True)
class StreamConfig:
    """How each worker turns its part of the shards into batches."""

    max_tokens: int = 2048  # padded tokens per batch, max(source, target) length x rows, like fairseq
    max_sentences: int = 0  # 0: no limit on rows per batch
    window_rows: int = 16_384  # bounded sort buffer: rows shuffled, length-sorted and batched together
    unit_rows: int = 1024  # the unit of work split across ranks
    seed: int = 1
    packed_length: int = 256  # decoder-only: tokens per packed sequence
    prefetch_windows: int = 1  # windows prepared ahead in a background thread
    # Subword regularization of the train split (Kudo 2018; BPE-dropout, Provilkov et al. 2020 for a
    # bpe model): every epoch segments each example anew, seeded by (seed, epoch, example). 0: off.
    sampling_alpha: float = 0.0

    def __post_init__(self) -> None:
        for key in ("max_tokens", "window_rows", "unit_rows", "packed_length"):
            if getattr(self, key) <= 0:
                raise ValueError(f"stream.{key} must be positive, got {getattr(self, key)}")
        if not 0 <= self.sampling_alpha < 1:
            raise ValueError(f"stream.sampling_alpha must be 0 (off) or below 1, got {self.sampling_alpha}")
        if self.window_rows < self.unit_rows:
            raise ValueError("stream.window_rows must be at least stream.unit_rows")
