"""Naming a straggler: persistently slower by the factor, once, and not for noise."""

from __future__ import annotations

import time

import pytest
import torch

from jobs.report.metrics import ForwardClock, MetricsWindow
from jobs.report.stragglers import MIN_STEPS, PERSISTENT, WINDOWS, StragglerWatch, skew

WHERE = ["host-a/n1", "host-b/n2", "host-c/n3"]
STEPS = 10  # per log window, as the main job logs


def test_a_rank_slow_for_three_windows_in_a_row_is_named_once() -> None:
    watch = StragglerWatch(factor=1.5)
    named = [watch.observe([50.0, 120.0, 50.0], WHERE, STEPS) for _ in range(WINDOWS + 3)]
    assert [len(lines) for lines in named] == [0] * (WINDOWS - 1) + [1] + [0] * 3
    assert named[WINDOWS - 1][0].startswith("straggler: rank 1 on host-b/n2 is 2.4x slower")


def test_a_few_short_slow_windows_are_the_machines_noise() -> None:
    """With a log line every step, three windows are three steps: a loaded machine's moment. A rank
    slowed for good is named once its latest MIN_STEPS steps say so, a noisy step among them or not."""
    noise = StragglerWatch(factor=1.5)
    windows = [[50.0, 50.0]] * 30 + [[50.0, 120.0]] * 3 + [[50.0, 50.0]] * 30
    assert not [line for window in windows for line in noise.observe(window, WHERE[:2], 1)]
    slowed = StragglerWatch(factor=1.5)
    windows = [[50.0, 120.0]] * 9 + [[50.0, 50.0]] + [[50.0, 120.0]] * (MIN_STEPS - 10)  # one quick step among them
    named = [slowed.observe(window, WHERE[:2], 1) for window in windows]
    assert [len(lines) for lines in named] == [0] * (MIN_STEPS - 1) + [1]
    assert named[-1][0].endswith(f"the median of the last {MIN_STEPS} steps)")


def test_a_slow_window_now_and_then_or_noise_is_no_straggler() -> None:
    watch = StragglerWatch(factor=1.5)
    for window in range(12):
        slow = 200.0 if window % WINDOWS == 0 else 50.0
        assert watch.observe([50.0, slow, 50.0], WHERE, STEPS) == []
    noise = StragglerWatch(factor=1.5)
    assert all(noise.observe([0.2, 1.0, 0.2], WHERE, STEPS) == [] for _ in range(2 * WINDOWS))  # 5x, of 1 ms


def test_a_margin_near_the_factor_that_noise_crosses_both_ways_is_no_straggler() -> None:
    """CI's reference run, two workers on two shared cores: rank 1 took 1.6x rank 0's time per token
    in some steps and 1.2x in others; the median of its steps was over the factor, yet it was never
    slowed. A rank is named when it is over the factor in most steps, each against the same step's
    others: then a load on the whole machine, which slows every rank at once, cancels out too."""
    over = int(0.6 * MIN_STEPS)  # over the factor in 60% of the steps, below PERSISTENT
    assert over < PERSISTENT * MIN_STEPS
    noisy = StragglerWatch(factor=1.5)
    windows = [[51.0, 80.0]] * over + [[51.0, 60.0]] * (MIN_STEPS - over)
    assert not [line for window in windows * 3 for line in noisy.observe(window, WHERE[:2], 1)]
    loaded = StragglerWatch(factor=1.5)  # the whole machine slow in every other step
    windows = [[50.0, 80.0], [150.0, 160.0]] * MIN_STEPS
    assert not [line for window in windows for line in loaded.observe(window, WHERE[:2], 1)]


def test_a_recovered_straggler_is_named_again_when_slow_again() -> None:
    watch = StragglerWatch(factor=1.5)
    slow, fine = [50.0, 200.0], [50.0, 50.0]
    pattern = [slow] * WINDOWS + [fine] * WINDOWS + [slow] * WINDOWS
    assert sum(len(watch.observe(times, WHERE, STEPS)) for times in pattern) == 2


def test_skew_is_the_slowest_over_the_median_of_the_ranks_with_data() -> None:
    assert skew([0.1, 0.1, 0.3]) == pytest.approx(3.0) and skew([0.2]) == 1.0
    assert skew([0.1, None, 0.3]) == pytest.approx(1.5) and skew([None, None]) == 1.0


def _window(forward_s: float, tokens_per_step: list[float]) -> MetricsWindow:
    """A log window of one rank: `forward_s` per real batch, no data wait, these own tokens a step."""
    window = MetricsWindow()
    for tokens in tokens_per_step:
        window.add_step(1.0, 1.0, 2000, 10, data_wait=0.0, forward=forward_s if tokens else 0.0, own_tokens=tokens)
    return window


def test_an_epoch_end_where_one_rank_runs_out_of_data_is_no_straggler() -> None:
    """Near an epoch's end rank 1 has no batches left and steps on stand-ins while rank 0 trains on
    its last ones, for longer than three log windows: rank 0 does more work, at the same speed."""
    watch = StragglerWatch(factor=1.5)
    for _ in range(2 * WINDOWS):
        rank0 = _window(0.217, [1000.0] * 10)  # the main job's forward on a CPU
        rank1 = _window(0.217, [1000.0] * 2 + [0.0] * 8)  # out of data after two steps
        own = [rank0.own_ms_per_1k_tokens(), rank1.own_ms_per_1k_tokens()]
        assert own[0] == pytest.approx(own[1]) and watch.observe(own, WHERE[:2], STEPS) == []
        assert _window(0.217, [0.0] * 10).own_ms_per_1k_tokens() is None  # a window with none at all
        assert watch.observe([own[0], None], WHERE[:2], STEPS) == []


def test_a_rank_with_smaller_batches_is_no_straggler_but_one_slower_per_token_is() -> None:
    fine, small, slow = (StragglerWatch(factor=1.5) for _ in range(3))
    for _ in range(WINDOWS):
        full = _window(0.200, [1000.0] * 10).own_ms_per_1k_tokens()
        assert fine.observe([full, _window(0.050, [250.0] * 10).own_ms_per_1k_tokens()], WHERE[:2], STEPS) == []
        lines = slow.observe([full, _window(0.400, [1000.0] * 10).own_ms_per_1k_tokens()], WHERE[:2], STEPS)
    assert lines and lines[0].startswith("straggler: rank 1 on host-b/n2 is 2.0x slower than the other ranks "
                                         "(400 ms against 200 ms of forward passes and data wait per 1,000 target")


def test_the_forward_clock_times_what_it_wraps_and_the_window_adds_data_wait() -> None:
    clock = ForwardClock(torch.device("cpu"))
    with clock.timing():
        time.sleep(0.05)
    forward = clock.take()
    assert 0.045 < forward < 0.5 and clock.take() == 0.0
    window = MetricsWindow()
    window.add_step(1.0, 1.0, 10, 10, data_wait=0.01, forward=forward, own_tokens=400)
    window.add_step(1.0, 1.0, 10, 10, data_wait=0.03, forward=forward, own_tokens=600)
    assert window.own_ms_per_1k_tokens() == pytest.approx(1e6 * (2 * forward + 0.04) / 1000)


def test_the_ranks_figures_are_the_same_few_names_at_any_world_size() -> None:
    """Two ranks or a thousand: five metric names, the slowest rank named by its number."""
    from jobs.report.metrics import rank_time_metrics

    many = [10.0 + (rank % 3) for rank in range(1000)]
    many[637], many[5] = 50.0, None  # one slow rank, one without data in the window
    figures = rank_time_metrics(many)
    assert figures == {"train/own_ms_per_ktok/min": 10.0, "train/own_ms_per_ktok/median": 11.0,
                       "train/own_ms_per_ktok/max": 50.0, "train/slowest_rank": 637.0,
                       "train/rank_skew": pytest.approx(50.0 / 11.0)}
    assert set(rank_time_metrics([20.0, 30.0])) == set(figures)
    assert rank_time_metrics([None, None]) == {"train/rank_skew": 1.0}
