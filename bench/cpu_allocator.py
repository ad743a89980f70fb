"""What keeping freed memory in glibc's heap (jobs/train/cpu_allocator.py, as CPU training workers do)
buys a CPU training step, and what it costs in resident memory.

Each measurement is a fresh process, started with glibc's defaults or with the environment the
driver gives Ray Train's CPU workers, training in a thread as Ray Train runs the training function:
the same model, the paper's Adam, and batches of about `--tokens` target tokens whose shapes change
every step, as a token-budget stream's do; the two alternate over rounds. Printed per preset:
tokens/s, peak resident size and minor page faults of each, medians over rounds, and the ratios
(kept / default).

    python bench/cpu_allocator.py --presets tiny small --steps 60 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch
from _optimizer import paper_adam
from _provenance import provenance

from jobs.train.cpu_allocator import keep_freed_memory_environment
from transformer import build_model, preset
from transformer.loss import label_smoothed_loss

MODES = ("default", "kept")


def measure(preset_name: str, steps: int, tokens: int, threads: int) -> dict:
    """One process's training loop; the first fifth of the steps warm up untimed."""
    torch.set_num_threads(threads)
    config = preset(preset_name, vocab_size=8000)
    torch.manual_seed(0)
    model = build_model(config).train()
    optimizer = paper_adam(model.parameters(), lr=1e-4)
    shapes = random.Random(0)
    warm_up, timed_tokens = steps // 5, 0
    for step in range(steps):
        if step == warm_up:
            start = time.perf_counter()
        length = shapes.randint(5, 60)
        rows = max(1, tokens // length)
        src = torch.randint(4, config.vocab_size, (rows, length))
        tgt = torch.randint(4, config.vocab_size, (rows, length + 1))
        at = torch.arange(rows * length)
        loss, _ = label_smoothed_loss(model(src, tgt[:, :-1], at, src_padded=False), tgt[:, 1:].flatten(),
                                      config.label_smoothing, config.pad_id)
        optimizer.zero_grad(set_to_none=True)
        (loss / len(at)).backward()
        optimizer.step()
        timed_tokens += len(at) if step >= warm_up else 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"tokens_per_s": timed_tokens / (time.perf_counter() - start), "peak_rss_mb": usage.ru_maxrss / 1024,
            "minor_page_faults": usage.ru_minflt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=2560, help="target tokens per batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measured: list[dict] = []
        thread = threading.Thread(target=lambda: measured.append(
            measure(args.presets[0], args.steps, args.tokens, args.threads)))
        thread.start()
        thread.join()
        print(json.dumps(measured[0]))
        return
    result: dict = {"config": vars(args), "provenance": provenance(), "presets": {}}
    for name in args.presets:
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                child = [sys.executable, __file__, "--child", mode, "--presets", name, "--steps", str(args.steps),
                         "--tokens", str(args.tokens), "--threads", str(args.threads)]
                environment = {**os.environ, **(keep_freed_memory_environment() if mode == "kept" else {})}
                runs[mode].append(json.loads(subprocess.run(child, capture_output=True, text=True, check=True,
                                                            env=environment).stdout.splitlines()[-1]))
        medians = {mode: {key: round(statistics.median(run[key] for run in runs[mode]), 1) for key in runs[mode][0]}
                   for mode in MODES}
        result["presets"][name] = {**medians, "ratio_kept_vs_default": {
            key: round(medians["kept"][key] / medians["default"][key], 3) for key in medians["default"]}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
