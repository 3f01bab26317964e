"""Where a timed run's wall-clock went: a trial's segments, and the first seeds' share of it."""

from __future__ import annotations

from typing import Any


def seed_prefix_walls(result: dict[str, Any]) -> dict[int, float]:
    """{k: seconds from the benchmark's start until every trial of the first k seeds had
    reported its last result}, for each k below the number of seeds. ``result`` is a run
    record as ``benchmarks/ablation_scale.py run`` writes it: ``timings.started_at`` (Unix s)
    and ``trials``, each with its ``seed`` and ``ended_at`` (Unix s of its last result).

    Tune's grid runs the pair sets of one seed before the next (its first grid key varies
    fastest), so k seeds of a longer run cost what a k-seed ablation costs, give or take the
    tail: there the last trials overlap the next seed's first ones instead of running alone.
    Empty when the run predates the timestamps."""
    started = result["timings"].get("started_at")
    trials = result["trials"]
    if started is None or any(t.get("ended_at") is None for t in trials):
        return {}
    seeds = sorted({t["seed"] for t in trials})
    return {
        k: max(t["ended_at"] for t in trials if t["seed"] in seeds[:k]) - started
        for k in range(1, len(seeds))
    }


def segments(started: float, completed: float, result: dict[str, Any]) -> dict[str, float]:
    """One trial's split (seconds) from its start and its completion (Unix s, as Tune saw
    them) and its one report (``result``: ``loop_started_unix``, ``stack_import_s``,
    ``reported_unix``, as ``benchmarks/train_floor.py``'s loop reports them): ``to_loop``
    (start -> the worker's loop starts), ``stack_import``, ``after_loop`` (the report -> the
    trial is complete) and ``total``."""
    return {
        "to_loop": result["loop_started_unix"] - started,
        "stack_import": result["stack_import_s"],
        "after_loop": completed - result["reported_unix"],
        "total": completed - started,
    }
