"""Beam search of the working tree against the same file at another git revision, in one process.

A lever in `transformer/decoding.py` is judged on the same model, the same batch and the same
threads, the two versions alternating round by round (this machine's speed drifts by more than
most levers between two processes). Both must return the same hypotheses. The model is a random
one of the preset whose EOS row is scaled by `--eos-boost`, so that its sentences end at
different steps (and some at their limit), as a trained model's do; no trained export is needed.

    python bench/decoding_revisions.py --against HEAD~1 --preset base --eos-boost 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _provenance import ROOT, provenance
from transformer import build_model, preset
from transformer import decoding as working_tree


def _decoding_at(revision: str, directory: Path):
    """transformer/decoding.py as it was at `revision`, imported under its own module name."""
    source = subprocess.run(["git", "show", f"{revision}:transformer/decoding.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = directory / "decoding_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("decoding_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, help="git revision of transformer/decoding.py to compare with")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--eos-boost", type=float, default=5.0)
    parser.add_argument("--sentences", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(preset(args.preset, vocab_size=args.vocab_size)).eval()
    with torch.no_grad():
        model.output.proj.weight[model.config.eos_id] *= args.eos_boost
    src = torch.randint(4, args.vocab_size, (args.sentences, 18))
    for row in range(args.sentences):
        src[row, 8 + row % 10:] = model.config.pad_id  # sources of 8-17 tokens
    with tempfile.TemporaryDirectory() as scratch:
        engines = {"revision": _decoding_at(args.against, Path(scratch)), "working_tree": working_tree}
        outputs = {name: [(h.tokens, h.log_prob, h.score) for h in engine.beam_search(model, src)]
                   for name, engine in engines.items()}
        assert outputs["revision"] == outputs["working_tree"], "the two versions chose differently"
        seconds: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                start = time.perf_counter()
                engine.beam_search(model, src)
                seconds[name].append(time.perf_counter() - start)
    lengths = [len(tokens) for tokens, _, _ in outputs["working_tree"]]
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(json.dumps({
        "provenance": provenance(), "against": args.against, "preset": args.preset, "vocab_size": args.vocab_size,
        "sentences": args.sentences, "threads": args.threads, "rounds": args.rounds,
        "output_tokens": {"mean": round(statistics.mean(lengths), 1), "min": min(lengths), "max": max(lengths)},
        "seconds": {name: [round(s, 3) for s in values] for name, values in seconds.items()},
        "speed_working_tree_vs_revision": round(median["revision"] / median["working_tree"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
