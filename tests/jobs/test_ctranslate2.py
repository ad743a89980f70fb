"""A trained tiny model converted to CTranslate2 translates as our own search does."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.batching import Window, collate
from data_pipeline.config import TokenizerConfig
from data_pipeline.errors import InputError
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from jobs.ctranslate2_engine import CTranslate2Translator, convert_export
from jobs.evaluation import translate_ids
from jobs.export import INFO, write_export
from tests.data_pipeline.synthetic import WORDS
from transformer import build_model, preset
from transformer.loss import label_smoothed_loss
from transformer.schedule import inverse_sqrt_lr


def _pairs(count: int, seed: int) -> list[tuple[str, str]]:
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


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct2")
    text = [side for pair in _pairs(3000, seed=1) for side in pair]
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
        batch = _batch(tokenizer, _pairs(64, seed=100 + step))
        at = batch.target_positions()
        loss, _ = label_smoothed_loss(model(batch.src, batch.tgt_in, at), batch.tgt_out.flatten()[at],
                                      config.label_smoothing, config.pad_id)
        optimizer.zero_grad()
        (loss / len(at)).backward()
        optimizer.step()
        scheduler.step()
    return write_export(model.eval(), model_path.read_bytes(), {"tokenizer_sha256": "test"}, root / "export")


def _sources(export: Path) -> list[list[int]]:
    tokenizer = load_tokenizer(str(export / "tokenizer.model"))
    return tokenizer.encode([s for s, _ in _pairs(150, seed=999)], add_eos=True)


@pytest.mark.parametrize("beam", [1, 4])
def test_ctranslate2_translates_as_our_search_does(trained_export: Path, tmp_path: Path, beam: int) -> None:
    from jobs.export import load_export

    convert_export(trained_export, str(tmp_path / "ct2"))
    assert json.loads((tmp_path / "ct2" / INFO).read_text())["format"] == "ctranslate2"
    model, _, _ = load_export(trained_export)
    sources = _sources(trained_export)
    ours = translate_ids(model, sources, beam_size=beam, alpha=0.6)
    theirs = CTranslate2Translator(tmp_path / "ct2").translate_ids(sources, beam_size=beam, alpha=0.6)
    tokenizer = load_tokenizer(str(trained_export / "tokenizer.model"))
    expected = [t for _, t in _pairs(150, seed=999)]
    assert sum(h == e for h, e in zip(tokenizer.decode(ours), expected)) >= 120  # the model learned the task
    assert theirs == ours


def test_int8_quantized_model_agrees_on_almost_every_sentence(trained_export: Path, tmp_path: Path) -> None:
    from jobs.export import load_export

    convert_export(trained_export, str(tmp_path / "ct2-int8"), quantization="int8")
    model, _, _ = load_export(trained_export)
    sources = _sources(trained_export)
    ours = translate_ids(model, sources, beam_size=4, alpha=0.6)
    theirs = CTranslate2Translator(tmp_path / "ct2-int8").translate_ids(sources, beam_size=4, alpha=0.6)
    assert sum(a == b for a, b in zip(ours, theirs)) >= 0.95 * len(sources)


def test_a_torch_export_is_not_taken_for_a_ctranslate2_model(trained_export: Path) -> None:
    with pytest.raises(InputError, match="not a CTranslate2 model"):
        CTranslate2Translator(trained_export)


def test_the_cli_converts_and_translates_with_either_engine(trained_export: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    def aiayn(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "jobs.cli", *args], input=stdin, capture_output=True,
                              text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])

    converted = aiayn("export", "--format", "ctranslate2", "--model", str(trained_export),
                      "--output", str(tmp_path / "ct2"))
    assert converted.returncode == 0, converted.stderr
    text = "\n".join(s for s, _ in _pairs(20, seed=5)) + "\n"
    torch_lines = aiayn("translate", "--engine", "torch", "--model", str(trained_export), stdin=text)
    ct2_lines = aiayn("translate", "--model", str(tmp_path / "ct2"), stdin=text)  # auto: by the directory
    assert torch_lines.returncode == 0 and ct2_lines.returncode == 0, ct2_lines.stderr
    assert ct2_lines.stdout == torch_lines.stdout and len(ct2_lines.stdout.splitlines()) == 20
    wrong = aiayn("translate", "--engine", "ctranslate2", "--model", str(trained_export), stdin=text)
    assert wrong.returncode == 2 and "not a CTranslate2 model" in wrong.stderr
