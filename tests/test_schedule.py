"""The learning-rate schedules: cosine and warmup-stable-decay, their lengths and their branches."""

from __future__ import annotations

import math

import pytest

from pipeline import schedule as schedules


def test_cosine_warms_up_then_decays_over_the_whole_run() -> None:
    cosine = schedules.make("cosine", max_steps=100, warmup_steps=10, min_ratio=0.1, decay=0.2)
    assert [cosine.ratio(k) for k in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert cosine.ratio(10) == 1.0 and cosine.ratio(100) == pytest.approx(0.1)
    assert cosine.ratio(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine.ratio(60) != schedules.make("cosine", 200, 10, 0.1, 0.2).ratio(60)  # its length is in every step


def test_wsd_holds_the_peak_then_decays_linearly_over_its_last_stretch() -> None:
    wsd = schedules.make("wsd", max_steps=100, warmup_steps=10, min_ratio=0.1, decay=0.2)
    assert wsd.decay_steps == 20
    assert [wsd.ratio(k) for k in (10, 50, 79, 80)] == [1.0, 1.0, 1.0, 1.0]
    assert wsd.ratio(90) == pytest.approx(0.55) and wsd.ratio(100) == pytest.approx(0.1)
    assert schedules.make("wsd", 100, 10, 0.1, decay=30).decay_steps == 30  # a step count
    assert schedules.make("wsd", 100, None, 0.1, 0.2).warmup_steps == 5  # 5% of the run by default
    # longer: the same rate at every step before the shorter run's decay
    longer = schedules.make("wsd", max_steps=600, warmup_steps=10, min_ratio=0.1, decay=0.2)
    assert [longer.ratio(k) for k in range(80)] == [wsd.ratio(k) for k in range(80)]


def test_a_cooldown_is_the_decay_a_run_of_its_whole_length_would_have() -> None:
    assert schedules.cooldown_length(decay=250, from_step=1000) == 250
    assert schedules.cooldown_length(decay=0.2, from_step=800) == 200  # a fifth of the branch's 1,000 steps
    branch = schedules.make("wsd", 800 + 200, 10, 0.1, 0.2)
    assert branch.ratio(799) == branch.ratio(800) == 1.0 and branch.ratio(1000) == pytest.approx(0.1)


def test_a_schedule_survives_json() -> None:
    wsd = schedules.make("wsd", 300, 15, 0.1, 0.2)
    assert schedules.from_json(wsd.to_json()) == wsd
