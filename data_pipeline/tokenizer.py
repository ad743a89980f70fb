"""One joint SentencePiece model with fixed special ids, trained on a bounded random sample."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from data_pipeline import storage
from data_pipeline.config import TokenizerConfig
from data_pipeline.errors import InputError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class ReservoirSample:
    """Uniform sample of at most `capacity` items from a stream of unknown length (Algorithm R)."""

    def __init__(self, capacity: int, seed: int):
        self.capacity, self.items, self.seen = capacity, [], 0
        self._random = random.Random(seed)

    def add(self, item: str) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
        else:
            slot = self._random.randrange(self.seen)
            if slot < self.capacity:
                self.items[slot] = item


def train_tokenizer(sentences: Iterable[str], config: TokenizerConfig, output: Path, threads: int = 2) -> Path:
    """Train `output`.model from the sample; returns the model path."""
    corpus = output.with_suffix(".sample.txt")
    corpus.write_text("\n".join(s.replace("\n", " ") for s in sentences) + "\n", encoding="utf-8")
    try:
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(output.with_suffix("")), model_type=config.model_type,
            vocab_size=config.vocab_size, character_coverage=config.character_coverage,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            hard_vocab_limit=False, num_threads=threads, minloglevel=2,
        )
    finally:
        corpus.unlink(missing_ok=True)
    return output.with_suffix(".model")


def load_tokenizer(uri: str) -> spm.SentencePieceProcessor:
    """A SentencePiece model from a path or URI, checked for aiayn's fixed special ids."""
    if not storage.is_file(uri):
        raise InputError(f"{uri}: tokenizer model not found; run `aiayn prepare` or fix data.tokenizer.path")
    with storage.open_input(uri) as handle:
        return tokenizer_from_bytes(handle.read(), uri)


def tokenizer_from_bytes(model_proto: bytes, where: str = "tokenizer") -> spm.SentencePieceProcessor:
    """The one way aiayn loads SentencePiece (also in Ray Data's encoding actors, which get bytes)."""
    processor = spm.SentencePieceProcessor(model_proto=model_proto)
    ids = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
    if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
        raise InputError(f"{where}: special ids (pad, unk, bos, eos) are {ids}, expected (0, 1, 2, 3)")
    return processor


def sampled_segmentation(processor: spm.SentencePieceProcessor, values: np.ndarray, offsets: np.ndarray,
                         seeds: list[int], alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Subword regularization: each row (token ids ending in EOS) segmented again by SentencePiece's
    sampling (BPE-dropout with drop probability `alpha` for a bpe model, a draw from the lattice
    smoothed by `alpha` for a unigram one), seeded by its own seed, so that a row's pieces depend on
    nothing but its seed. The ids are decoded back to text first: the prepared shards hold ids only,
    and SentencePiece's decoding gives the text back (a character the model does not know stays
    unknown). Returns the new (values, offsets)."""
    rows = []
    for row, seed in enumerate(seeds):
        ids = values[offsets[row]:offsets[row + 1]].tolist()
        spm.set_random_generator_seed(seed)  # process-wide: the stream's one encoding thread is its only user
        rows.append(processor.encode(processor.decode(ids[:-1] if ids and ids[-1] == EOS_ID else ids),
                                     add_eos=True, enable_sampling=True, alpha=alpha, nbest_size=-1))
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    flat = np.fromiter((i for r in rows for i in r), dtype=values.dtype, count=int(new_offsets[-1]))
    return flat, new_offsets
