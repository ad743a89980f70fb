"""`aiayn prepare`'s encoding stage against a plain single-process SentencePiece loop, per core.

A corpus of `--pairs` pairs is generated from the shipped Multi30K sentences (drawn at random) and
written as prepare's raw Parquet file; a tokenizer is trained on a sample. Then, in one run:
- plain: one process, one SentencePiece thread, both sides encoded in batches of 32768, without
  and with prepare's Parquet I/O (read the raw file, write the encoded shards);
- ours: prepare's own `_encode_split` (Ray Data read -> actor-pool encode -> Parquet shards) on a
  local Ray with `--cpus` CPUs; its rate divided by the CPUs is the per-core figure.
The ratios are ours-per-core / plain.

    python bench/prepare_encoding.py --pairs 1000000 --cpus 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CORPUS = Path(__file__).resolve().parents[1] / "data_pipeline" / "corpora" / "multi30k"


def generated_pairs(count: int, seed: int) -> pa.Table:
    """`count` (English, German) pairs drawn from Multi30K's training pairs, as prepare stages them."""
    en = gzip.open(CORPUS / "train.en.gz", "rt", encoding="utf-8").read().splitlines()
    de = gzip.open(CORPUS / "train.de.gz", "rt", encoding="utf-8").read().splitlines()
    pick = np.random.default_rng(seed).integers(0, len(en), count)
    return pa.table({"index": np.arange(count, dtype=np.int64),
                     "src_text": pa.array(en, pa.string()).take(pick), "tgt_text": pa.array(de, pa.string()).take(pick)})


def plain_loop(raw: Path, model: bytes, out: Path | None) -> float:
    """Pairs/s of one process and one thread reading the raw file; with `out`, also writing the
    encoded columns as Parquet shards as prepare does (the same work as ours, without Ray)."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=model)
    writer = None
    start = time.perf_counter()
    for batch in pq.ParquetFile(raw).iter_batches(batch_size=32768, columns=["src_text", "tgt_text"]):
        columns = {}
        for side in ("src", "tgt"):
            ids = processor.encode(batch.column(f"{side}_text").to_pylist(), add_eos=True, num_threads=1)
            columns[f"{side}_ids"] = pa.array(ids, type=pa.list_(pa.int32()))
            columns[f"{side}_len"] = pa.compute.list_value_length(columns[f"{side}_ids"])
        if out is not None:
            table = pa.table(columns)
            writer = writer or pq.ParquetWriter(out, table.schema)
            writer.write_table(table)
    if writer is not None:
        writer.close()
    return pq.ParquetFile(raw).metadata.num_rows / (time.perf_counter() - start)


def ours(raw: Path, out: Path, model: bytes, cpus: int, batch_rows: int, actors: int) -> float:
    """Pairs/s of prepare's encoding stage on `cpus` CPUs."""
    import ray

    from data_pipeline.config import PrepareConfig
    from data_pipeline.prepare import PreparePlan, _encode_split

    config = PrepareConfig(output_dir=str(out), encode_batch_rows=batch_rows, encode_actors=actors)
    plan = PreparePlan(config=config, inputs={}, described_inputs=[], fingerprint="bench", up_to_date=False)
    rows = pq.ParquetFile(raw).metadata.num_rows
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
    try:
        start = time.perf_counter()
        _encode_split(plan, "train", str(raw), model, str(out / "train"))
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    encoded = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "train").glob("*.parquet"))
    assert encoded == rows, f"encoded {encoded} of {rows} rows"
    return rows / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--batch-rows", type=int, default=32768, help="data.encode_batch_rows")
    parser.add_argument("--actors", type=int, default=1, help="data.encode_actors")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    from data_pipeline.config import TokenizerConfig
    from data_pipeline.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="aiayn-bench-prepare-") as scratch:
        work = Path(scratch)
        table = generated_pairs(args.pairs, args.seed)
        raw = work / "raw" / "train.parquet"
        raw.parent.mkdir()
        pq.write_table(table, raw)
        sample = table.slice(0, 50_000)
        model_path = train_tokenizer(sample.column("src_text").to_pylist() + sample.column("tgt_text").to_pylist(),
                                     TokenizerConfig(vocab_size=8000), work / "tokenizer")
        model = model_path.read_bytes()
        plain = plain_loop(raw, model, None)
        plain_io = plain_loop(raw, model, work / "plain.parquet")
        rate = ours(raw, work / "dataset", model, args.cpus, args.batch_rows, args.actors)
        plain_again = plain_loop(raw, model, None)  # the machine did not change speed meanwhile
    result = {
        "pairs": args.pairs, "cpus": args.cpus, "batch_rows": args.batch_rows, "actors": args.actors,
        "plain_encode_only_pairs_per_s": round(plain), "plain_encode_only_again_pairs_per_s": round(plain_again),
        "plain_with_parquet_io_pairs_per_s": round(plain_io),
        "ours_pairs_per_s": round(rate), "ours_pairs_per_s_per_core": round(rate / args.cpus),
        "ratio_per_core_ours_vs_plain_encode_only": round(rate / args.cpus / plain, 3),
        "ratio_per_core_ours_vs_plain_with_io": round(rate / args.cpus / plain_io, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
