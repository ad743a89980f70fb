"""Data pipeline benchmarks, each printed as a ratio against a peer measured in the same run.

1. Stream: tokens/s the worker stream delivers against tokens/s one training step consumes.
2. Padding efficiency (real / padded tokens): token-budget batches against fixed-size batches of
   shuffled examples with the same mean number of rows.
3. Peak memory (max RSS) of a streaming worker over the corpus and over the corpus x10.
(Encoding in `aiayn prepare` has its own benchmark: bench/prepare_encoding.py.)

    python bench/data_throughput.py --data data/multi30k-en-de      # after `aiayn prepare`
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_pipeline.config import StreamConfig
from data_pipeline.manifest import describe_split, load_manifest
from data_pipeline.stream import ShardStream
from data_pipeline.tokenizer import PAD_ID


def bench_stream(dataset: Path, step_tokens_per_s: float, max_tokens: int) -> dict:
    manifest = load_manifest(str(dataset))
    stream = ShardStream(manifest, "train", StreamConfig(max_tokens=max_tokens))
    start, tokens, real, padded, rows = time.perf_counter(), 0, 0, 0, []
    for batch in stream.epoch_batches():
        tokens += batch.target_tokens
        real += int((batch.src != PAD_ID).sum()) + batch.target_tokens  # source and target, padding left out
        padded += batch.src.numel() + batch.tgt_out.numel()
        rows.append(batch.src.shape[0])
    rate = tokens / (time.perf_counter() - start)
    # Peer: fixed-size batches of shuffled examples with the same mean row count.
    src_len, tgt_len = [], []
    for uri, _ in manifest.shard_uris("train"):
        table = pq.read_table(uri, columns=["src_len", "tgt_len"])
        src_len.append(table.column("src_len").to_numpy())
        tgt_len.append(table.column("tgt_len").to_numpy())
    src, tgt = np.concatenate(src_len), np.concatenate(tgt_len)
    order = np.random.default_rng(0).permutation(len(src))
    size = max(1, round(float(np.mean(rows))))
    fixed_real = fixed_padded = 0
    for i in range(0, len(order), size):
        part = order[i : i + size]
        fixed_real += int(src[part].sum() + tgt[part].sum())
        fixed_padded += len(part) * int(src[part].max() + tgt[part].max())
    return {
        "stream_target_tokens_per_s": round(rate), "training_target_tokens_per_s": round(step_tokens_per_s),
        "ratio_stream_vs_training": round(rate / step_tokens_per_s, 1),
        "padding_efficiency_token_budget": round(real / padded, 4),
        "padding_efficiency_fixed_batches": round(fixed_real / fixed_padded, 4), "mean_rows_per_batch": size,
        "pad_id": PAD_ID,
    }


def _stream_peak_rss(dataset: str) -> int:
    code = (
        "import resource, sys; from data_pipeline.config import StreamConfig; "
        "from data_pipeline.manifest import load_manifest; from data_pipeline.stream import ShardStream; "
        f"s = ShardStream(load_manifest({dataset!r}), 'train', StreamConfig(max_tokens=2048)); "
        "n = sum(b.target_tokens for b in s.epoch_batches()); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def bench_memory(dataset: Path, factor: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        grown = Path(scratch) / "grown"
        (grown / "train").mkdir(parents=True)
        shards = sorted((dataset / "train").glob("*.parquet"))
        for copy in range(factor):
            for index, shard in enumerate(shards):
                shutil.copy(shard, grown / "train" / f"part-{copy * len(shards) + index:05d}.parquet")
        manifest = json.loads((dataset / "manifest.json").read_text())
        manifest["splits"] = {"train": describe_split(str(grown), "train")}
        (grown / "manifest.json").write_text(json.dumps(manifest))
        base, big = _stream_peak_rss(str(dataset)), _stream_peak_rss(str(grown))
    return {"peak_rss_mb_1x": round(base / 1024), f"peak_rss_mb_{factor}x": round(big / 1024),
            "ratio": round(big / base, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/multi30k-en-de")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--step-tokens-per-s", type=float, default=0.0,
                        help="training consumption; 0 measures one step of the default model here")
    args = parser.parse_args()
    dataset = Path(load_manifest(args.data).uri)  # the current version's directory
    consumption = args.step_tokens_per_s or _measure_training_rate(dataset, args.max_tokens)
    print(json.dumps({
        "stream": bench_stream(dataset, consumption, args.max_tokens),
        "memory": bench_memory(dataset, 10),
        "max_rss_self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }, indent=2))


def _measure_training_rate(dataset: Path, max_tokens: int) -> float:
    """Target tokens/s of forward+backward+Adam of the default (small) model on real batches."""
    import torch

    from jobs.run.config import JobConfig
    from transformer import build_model
    from transformer.loss import label_smoothed_loss

    manifest = load_manifest(str(dataset))
    config = JobConfig().model.replace(vocab_size=manifest.vocab_size)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = ShardStream(manifest, "train", StreamConfig(max_tokens=max_tokens)).epoch_batches()
    tokens, start = 0, None
    for index, batch in zip(range(8), batches):
        if index == 2:
            start, tokens = time.perf_counter(), 0
        at = batch.target_positions()
        loss, _ = label_smoothed_loss(model(batch.src, batch.tgt_in, at, src_padded=batch.src_padded),
                                      batch.tgt_out.flatten()[at], 0.1, PAD_ID)
        optimizer.zero_grad()
        (loss / len(at)).backward()
        optimizer.step()
        tokens += batch.target_tokens
    return tokens / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
