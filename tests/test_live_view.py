"""The ablation's live line: counts, best so far and ETA from the events Tune sends it."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from orchestrator.live_view import LiveView, format_eta


def trial(trial_id: str, pair_set: str) -> SimpleNamespace:
    # The two attributes of a Tune Trial that the view reads.
    return SimpleNamespace(trial_id=trial_id, config={"pair_set": pair_set})


def test_counts_best_and_failures_follow_the_events():
    out = io.StringIO()
    view = LiveView(total=4, concurrency=2, stream=out)
    a, b = trial("a", "baseline"), trial("b", "baseline+intra_ss:sd")
    view.on_trial_start(0, [], a)
    view.on_trial_start(0, [], b)
    view.on_trial_result(0, [], a, {"rsum": 80.5})
    view.on_trial_result(0, [], b, {"rsum": 84.25})
    view.on_trial_result(0, [], a, {"rsum": 82.0})  # not a new best
    view.on_trial_complete(0, [], a)
    view.on_trial_error(0, [], b)
    lines = out.getvalue().splitlines()  # not a terminal: one line per change
    assert lines[0] == "ablation: trials 0/4 done, 1 running, 3 pending, ETA ?"
    assert lines[-1].startswith(
        "ablation: trials 1/4 done, 0 running, 2 pending, 1 failed, "
        "best rsum 84.25 (baseline+intra_ss:sd), ETA "
    )
    assert len(lines) == len(set(lines))  # unchanged states are not repeated


def test_eta_is_the_work_left_over_the_trials_at_once():
    view = LiveView(total=4, concurrency=2, stream=io.StringIO())
    view._done, view._durations = 1, [10.0]
    view._started = {"c": 100.0}  # running for 4 s at now = 104
    # 3 trials left x 10 s, less the 4 s the running one has spent, over 2 at once.
    assert view.eta(now=104.0) == pytest.approx((3 * 10 - 4) / 2)
    assert "ETA 13 s" in view.line(now=104.0)


def test_format_eta():
    assert [format_eta(s) for s in (None, 38.4, 245, 0)] == ["?", "38 s", "4 min 05 s", "0 s"]
