"""Naming a straggler: persistently slower by the factor, once, and not for noise."""

from __future__ import annotations

import time

import pytest
import torch

from jobs.metrics import ForwardClock, MetricsWindow
from jobs.stragglers import WINDOWS, StragglerWatch, skew

WHERE = ["host-a/n1", "host-b/n2", "host-c/n3"]


def test_a_rank_slow_for_three_windows_in_a_row_is_named_once() -> None:
    watch = StragglerWatch(factor=1.5)
    named = [watch.observe([0.05, 0.12, 0.05], WHERE) for _ in range(WINDOWS + 3)]
    assert [len(lines) for lines in named] == [0] * (WINDOWS - 1) + [1] + [0] * 3
    assert named[WINDOWS - 1][0].startswith("straggler: rank 1 on host-b/n2 is 2.4x slower")


def test_a_slow_window_now_and_then_or_noise_is_no_straggler() -> None:
    watch = StragglerWatch(factor=1.5)
    for window in range(12):
        slow = 0.2 if window % WINDOWS == 0 else 0.05
        assert watch.observe([0.05, slow, 0.05], WHERE) == []
    noise = StragglerWatch(factor=1.5)
    assert all(noise.observe([0.0002, 0.001, 0.0002], WHERE) == [] for _ in range(2 * WINDOWS))  # 5x, of 1 ms


def test_a_recovered_straggler_is_named_again_when_slow_again() -> None:
    watch = StragglerWatch(factor=1.5)
    slow, fine = [0.05, 0.2], [0.05, 0.05]
    pattern = [slow] * WINDOWS + [fine] + [slow] * WINDOWS
    assert sum(len(watch.observe(times, WHERE)) for times in pattern) == 2


def test_skew_is_the_slowest_over_the_median() -> None:
    assert skew([0.1, 0.1, 0.3]) == pytest.approx(3.0) and skew([0.2]) == 1.0


def test_the_forward_clock_times_what_it_wraps_and_the_window_adds_data_wait() -> None:
    clock = ForwardClock(torch.device("cpu"))
    with clock.timing():
        time.sleep(0.05)
    forward = clock.take()
    assert 0.045 < forward < 0.5 and clock.take() == 0.0
    window = MetricsWindow()
    window.add_step(1.0, 1.0, 10, 10, data_wait=0.01, forward=forward)
    window.add_step(1.0, 1.0, 10, 10, data_wait=0.03, forward=forward)
    assert abs(window.own_seconds_per_step() - (forward + 0.02)) < 1e-9
