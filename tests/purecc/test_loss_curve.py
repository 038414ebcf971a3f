"""The bounded loss record: fixed size whatever the step count, faithful means, lossless round trip."""

from __future__ import annotations

import json

import pytest

from purecc.loss_curve import MAX_POINTS, WINDOW, LossCurve


def test_a_long_run_stays_bounded_and_keeps_its_means():
    curve = LossCurve()
    values = [float(i % 7) + i / 1000 for i in range(20_000)]
    for v in values:
        curve.add(v)
    assert len(curve.recent) == WINDOW and list(curve.recent) == values[-WINDOW:]
    assert len(curve.points) <= MAX_POINTS and curve.steps == len(values)
    assert curve.points[0][0] == 1 and curve.points[-1][1] == len(values)
    # every point is the mean of exactly the steps it covers
    for first, last, mean in curve.points:
        assert mean == pytest.approx(sum(values[int(first) - 1:int(last)]) / (last - first + 1), rel=1e-9)
    assert curve.last_mean(10) == pytest.approx(sum(values[-10:]) / 10)
    assert len(json.dumps(curve.to_dict())) < 20_000         # not one number per step


def test_round_trip_continues_identically():
    a, b = LossCurve(), LossCurve()
    for i in range(300):
        a.add(i * 0.5)
    for i in range(150):
        b.add(i * 0.5)
    b = LossCurve.from_dict(json.loads(json.dumps(b.to_dict())))
    for i in range(150, 300):
        b.add(i * 0.5)
    assert a.to_dict() == b.to_dict()
    assert LossCurve().last_mean() is None
