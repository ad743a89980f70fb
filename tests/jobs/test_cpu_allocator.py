"""A CPU worker's process keeps freed memory for its next step instead of faulting it in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A fresh process (the setting holds for a whole process) trains a small model and reports the
# minor page faults of three steps after the heap has settled: the steps free and reallocate their
# activations, logits and gradients. The logits (1280 x 8000 floats, 41 MB) are over the largest
# threshold glibc ever serves from its heap by default, so there every step maps them afresh.
STEPS = """
import json, resource, sys, torch
from jobs.cpu_allocator import keep_freed_memory
from transformer import build_model, preset
from transformer.loss import label_smoothed_loss
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
model = build_model(preset("tiny", vocab_size=8000))
optimizer = torch.optim.Adam(model.parameters())
src, tgt = torch.randint(4, 8000, (64, 20)), torch.randint(4, 8000, (64, 21))
for step in range(11):
    if step == 8:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss, _ = label_smoothed_loss(model(src, tgt[:, :-1]), tgt[:, 1:], 0.1, 0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _three_steps(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_training_step_reuses_the_memory_the_last_one_freed() -> None:
    default, kept = _three_steps("default"), _three_steps("keep")
    logits_pages = 64 * 20 * 8000 * 4 // 4096  # one step's logits alone, faulted in again by default
    assert default["faults"] > 3 * logits_pages, default
    assert kept["applied"] and kept["faults"] < default["faults"] / 10, (kept, default)
