"""Translation and sacreBLEU scoring, shared by in-training validation, the final test score,
`aiayn evaluate` and `aiayn translate`. The test score of `aiayn train` and `aiayn evaluate` are
the same function, `score_split`."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_pipeline import storage
from data_pipeline.errors import InputError
from data_pipeline.manifest import Manifest
from data_pipeline.tokenizer import PAD_ID, load_tokenizer
from jobs.inference.export import decoding_of, load_export
from jobs.inference.scores import Scores, corpus_scores
from transformer.decoding import PAPER, Decoding, search
from transformer.model import EncoderDecoderTransformer

Translate = Callable[[list[list[int]]], list[list[int]]]  # source ids (ending with EOS) -> hypothesis ids


def inference_device(requested: str) -> str:
    """"cpu" or "cuda" for `--device`: auto is the GPU where torch sees one; cuda without one is a
    mistake to say before any model is read."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA device on this machine; use --device cpu")
    return requested


def open_translator(directory: Path, engine: str, decoding: Decoding | None = None, *, device: str = "cpu",
                    progress: bool = False) -> tuple[Translate, dict]:
    """(translate, the export's info) for a local export: ours (PyTorch beam search) or one made by
    `aiayn export --format ctranslate2`; "auto" goes by what the directory holds. `decoding`:
    None for the one the export's run decoded with. `device`: "cpu" or "cuda" (the first GPU)."""
    from jobs.inference.ctranslate2_engine import CT2_WEIGHTS, CTranslate2Translator  # ctranslate2: only when asked for

    decoding = decoding or decoding_of(directory)

    if engine == "auto":
        engine = "ctranslate2" if (directory / CT2_WEIGHTS).is_file() else "torch"
    if engine == "ctranslate2":
        try:
            translator = CTranslate2Translator(directory, device=device)
        except (RuntimeError, ValueError) as error:  # a CPU-only build, a missing CUDA library
            if device == "cpu" or isinstance(error, InputError):
                raise
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise InputError(f"--device {device}: CTranslate2 cannot run there ({message}); use --device cpu "
                             "or --engine torch") from error
        return functools.partial(translator.translate_ids, decoding=decoding), translator.info
    model, _, info = load_export(directory)
    return functools.partial(translate_ids, model.to(device), decoding=decoding, progress=progress), info


@dataclass(frozen=True)
class EvalSplit:
    src_ids: list[list[int]]
    src_text: list[str]
    references: list[str]


def read_eval_split(manifest: Manifest, split: str, limit: int = 0) -> EvalSplit:
    """A valid/test split in input order, with the raw references (sacreBLEU scores detokenized text)."""
    tables = []
    for uri, _ in manifest.shard_uris(split):
        fs, path = storage.filesystem(uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=["index", "src_ids", "src_text", "tgt_text"]))

    table = pa.concat_tables(tables).sort_by("index")
    if limit:
        table = table.slice(0, limit)
    return EvalSplit(table.column("src_ids").to_pylist(), table.column("src_text").to_pylist(),
                     table.column("tgt_text").to_pylist())


@torch.no_grad()
def length_sorted_batches(lengths: list[int], max_tokens: int, beam_size: int) -> list[np.ndarray]:
    """Sentence indices in batches of similar length, rows x longest x beam within `max_tokens`."""
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest, end = 0, start
        while end < len(order) and (end - start + 1) * max(longest, lengths[order[end]]) * beam_size <= max_tokens:
            longest = max(longest, lengths[order[end]])
            end += 1
        end = max(end, start + 1)
        batches.append(order[start:end])
        start = end
    return batches


def translate_ids(
    model: EncoderDecoderTransformer, sources: list[list[int]], decoding: Decoding = PAPER, *,
    max_tokens: int = 8192, progress: bool = False,
) -> list[list[int]]:
    """Hypothesis token ids in input order; sentences are batched by length for speed.
    `max_tokens`: rows x longest x beam per batch; 8192 decodes test2016 1.05x faster than 4096 on
    a 2-core CPU (fewer batches, so fewer steps spent on a batch's last few sentences) for a peak
    resident size of 0.9 GB against 0.7 (`small`); 16384 gains nothing more there.
    `progress`: a progress bar on stderr (for a person at a terminal)."""
    from tqdm import tqdm

    model.eval()
    device = next(model.parameters()).device
    sources = [s[: model.config.max_positions] for s in sources]  # longer inputs do not fit the model
    results: list[list[int]] = [[] for _ in sources]
    with tqdm(total=len(sources), unit="sent", desc="translating", disable=not progress, leave=False) as bar:
        for indices in length_sorted_batches([len(s) for s in sources], max_tokens, decoding.beam_size):
            rows = [sources[i] for i in indices]
            batch = torch.full((len(rows), max(len(r) for r in rows)), PAD_ID, dtype=torch.long)
            for i, row in enumerate(rows):
                batch[i, : len(row)] = torch.tensor(row)
            batch = batch.to(device)
            for index, hyp in zip(indices, search(model, batch, decoding)):
                results[index] = hyp.tokens
            bar.update(len(indices))
    return results


@dataclass(frozen=True)
class SplitScore:
    scores: Scores
    sentences: int
    samples: tuple[tuple[str, str, str], ...]  # (source, reference, hypothesis) of the first sentences


def score_split(translate: Translate, manifest: Manifest, split: str, *, limit: int = 0) -> SplitScore:
    """Translations of a prepared split and their scores against the raw references."""
    data = read_eval_split(manifest, split, limit)
    tokenizer = load_tokenizer(manifest.tokenizer_uri)
    hyps = tokenizer.decode(translate(data.src_ids))
    return SplitScore(corpus_scores(hyps, data.references, manifest.target_language), len(hyps),
                      tuple(zip(data.src_text[:5], data.references[:5], hyps[:5])))
