"""Translation speed: our beam search against Hugging Face's MarianMTModel.generate, and
CTranslate2 (float32 and int8) against ours, on test2016 with a trained export. One run, ratios.

1. Fixed length (EOS suppressed in every engine, so each generates the same number of tokens):
   ours vs MarianMTModel with the same dimensions (random weights: speed only) and vs CTranslate2.
2. Normal decoding (beam 4, alpha 0.6): sentences/s and sacreBLEU of ours (float32, with early
   exit, and with its feed-forward and attention output layers in int8 by PyTorch's dynamic
   quantization) and of CTranslate2; per generated token, ours (and ours with early exit) against
   its own fixed-length rate and CTranslate2 float32 against ours; and ours per decoder row-step
   (one live beam, one step) against its fixed-length rate, which leaves out the search's own
   extra steps per returned token.

Every engine gets the same batches: a budget of rows x longest x beam tokens (CTranslate2's own
budget counts source tokens, jobs/inference/ctranslate2_engine.py divides it by the beam). CTranslate2 runs
in a process of its own: in one process with torch both engines share one OpenMP runtime, which
slowed ours (`ctranslate2_timings`).

On a GPU (`--device cuda`): ours in `--dtype` against CTranslate2 in each of `--ct2-types`.
Without a trained export, `--random-preset base` gives random weights of that preset with the
dataset's tokenizer: the fixed-length part only (BLEU needs a trained model).

    python bench/translation_speed.py --model runs/<run>/export --data data/multi30k-en-de
    python bench/translation_speed.py --random-preset base --data data/multi30k-en-de --device cuda \
        --dtype bfloat16 --ct2-types float16 bfloat16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
from _provenance import provenance

from data_pipeline.manifest import load_manifest
from data_pipeline.tokenizer import PAD_ID, load_tokenizer
from jobs.inference.ctranslate2_engine import CTranslate2Translator, convert_export
from jobs.inference.evaluation import corpus_scores, length_sorted_batches, read_eval_split, translate_ids
from jobs.inference.export import TOKENIZER, load_export, write_export
from jobs.train.cpu_allocator import keep_freed_memory
from transformer import build_model, preset
from transformer.decoding import Decoding


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(run) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def marian_fixed_length(config, sources: list[list[int]], beam: int, length: int, max_tokens: int,
                        device: str, dtype: torch.dtype, warm_up: bool) -> float | None:
    """Seconds for MarianMTModel.generate to produce `length` tokens per sentence, in the same
    length-sorted token-budget batches as ours, on the same device in the same dtype, after one
    untimed batch (or, with `warm_up`, one untimed pass over all, as ours on a GPU); None without
    `transformers` (pip install -e .[bench])."""
    try:
        from transformers import MarianConfig, MarianMTModel
    except ImportError:
        return None

    torch.manual_seed(0)
    marian = MarianMTModel(MarianConfig(
        vocab_size=config.vocab_size, d_model=config.d_model, encoder_layers=config.n_layers,
        decoder_layers=config.decoder_layers, encoder_attention_heads=config.n_heads,
        decoder_attention_heads=config.n_heads, encoder_ffn_dim=config.d_ff, decoder_ffn_dim=config.d_ff,
        activation_function="relu", pad_token_id=PAD_ID, eos_token_id=config.eos_id,
        decoder_start_token_id=config.bos_id, max_position_embeddings=config.max_positions, scale_embedding=True,
    )).eval().to(device=device, dtype=dtype)

    def generate(rows: list[list[int]]) -> int:
        batch = torch.full((len(rows), max(len(r) for r in rows)), PAD_ID, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row)
        batch = batch.to(device)
        out = marian.generate(input_ids=batch, attention_mask=batch != PAD_ID, num_beams=beam,
                              min_new_tokens=length, max_new_tokens=length, length_penalty=0.6,
                              early_stopping=True, do_sample=False)
        return (out.shape[1] - 1) * len(rows)  # without the decoder start token

    batches = [[sources[i] for i in indices]
               for indices in length_sorted_batches([len(s) for s in sources], max_tokens, beam)]
    with torch.no_grad():
        for rows in batches if warm_up else batches[:1]:
            generate(rows)
        _synchronize(device)
        start = time.perf_counter()
        produced = sum(generate(rows) for rows in batches)
        _synchronize(device)
    seconds = time.perf_counter() - start
    assert produced == length * len(sources), (produced, length * len(sources))
    return seconds


@contextlib.contextmanager
def counting_decoder_rows(model) -> Iterator[list[int]]:
    """Counts the hypothesis rows each decoder step computes (one per live beam of each sentence
    still searched): the decoder's work, which differs from the tokens the search returns."""
    rows = [0]
    step = model.decode_step

    def counted(last_tokens: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows[0] += last_tokens.shape[0]
        return step(last_tokens, *args, **kwargs)

    model.decode_step = counted
    try:
        yield rows
    finally:
        del model.decode_step


def ctranslate2_timings(directory: str, device: str, threads: int, decodings: dict[str, Decoding],
                        sources: list[list[int]], warm_up: list[list[int]], max_tokens: int) -> dict:
    """{decoding's name: (seconds, outputs)} of a CTranslate2 model, run in a process of its own.
    CTranslate2 binds its OpenMP calls to torch's libgomp (loaded first, into the global scope), so
    in one process both engines' thread teams belong to one libgomp; with more of its threads than
    CPUs it cuts its spin-waits short, and ours ran 1.34x slower once CTranslate2's team existed,
    even idle (CTranslate2 itself was not measurably slowed). Users run one engine per process;
    so does this."""
    if device == "cpu":
        keep_freed_memory()
    engine = CTranslate2Translator(Path(directory), device=device, threads=threads)
    engine.translate_ids(warm_up, decodings["fixed"], max_tokens=max_tokens)
    return {name: _timed(lambda: engine.translate_ids(sources, decoding, max_tokens=max_tokens))
            for name, decoding in decodings.items()}


def random_export(preset_name: str, dataset: str, destination: Path) -> Path:
    """An export of random weights of `preset_name`, with the dataset's tokenizer (speed only)."""
    manifest = load_manifest(dataset)
    torch.manual_seed(0)
    model = build_model(preset(preset_name, vocab_size=manifest.vocab_size))
    return write_export(model, Path(manifest.tokenizer_uri).read_bytes(), {"weights": "random"}, destination)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an export directory (runs/<run>/export)")
    source.add_argument("--random-preset", help="random weights of this preset instead (fixed length only)")
    parser.add_argument("--data", required=True, help="the prepared dataset it was trained on")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="ours")
    parser.add_argument("--ct2-types", nargs="*", default=["float32", "int8"],
                        help="CTranslate2 quantizations (float32, int8, float16, bfloat16, int8_float16)")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="every engine's batch budget: rows x longest x beam tokens (equal batches; "
                             "the engines' own defaults are 8192 for ours and 16384 for CTranslate2)")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--length", type=int, default=24, help="tokens per sentence in the fixed-length part")
    parser.add_argument("--limit", type=int, default=0, help="first N test sentences (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        keep_freed_memory()  # as `aiayn evaluate|translate` on a CPU, for every engine alike
    split = read_eval_split(load_manifest(args.data), "test", args.limit)
    sources, beam, length = split.src_ids, args.beam, args.length
    result: dict = {"config": vars(args), "sentences": len(sources), "torch_threads": torch.get_num_threads(),
                    "provenance": provenance()}

    with tempfile.TemporaryDirectory(prefix="aiayn-bench-ct2-") as scratch:
        export = Path(args.model) if args.model else random_export(args.random_preset, args.data, Path(scratch) / "export")
        model, config, _ = load_export(export)
        model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
        tokenizer = load_tokenizer(str(export / TOKENIZER))
        fixed = Decoding(beam_size=beam, min_len=length, max_len_a=0.0, max_len_b=length)
        normal_decoding = Decoding(beam_size=beam)
        # Untimed first: on a GPU every batch shape costs its first call (kernel choice, allocation).
        warm_up = sources if torch.device(args.device).type == "cuda" else sources[:8]
        ct2 = {}  # quantization: {"fixed" | "normal": (seconds, outputs)}
        decodings = {"fixed": fixed} if args.random_preset else {"fixed": fixed, "normal": normal_decoding}
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as alone:
            for quantization in args.ct2_types:
                convert_export(export, f"{scratch}/{quantization}", None if quantization == "float32" else quantization)
                try:
                    ct2[quantization] = alone.submit(
                        ctranslate2_timings, f"{scratch}/{quantization}", args.device, args.threads, decodings,
                        sources, warm_up, args.max_tokens).result()
                except (RuntimeError, ValueError) as error:  # a build without this device or type, a missing cuBLAS
                    result.setdefault("ctranslate2_not_run", {})[quantization] = str(error)

        # 1. Fixed length: `length` tokens per sentence, EOS included, in every engine.
        ours = functools.partial(translate_ids, max_tokens=args.max_tokens)
        ours(model, warm_up, fixed)
        _synchronize(args.device)
        with counting_decoder_rows(model) as fixed_rows:
            fixed_s, ours_out = _timed(lambda: ours(model, sources, fixed))
        assert all(len(h) == length - 1 for h in ours_out)  # + EOS, forced at the limit
        marian_s = marian_fixed_length(config, sources, beam, length, args.max_tokens, args.device,
                                       getattr(torch, args.dtype), warm_up=len(warm_up) == len(sources))
        ct2_fixed = {name: timings["fixed"][0] for name, timings in ct2.items()}
        for name, timings in ct2.items():
            result[f"ctranslate2_{name}_fixed_tokens_per_sentence"] = sorted({len(h) for h in timings["fixed"][1]})
        ours_again_s, _ = _timed(lambda: ours(model, sources, fixed))
        tokens = length * len(sources)
        result["fixed_length"] = {
            "tokens_per_sentence": length,
            "ours_tokens_per_s": round(tokens / fixed_s), "ours_again_tokens_per_s": round(tokens / ours_again_s),
            **({"marian_generate_tokens_per_s": round(tokens / marian_s),
                "ratio_ours_vs_marian": round(marian_s / ((fixed_s + ours_again_s) / 2), 3)}  # ours: mean of both
               if marian_s is not None else {"marian": "transformers is not installed: not measured"}),
            **{f"ctranslate2_{n}_tokens_per_s": round(tokens / s) for n, s in ct2_fixed.items()},
            **{f"ratio_ctranslate2_{n}_vs_ours": round(fixed_s / s, 3) for n, s in ct2_fixed.items()},
        }

        if args.random_preset:  # random weights: no translations to score
            print(json.dumps(result, indent=2))
            return
        # 2. Normal decoding with BLEU.
        normal = {}
        with counting_decoder_rows(model) as normal_rows:
            ours_s, ours_out = _timed(lambda: ours(model, sources, normal_decoding))
        normal["ours"] = (ours_s, ours_out)
        # Ours with early exit (a sentence ends once a step's best extension is EOS) instead of
        # ours by default (once it has beam_size finished hypotheses, CTranslate2's rule, or once no
        # live beam can beat its best finished one).
        early_decoding = Decoding(beam_size=beam, early_exit=True)
        with counting_decoder_rows(model) as early_rows:
            early_s, early_out = normal["ours_early_exit"] = _timed(lambda: ours(model, sources, early_decoding))
        # Our model with its feed-forward and attention output layers quantized to int8 by PyTorch
        # (dynamic: weights int8, activations quantized per batch). Left in float32: the attention's
        # fused input projection, sliced per use (a quantized Linear has no weight to slice), and
        # the output layer, whose weight the embeddings share.
        if args.device == "cpu":  # PyTorch's dynamic quantization is CPU-only
            layers = {name for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) and (".ffn." in name or name.endswith("out_proj"))}
            int8 = torch.ao.quantization.quantize_dynamic(model, layers, dtype=torch.qint8)
            normal["ours_int8_dynamic"] = _timed(lambda: ours(int8, sources, normal_decoding))
        for name, timings in ct2.items():
            normal[f"ctranslate2_{name}"] = timings["normal"]
        result["normal"] = {
            name: {"sentences_per_s": round(len(sources) / seconds, 1),
                   "bleu": round(corpus_scores(tokenizer.decode(out), split.references).bleu, 2),
                   "ratio_vs_ours": round(ours_s / seconds, 3)}
            for name, (seconds, out) in normal.items()
        }
        # Per generated token (EOS included, as in the fixed-length part): ours' normal rate against
        # its fixed-length rate, and the first CTranslate2 type's normal rate against ours.
        generated = sum(len(h) + 1 for h in ours_out)
        fixed_rate = tokens / ((fixed_s + ours_again_s) / 2)
        result["normal_fixed_rate_ratio"] = round((generated / ours_s) / fixed_rate, 3)
        result["early_exit_normal_fixed_rate_ratio"] = round((sum(len(h) + 1 for h in early_out) / early_s) / fixed_rate, 3)
        # The same per decoder row-step (a live beam of a sentence, one step; the first step has one
        # row per sentence): at fixed length every sentence keeps its beam rows for `length` steps;
        # normal decoding keeps a sentence until its search ends, past its best hypothesis's EOS, on
        # batches that shrink as sentences end. What separates the implementation's cost (smaller
        # batches, dropping sentences) from the search's extra steps per returned token.
        fixed_row_rate = fixed_rows[0] / ((fixed_s + ours_again_s) / 2)
        result["decoder_rows_per_generated_token"] = {"fixed_length": round(fixed_rows[0] / tokens, 3),
                                                      "normal": round(normal_rows[0] / generated, 3),
                                                      "early_exit": round(early_rows[0] / sum(len(h) + 1 for h in early_out), 3)}
        result["normal_fixed_row_rate_ratio"] = round((normal_rows[0] / ours_s) / fixed_row_rate, 3)
        result["early_exit_normal_fixed_row_rate_ratio"] = round((early_rows[0] / early_s) / fixed_row_rate, 3)
        if ct2:
            first = next(iter(ct2))
            ct2_seconds, ct2_out = normal[f"ctranslate2_{first}"]
            result[f"ratio_ctranslate2_{first}_vs_ours_per_generated_token"] = round(
                (sum(len(h) + 1 for h in ct2_out) / ct2_seconds) / (generated / ours_s), 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
