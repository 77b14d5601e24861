"""QN <-> ms through tempo maps and bars <-> QN through meters are exact inverses."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmi_daemon.errors import TimeMapError
from cmi_daemon.music.tempo import Meter, TempoMap

tempo_changes = st.lists(
    st.tuples(st.floats(0, 2000, allow_nan=False, allow_subnormal=False),
              st.floats(20, 300, allow_nan=False, allow_subnormal=False)),
    min_size=0, max_size=12)
meter_changes = st.lists(
    st.tuples(st.integers(0, 400).map(lambda n: n * 0.5), st.integers(1, 15), st.sampled_from([2, 4, 8, 16])),
    min_size=0, max_size=8)


def test_constant_tempo():
    tempo_map = TempoMap.constant(120)
    assert tempo_map.ms_at(4.0) == 2000.0
    assert tempo_map.qn_at(2000.0) == 4.0


def test_tempo_change_applies_from_its_position():
    tempo_map = TempoMap.from_changes([(0, 120), (4, 60)])
    assert tempo_map.ms_at(4) == pytest.approx(2000)
    assert tempo_map.ms_at(6) == pytest.approx(4000)
    assert tempo_map.qn_at(4000) == pytest.approx(6)
    assert tempo_map.bpm_at(5) == 60


@settings(max_examples=200, deadline=None)
@given(tempo_changes, st.lists(st.floats(0, 5000, allow_nan=False, allow_subnormal=False), min_size=1, max_size=20))
def test_qn_ms_are_inverse(changes, positions_qn):
    tempo_map = TempoMap.from_changes(changes)
    for qn in positions_qn:
        ms = tempo_map.ms_at(qn)
        assert tempo_map.qn_at(ms) == pytest.approx(qn, abs=1e-6)
        assert tempo_map.ms_at(tempo_map.qn_at(ms)) == pytest.approx(ms, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(tempo_changes)
def test_ms_grows_with_qn(changes):
    tempo_map = TempoMap.from_changes(changes)
    grid = [i * 7.3 for i in range(300)]
    ms = tempo_map.ms_at(grid)
    assert all(b > a for a, b in zip(ms, ms[1:]))


@pytest.mark.parametrize("bpm", [0.0, -10.0, 1e6, math.inf, math.nan])
def test_absurd_tempo_is_refused(bpm):
    with pytest.raises(TimeMapError, match="tempo"):
        TempoMap.from_changes([(0, bpm)])


def test_negative_tempo_position_is_refused():
    with pytest.raises(TimeMapError, match=">= 0"):
        TempoMap.from_changes([(-1, 120)])


def test_bars_in_four_four_are_counted_from_one():
    meter = Meter.constant()
    assert meter.bar_start_qn(1) == 0.0
    assert meter.bar_start_qn(9) == 32.0
    assert meter.bar_range_qn(9, 12) == (32.0, 48.0)
    assert meter.bar_at_qn(33.0) == 9.25


def test_odd_meters_and_changes():
    # 4 bars of 4/4, 3 bars of 7/8, then 3/4
    meter = Meter.from_changes([(0, 4, 4), (16, 7, 8), (16 + 3 * 3.5, 3, 4)])
    assert meter.bar_start_qn(5) == 16.0
    assert meter.bar_start_qn(6) == 19.5
    assert meter.bar_start_qn(8) == 26.5
    assert meter.bar_start_qn(9) == 29.5
    assert meter.bar_range_qn(5, 7) == (16.0, 26.5)


def test_a_change_mid_bar_cuts_the_bar_short():
    meter = Meter.from_changes([(0, 4, 4), (6, 3, 4)])  # bar 2 lasts 2 QN
    assert meter.bar_range_qn(2, 2) == (4.0, 6.0)
    assert meter.bar_start_qn(3) == 6.0
    assert meter.bar_at_qn(7.5) == 3.5


@settings(max_examples=200, deadline=None)
@given(meter_changes, st.floats(0, 600, allow_nan=False, allow_subnormal=False))
def test_bar_qn_are_inverse(changes, qn):
    meter = Meter.from_changes(changes)
    bar = meter.bar_at_qn(qn)
    assert meter.bar_start_qn(bar) == pytest.approx(qn, abs=1e-6)
    whole = math.floor(bar + 1e-9)
    assert meter.bar_at_qn(meter.bar_start_qn(whole)) == pytest.approx(whole, abs=1e-9)


def test_bars_before_the_first_are_refused():
    with pytest.raises(TimeMapError, match="counted from 1"):
        Meter.constant().bar_start_qn(0)
    with pytest.raises(TimeMapError, match="denominator"):
        Meter.from_changes([(0, 4, 3)])
