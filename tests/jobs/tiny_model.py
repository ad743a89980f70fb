"""A tiny Transformer trained in-process on a task it learns well (English words, then the same
words reversed in capitals), exported as `aiayn train` exports: shared by the tests of the
engines and of the MLflow model, which need a model whose translations mean something."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.batching import Window, collate
from data_pipeline.config import TokenizerConfig
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from jobs.inference.export import write_export
from tests.data_pipeline.synthetic import WORDS
from transformer import build_model, preset
from transformer.loss import label_smoothed_loss
from transformer.schedule import inverse_sqrt_lr


def pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """English words and the same words reversed in capitals: a task a tiny model learns well."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))]
        pairs.append((" ".join(words), " ".join(reversed(words)).upper()))
    return pairs


def _batch(tokenizer, pairs: list[tuple[str, str]]):
    src = [np.array(ids) for ids in tokenizer.encode([s for s, _ in pairs], add_eos=True)]
    tgt = [np.array(ids) for ids in tokenizer.encode([t for _, t in pairs], add_eos=True)]
    offsets = lambda parts: np.concatenate([[0], np.cumsum([len(p) for p in parts])])  # noqa: E731
    window = Window(np.concatenate(src), offsets(src), np.concatenate(tgt), offsets(tgt))
    return collate(window, np.arange(len(pairs)))


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct2")
    text = [side for pair in pairs(3000, seed=1) for side in pair]
    model_path = train_tokenizer(text, TokenizerConfig(vocab_size=96, model_type="bpe"), root / "spm")
    tokenizer = load_tokenizer(str(model_path))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = preset("tiny", vocab_size=tokenizer.get_piece_size(), d_model=64, d_ff=256, n_layers=2,
                    dropout=0.0, max_positions=64)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: inverse_sqrt_lr(step + 1, 3e-3, 50))
    for step in range(300):
        batch = _batch(tokenizer, pairs(64, seed=100 + step))
        at = batch.target_positions()
        loss, _ = label_smoothed_loss(model(batch.src, batch.tgt_in, at), batch.tgt_out.flatten()[at],
                                      config.label_smoothing, config.pad_id)
        optimizer.zero_grad()
        (loss / len(at)).backward()
        optimizer.step()
        scheduler.step()
    return write_export(model.eval(), model_path.read_bytes(), {"tokenizer_sha256": "test"}, root / "export")


def sources_of(export: Path, count: int = 150) -> list[list[int]]:
    tokenizer = load_tokenizer(str(export / "tokenizer.model"))
    return tokenizer.encode([s for s, _ in pairs(count, seed=999)], add_eos=True)
