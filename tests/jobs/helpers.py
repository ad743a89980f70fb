"""Building small but real training jobs for the tests."""

from __future__ import annotations

from pathlib import Path

from jobs.config import JobConfig, load_job_config


def tiny_overrides(corpus: dict, root: Path, name: str, *, address: str = "", tracking: str = "") -> list[str]:
    overrides = [
        f"name={name}",
        "model.preset=tiny", "model.dropout=0.1", "model.max_positions=64",
        "data.source.format=text", f"data.source.train={corpus['train']}",
        f"data.source.valid={corpus['valid']}", f"data.source.test={corpus['test']}",
        "data.tokenizer.vocab_size=64", "data.tokenizer.sample_sentences=2000",
        f"data.output_dir={corpus['root'] / 'prepared'}", "data.shard_rows=400",
        "stream.max_tokens=300", "stream.window_rows=256", "stream.unit_rows=64",
        "optim.lr=0.003", "optim.warmup_steps=5",
        "train.max_steps=30", "train.max_minutes=0", "train.log_every=1", "train.validate_every=10",
        "train.checkpoint_every_steps=5", "train.checkpoint_every_minutes=1000", "train.keep_checkpoints=3",
        "train.average_last=1", "train.beam_size=2",
        "cluster.num_workers=2", f"cluster.storage_path={root / 'runs'}", "cluster.max_failures=2",
        f"tracking.uri={tracking or 'sqlite:///' + str(root / 'mlflow.db')}",
    ]
    if address:
        overrides.append(f"cluster.address={address}")
    return overrides


def tiny_job(corpus: dict, root: Path, name: str, *, address: str = "", tracking: str = "",
             extra: tuple[str, ...] = ()) -> JobConfig:
    return load_job_config(None, tiny_overrides(corpus, root, name, address=address, tracking=tracking) + list(extra))
