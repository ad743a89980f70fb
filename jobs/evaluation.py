"""Translation and sacreBLEU scoring, shared by in-training validation, the final test score,
`aiayn evaluate` and `aiayn translate`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sacrebleu
import sentencepiece as spm
import torch

from data_pipeline import storage
from data_pipeline.manifest import Manifest
from data_pipeline.tokenizer import PAD_ID
from transformer.decoding import beam_search, greedy_search
from transformer.model import EncoderDecoderTransformer


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


def load_processor(uri: str) -> spm.SentencePieceProcessor:
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as handle:
        return spm.SentencePieceProcessor(model_proto=handle.read())


@torch.no_grad()
def translate_ids(
    model: EncoderDecoderTransformer, sources: list[list[int]], *, beam_size: int = 4, alpha: float = 0.6,
    max_tokens: int = 4096,
) -> list[list[int]]:
    """Hypothesis token ids in input order; sentences are batched by length for speed."""
    model.eval()
    device = next(model.parameters()).device
    sources = [s[: model.config.max_positions] for s in sources]  # longer inputs do not fit the model
    order = np.argsort([len(s) for s in sources], kind="stable")
    results: list[list[int]] = [[] for _ in sources]
    start = 0
    while start < len(order):
        longest, end = 0, start
        while end < len(order) and (end - start + 1) * max(longest, len(sources[order[end]])) * beam_size <= max_tokens:
            longest = max(longest, len(sources[order[end]]))
            end += 1
        end = max(end, start + 1)
        rows = [sources[i] for i in order[start:end]]
        batch = torch.full((len(rows), max(len(r) for r in rows)), PAD_ID, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row)
        batch = batch.to(device)
        if beam_size > 1:
            hyps = beam_search(model, batch, beam_size=beam_size, alpha=alpha)
        else:
            hyps = greedy_search(model, batch)
        for index, hyp in zip(order[start:end], hyps):
            results[index] = hyp.tokens
        start = end
    return results


def detokenize(processor: spm.SentencePieceProcessor, hypotheses: list[list[int]]) -> list[str]:
    return [processor.decode(ids) for ids in hypotheses]


def bleu(hypotheses: list[str], references: list[str]) -> sacrebleu.metrics.BLEUScore:
    """Corpus BLEU on detokenized text with sacreBLEU's defaults (13a tokenization)."""
    return sacrebleu.corpus_bleu(hypotheses, [references])


def bleu_signature(hypotheses: list[str], references: list[str]) -> str:
    metric = sacrebleu.metrics.BLEU()
    metric.corpus_score(hypotheses, [references])
    return str(metric.get_signature())
