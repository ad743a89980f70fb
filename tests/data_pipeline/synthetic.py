"""Small datasets made by the tests themselves: parallel text corpora and ready-made shards."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.config import TokenizerConfig
from data_pipeline.manifest import SCHEMA_VERSION, describe_split
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer

WORDS = "a man woman dog cat runs walks red blue big small the on in with street park ball child".split()


def write_parallel_corpus(directory: Path, rows: int, seed: int = 0, prefix: str = "train") -> str:
    """prefix.en / prefix.de where the German side is the English words reversed (a learnable map)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    en, de = [], []
    for _ in range(rows):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 12))]
        en.append(" ".join(words))
        de.append(" ".join(reversed(words)).upper())
    (directory / f"{prefix}.en").write_text("\n".join(en) + "\n", encoding="utf-8")
    (directory / f"{prefix}.de").write_text("\n".join(de) + "\n", encoding="utf-8")
    return str(directory / prefix)


def write_token_dataset(directory: Path, rows: int, shard_rows: int, monolingual: bool = False, seed: int = 0) -> Path:
    """A dataset in the prepared layout without SentencePiece: row i's source starts with its id,
    so tests can tell every example apart. Lengths vary from 2 to 40 tokens."""
    rng = np.random.default_rng(seed)
    split_dir = directory / "train"
    split_dir.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, rows, shard_rows)):
        ids = range(start, min(start + shard_rows, rows))
        src = [[4 + (i // 1000), 4 + (i % 1000)] + rng.integers(4, 1000, rng.integers(0, 38)).tolist() + [3] for i in ids]
        columns = {"src_ids": pa.array(src, pa.list_(pa.int32())), "src_len": pa.array([len(s) for s in src], pa.int32())}
        if not monolingual:
            tgt = [rng.integers(4, 1000, rng.integers(1, 39)).tolist() + [3] for _ in ids]
            columns["tgt_ids"] = pa.array(tgt, pa.list_(pa.int32()))
            columns["tgt_len"] = pa.array([len(t) for t in tgt], pa.int32())
        pq.write_table(pa.table(columns), split_dir / f"part-{shard:05d}.parquet")
    manifest = {
        "schema_version": SCHEMA_VERSION, "monolingual": monolingual,
        "tokenizer": {"file": "tokenizer.model", "sha256": "0" * 64, "vocab_size": 1004},
        "splits": {"train": describe_split(str(directory), "train")},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def example_id(src_row: list[int]) -> int:
    return (src_row[0] - 4) * 1000 + (src_row[1] - 4)


def write_text_dataset(directory: Path, rows: int, shard_rows: int, vocab_size: int = 120) -> Path:
    """A dataset in the prepared layout encoded by a real (small) SentencePiece BPE model, for the
    tests that segment text again. Row i's English side begins with the word `n<i>`
    (`text_example_id` reads it back from the decoded text)."""
    rng = random.Random(0)
    pairs = []
    for i in range(rows):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        pairs.append((f"n{i} " + " ".join(words), " ".join(reversed(words)).upper()))
    directory.mkdir(parents=True, exist_ok=True)
    model = train_tokenizer([text for pair in pairs for text in pair],
                            TokenizerConfig(vocab_size=vocab_size), directory / "tokenizer")
    processor = load_tokenizer(str(model))
    split_dir = directory / "train"
    split_dir.mkdir()
    for shard, start in enumerate(range(0, rows, shard_rows)):
        chunk = pairs[start:start + shard_rows]
        src = processor.encode([en for en, _ in chunk], add_eos=True)
        tgt = processor.encode([de for _, de in chunk], add_eos=True)
        pq.write_table(pa.table({
            "src_ids": pa.array(src, pa.list_(pa.int32())), "src_len": pa.array([len(s) for s in src], pa.int32()),
            "tgt_ids": pa.array(tgt, pa.list_(pa.int32())), "tgt_len": pa.array([len(t) for t in tgt], pa.int32()),
        }), split_dir / f"part-{shard:05d}.parquet")
    manifest = {
        "schema_version": SCHEMA_VERSION, "monolingual": False,
        "tokenizer": {"file": model.name, "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
                      "vocab_size": processor.get_piece_size()},
        "splits": {"train": describe_split(str(directory), "train")},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def text_example_id(text: str) -> int:
    return int(text.split()[0][1:])
