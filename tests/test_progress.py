"""The overall reconstruction bar's time left: work counted in predicted seconds, divided by a rate
held towards the prediction; tools/eta_accuracy.py computes the same from a report."""

from __future__ import annotations

import io

from eta_accuracy import eta_errors  # tools/eta_accuracy.py (pytest puts tools/ on the import path)

from onnxmodcap.progress import PREDICTION_WEIGHT, held_rate, predicted_seconds_bar


def frozen_clock(bar, elapsed: float) -> None:
    """Make `bar` read `elapsed` seconds since it started, whatever the machine's clock does."""
    bar._time = lambda: 1000.0
    bar.start_t = 1000.0 - elapsed


def test_held_rate_starts_at_the_prediction_and_moves_towards_the_measured_rate():
    assert held_rate(0.0, 0.0, 500.0) == 1.0
    assert held_rate(100.0, 200.0, 500.0) == 600.0 / 700.0
    assert held_rate(100.0, 200.0, 0.0) == 0.5


def test_bar_shows_the_work_left_over_the_held_rate():
    with predicted_seconds_bar(1000.0, desc="reconstructing", file=io.StringIO(), mininterval=0,
                               bar_format="{remaining}") as bar:
        bar.update(100.0)
        frozen_clock(bar, 200.0)  # 100 predicted seconds of work took 200 s
        prior = PREDICTION_WEIGHT * 1000.0
        rate = held_rate(100.0, 200.0, prior)
        assert bar.format_dict["rate"] == rate
        minutes, seconds = divmod(round(900.0 / rate), 60)
        assert bar.format_meter(**bar.format_dict) == f"{minutes:02d}:{seconds:02d}"
        assert bar.format_meter(**bar.format_dict) != "30:00"  # what the plain mean rate would show


def test_bar_after_a_resume_counts_only_the_work_done_in_this_run():
    with predicted_seconds_bar(1000.0, 400.0, file=io.StringIO(), mininterval=0) as bar:
        bar.update(100.0)
        frozen_clock(bar, 200.0)
        assert bar.format_dict["rate"] == held_rate(100.0, 200.0, PREDICTION_WEIGHT * 1000.0)


def test_bar_without_work_or_disabled_shows_without_error():
    with predicted_seconds_bar(0.0, file=io.StringIO()) as empty:
        assert "?" in str(empty)  # no rate before any time has passed: tqdm's unknown time left
    with predicted_seconds_bar(1000.0, 400.0, disable=True) as hidden:
        hidden.update(100.0)
        assert "<?" in str(hidden)  # tqdm's text of a disabled bar: time left unknown, not an error


def test_eta_accuracy_replays_the_bar_from_a_report():
    units = [{"name": "stem", "seconds": 50.0, "estimated_seconds": 100.0},
             {"name": "block1", "seconds": 300.0, "estimated_seconds": 300.0},
             {"name": "head", "seconds": 100.0, "estimated_seconds": 100.0}]
    [(first, shown, real), (second, _, _)] = eta_errors(units)
    assert (first, second) == ("stem", "block1")
    assert real == 400.0
    assert shown == 400.0 / held_rate(100.0, 50.0, PREDICTION_WEIGHT * 500.0)
    [(_, plain, _), _] = eta_errors(units, weight=0.0)
    assert plain == 200.0  # the plain mean rate: twice as fast as predicted so far
