"""The step's other paths, on CPU so that CI runs them: bf16 through DeepSpeed's CPU accelerator,
the torch.compile'd model (inductor, built with the system compiler) against eager, and updates
with non-finite gradients at every ZeRO stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.jobs.step_run import padded_batches

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _losses(steps: int, *overrides: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.jobs.step_run", str(steps), *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_batches_cover_both_attention_paths() -> None:
    batches = padded_batches(3, seed=7)
    assert not batches[0].src_padded and all(b.src_padded for b in batches[1:])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_trains_within_tolerance_of_fp32(stage: int) -> None:
    fp32 = _losses(8, f"train.zero_stage={stage}")
    bf16 = _losses(8, f"train.zero_stage={stage}", "train.precision=bf16")
    assert bf16["dtype"] == "torch.bfloat16" and fp32["dtype"] == "torch.float32"
    for step, (ours, reference) in enumerate(zip(bf16["losses"], fp32["losses"])):
        assert abs(ours - reference) / reference < 0.03, (step, bf16["losses"], fp32["losses"])
    assert bf16["losses"][-1] < bf16["losses"][0] - 0.5  # it learns, not only starts alike


@pytest.mark.slow
def test_the_compiled_model_trains_like_eager() -> None:
    eager = _losses(5, "train.compile=false")
    compiled = _losses(5, "train.compile=true")
    assert compiled["compiled"] and not eager["compiled"]
    for ours, reference in zip(compiled["losses"], eager["losses"]):
        assert abs(ours - reference) / reference < 1e-4, (compiled["losses"], eager["losses"])


@pytest.mark.parametrize("stage", [0, pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)])
def test_an_update_with_non_finite_gradients_is_skipped_at_every_zero_stage(stage: int) -> None:
    """lr=1e30: the first update makes the weights ~1e30, after which the loss and the gradients
    overflow to NaN. ZeRO-0 in fp32 steps a plain torch optimizer, which would apply them."""
    run = _losses(4, f"train.zero_stage={stage}", "optim.lr=1e30", "optim.warmup_steps=1")
    assert run["fused_adam"], run  # torch's fused kernel on a CPU too, as the DeepSpeed config asks
    assert run["applied"] == [True, False, False, False], run
    assert run["weights_finite"] in (True, None), run  # None: ZeRO-3's weights are partitioned
