"""A trial's split (``orchestrator.run_timing.segments``), and one real run of empty trials
by benchmarks/train_floor.py, run as its users run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.run_timing import segments

ROOT = Path(__file__).resolve().parents[1]


def test_segments_split_a_trial_at_its_loop_start_and_report():
    # Tune starts the trial at 100.0; the worker's loop starts at 108.5, spends 1.25 s importing
    # the stack and reports at 110.0; Tune marks the trial complete at 111.0.
    result = {"loop_started_unix": 108.5, "stack_import_s": 1.25, "reported_unix": 110.0}
    split = segments(100.0, 111.0, result)
    assert split == {"to_loop": 8.5, "stack_import": 1.25, "after_loop": 1.0, "total": 11.0}


@pytest.mark.integration
def test_empty_trials_run_through_tune_and_train(tmp_path):
    # Two empty trials under Tune + Train on a fresh local cluster, the worker importing the
    # training stack: every segment comes from a real trial's clocks.
    out = tmp_path / "floor.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_floor.py"), "--mode", "tune+train",
         "--trials", "2", "--import-stack", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["trials"]) == 2
    for trial in result["trials"]:
        # The loop ran between reaching the worker and reporting: imports, then the report.
        in_loop = trial["total"] - trial["to_loop"] - trial["after_loop"]
        assert trial["stack_import"] > 0
        assert trial["stack_import"] <= in_loop + 0.05
        assert trial["to_loop"] > 0 and trial["after_loop"] > 0
    assert "tune+train: 2 trials, 1 at a time" in done.stdout
