"""`aiayn prepare`'s encoding stage against a hand-written two-process SentencePiece loop.

Corpora of each `--pairs` size are generated from the shipped Multi30K sentences (drawn at random)
and written as prepare's raw Parquet file; a tokenizer is trained on a sample. Then, per size:
- peer: `--cpus` processes started for the job, each reading its share of the raw file's row
  groups, encoding both sides with one SentencePiece thread and writing its own Parquet shard;
- ours: prepare's own `_encode_split` (Ray Data actor pool, one task per shard: each actor reads
  the rows of the shard it is handed, encodes them and writes the shard) on a local Ray with
  `--cpus` CPUs, started before the clock (a user's cluster is already up).
The raw file has the row groups prepare's staging writes.
Both are timed from the call to the last shard written, process or actor start included. The
steady-state rate of each is the slope between the two sizes (pairs added / seconds added), which
leaves out what either spends once; its ratio ours / peer is the figure (goal >= 0.9). The peak
memory of the processes that did the work (the peer's, or Ray's daemons and workers) is sampled at
each size as their summed proportional set size (PSS: a page shared by several processes, as Ray's
object store is, counts once): flat in corpus size is the goal.
To split the gap into the code and where it runs, both encoders' code is also timed alone, in this
process on one thread, on a corpus of `--code-pairs` (the peer's loop over all row groups, and
prepare's `_ShardWriter` over all shards; alternating, medians): `ratio_code_alone_ours_vs_peer`.

    python bench/prepare_encoding.py --pairs 1000000 4000000 --cpus 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from _provenance import ROOT, provenance
from data_pipeline.prepare import STAGED_ROW_GROUP_ROWS

CORPUS = ROOT / "data_pipeline" / "corpora" / "multi30k"


def generated_pairs(count: int, seed: int) -> pa.Table:
    """`count` (English, German) pairs drawn from Multi30K's training pairs, as prepare stages them."""
    en = gzip.open(CORPUS / "train.en.gz", "rt", encoding="utf-8").read().splitlines()
    de = gzip.open(CORPUS / "train.de.gz", "rt", encoding="utf-8").read().splitlines()
    pick = np.random.default_rng(seed).integers(0, len(en), count)
    return pa.table({"index": np.arange(count, dtype=np.int64),
                     "src_text": pa.array(en, pa.string()).take(pick), "tgt_text": pa.array(de, pa.string()).take(pick)})


class PeakMemory:
    """The largest sum of proportional set sizes over this process's descendants, sampled: the
    peer's two processes, or Ray's daemons and workers. This process is left out: it holds the
    generated corpus, which grows with the size by construction."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)

    def _sample(self, every_s: float) -> None:
        me = psutil.Process()
        while not self._stop.wait(every_s):
            total = 0
            for process in me.children(recursive=True):
                try:
                    total += process.memory_full_info().pss
                except psutil.Error:
                    pass  # exited meanwhile
            self.peak = max(self.peak, total)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


def _peer_process(raw: str, model: bytes, groups: list[int], out: str) -> None:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=model)
    source, writer = pq.ParquetFile(raw), None
    for group in groups:
        batch = source.read_row_group(group, columns=["src_text", "tgt_text"])
        columns = {}
        for side in ("src", "tgt"):
            ids = processor.encode(batch.column(f"{side}_text").to_pylist(), add_eos=True, num_threads=1)
            columns[f"{side}_ids"] = pa.array(ids, type=pa.list_(pa.int32()))
            columns[f"{side}_len"] = pa.compute.list_value_length(columns[f"{side}_ids"])
        table = pa.table(columns)
        writer = writer or pq.ParquetWriter(out, table.schema)
        writer.write_table(table)
    if writer is not None:
        writer.close()


def peer(raw: Path, out: Path, model: bytes, cpus: int) -> float:
    """Seconds for `cpus` fresh processes to encode the raw file's row groups, dealt round-robin."""
    groups = pq.ParquetFile(raw).metadata.num_row_groups
    out.mkdir()
    start = time.perf_counter()
    processes = [multiprocessing.get_context("spawn").Process(
        target=_peer_process, args=(str(raw), model, list(range(i, groups, cpus)), str(out / f"part-{i}.parquet")))
        for i in range(cpus)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        assert process.exitcode == 0
    return time.perf_counter() - start


def ours(raw: Path, out: Path, model: bytes, batch_rows: int, actors: int) -> float:
    """Seconds of prepare's encoding stage on the running Ray."""
    from data_pipeline.config import PrepareConfig
    from data_pipeline.prepare import PreparePlan, _encode_split

    config = PrepareConfig(output_dir=str(out), encode_batch_rows=batch_rows, encode_actors=actors)
    plan = PreparePlan(config=config, inputs={}, described_inputs=[], fingerprint="bench", up_to_date=False)
    start = time.perf_counter()
    _encode_split(plan, "train", str(raw), model, str(out / "train"))
    return time.perf_counter() - start


def code_alone(raw: Path, out: Path, model: bytes, batch_rows: int, rounds: int = 3) -> dict:
    """Seconds of each encoder's own code over all of `raw`, in this process, one thread, no Ray."""
    import pyarrow.fs as pafs

    from data_pipeline.config import PrepareConfig
    from data_pipeline.prepare import _ShardWriter

    groups, rows = pq.ParquetFile(raw).metadata.num_row_groups, pq.ParquetFile(raw).metadata.num_rows
    shard_rows, local = PrepareConfig().shard_rows, pafs.LocalFileSystem()
    times: dict[str, list[float]] = {"peer": [], "ours": []}
    for index in range(rounds):
        start = time.perf_counter()
        _peer_process(str(raw), model, list(range(groups)), str(out / f"peer-{index}.parquet"))
        times["peer"].append(time.perf_counter() - start)
        (out / f"ours-{index}").mkdir()
        start = time.perf_counter()
        writer = _ShardWriter((local, str(raw)), (local, str(out / f"ours-{index}")), shard_rows, batch_rows,
                              (model, False, False), threads=1)
        for shard in range(-(-rows // shard_rows)):
            writer.write(shard)
        times["ours"].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"pairs": rows, "seconds": {name: round(s, 2) for name, s in median.items()},
            "ratio_code_alone_ours_vs_peer": round(median["peer"] / median["ours"], 3)}


def _rows(directory: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in directory.rglob("*.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, nargs=2, default=[1_000_000, 4_000_000], help="the two corpus sizes")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--batch-rows", type=int, default=32768, help="data.encode_batch_rows")
    parser.add_argument("--actors", type=int, default=0, help="data.encode_actors (0: one per CPU)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--code-pairs", type=int, default=200_000, help="corpus of the code-alone comparison")
    args = parser.parse_args()

    import ray

    from data_pipeline.config import TokenizerConfig
    from data_pipeline.tokenizer import train_tokenizer

    sizes: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="aiayn-bench-prepare-") as scratch:
        work = Path(scratch)
        sample = generated_pairs(50_000, args.seed)
        model = train_tokenizer(sample.column("src_text").to_pylist() + sample.column("tgt_text").to_pylist(),
                                TokenizerConfig(vocab_size=8000), work / "tokenizer").read_bytes()
        code_raw = work / "raw-code" / "train.parquet"
        code_raw.parent.mkdir()
        pq.write_table(generated_pairs(args.code_pairs, args.seed), code_raw, row_group_size=STAGED_ROW_GROUP_ROWS)
        code = code_alone(code_raw, code_raw.parent, model, args.batch_rows)
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        try:
            for pairs in sorted(args.pairs):
                raw = work / f"raw-{pairs}" / "train.parquet"
                raw.parent.mkdir()
                pq.write_table(generated_pairs(pairs, args.seed), raw, row_group_size=STAGED_ROW_GROUP_ROWS)
                with PeakMemory() as peer_memory:
                    peer_s = peer(raw, work / f"peer-{pairs}", model, args.cpus)
                with PeakMemory() as our_memory:
                    our_s = ours(raw, work / f"ours-{pairs}", model, args.batch_rows, args.actors)
                assert _rows(work / f"peer-{pairs}") == _rows(work / f"ours-{pairs}") == pairs
                sizes[pairs] = {"peer_s": round(peer_s, 2), "ours_s": round(our_s, 2),
                                "ratio_ours_vs_peer": round(peer_s / our_s, 3),
                                "peak_pss_mb": {"peer": peer_memory.peak >> 20, "ours": our_memory.peak >> 20}}
                raw.unlink()
        finally:
            ray.shutdown()
    small, large = sorted(sizes)
    added = large - small

    def slope(key: str) -> float:
        return added / (sizes[large][key] - sizes[small][key])

    print(json.dumps({
        "steady_state_pairs_per_s": {"peer": round(slope("peer_s")), "ours": round(slope("ours_s"))},
        "ratio_steady_state_ours_vs_peer": round(slope("ours_s") / slope("peer_s"), 3),
        "code_alone": code, "sizes": sizes, "cpus": args.cpus, "batch_rows": args.batch_rows, "actors": args.actors,
        "provenance": provenance(),
    }, indent=2))


if __name__ == "__main__":
    main()
