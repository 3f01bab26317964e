"""Seed racing replayed offline on a recorded grid: which verdict would ``--race`` have
reached, with how many trial-steps, against the full grid's own verdict?

Why a replay is the race: a trial's result depends only on its (pair set, seed, settings),
never on which other trials ran or when (each trial seeds its own model and data order;
evaluation does not touch the training RNG). The race ``conaclip ablate --race`` would have
run with these settings would therefore have seen exactly the runs of the grid it asked for.
The replay runs the race's own loop (``orchestrator.race.race_loop``: the same design,
``decide`` and ``visible_runs``) with nothing to launch. The full grid's verdict is the table of
all runs at M seeds as a fixed grid (one look), compared part by part with the race's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from orchestrator import race
from orchestrator.sequential import DEFAULT_SPENDING
from orchestrator.verdicts import DEFAULT_MARGIN
from trainers.errors import InputError

MARKDOWN_HEADER = (
    "| experiment | seeds | race trials | race trial-steps | full grid trial-steps | share "
    "| race: better / worse / equivalent / open | grid: better / worse / equivalent / open "
    "| same better | same worse | same equivalent |\n"
    "|---|---|---:|---:|---:|---:|---|---|:-:|:-:|:-:|"
)


def without_verification(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` less those of ``conaclip best --verify`` (tag ``conaclip.preset`` "verify"): the
    recipe check it adds to the grid's experiment is not a cell the race would have run."""
    if "tags.conaclip.preset" not in runs:
        return runs
    kept = runs[runs["tags.conaclip.preset"].astype("string").fillna("") != "verify"]
    kept.attrs.update(runs.attrs)
    return kept


def grid_cells(runs: pd.DataFrame) -> tuple[str, list[str], int]:
    """(baseline, other pair sets in first-run order, steps per trial) of a grid's runs."""
    trials = runs[runs["params.pairs"].notna()] if "params.pairs" in runs else runs.iloc[0:0]
    if trials.empty:
        raise InputError("no conaclip trial runs in the experiment")
    tagged = trials.get("tags.conaclip.baseline", pd.Series("", index=trials.index))
    baselines = sorted(set(trials.loc[tagged.astype("string").str.lower() == "true",
                                      "params.pair_set"]))  # fmt: skip
    if len(baselines) != 1:
        raise InputError(f"expected one baseline pair set (tag conaclip.baseline), found "
                         f"{baselines or 'none'}")  # fmt: skip
    names = list(dict.fromkeys(trials["params.pair_set"].astype(str)))
    steps = pd.to_numeric(trials["params.steps"], errors="coerce").dropna()
    return baselines[0], [n for n in names if n != baselines[0]], int(steps.max())


def first_seed(runs: pd.DataFrame) -> int:
    """The smallest seed of the runs: a grid's seeds (and so its race's) count up from it."""
    seeds = pd.to_numeric(runs.get("params.seed", pd.Series(dtype=float)), errors="coerce")
    return int(seeds.min()) if seeds.notna().any() else 0


def full_grid_verdict(
    runs: pd.DataFrame,
    baseline: str,
    cells: list[str],
    max_seeds: int,
    metric: str,
    ranks: Callable[[pd.DataFrame], Any] | None,
    first: int = 0,
    margin: float = DEFAULT_MARGIN,
) -> race.RaceVerdict:
    """The verdict of the full grid at ``max_seeds`` seeds from seed ``first`` (one look);
    InputError when a (cell, seed) of it has no FINISHED run."""
    every = {name: max_seeds for name in (baseline, *cells)}
    done = race.finished_trials(runs)
    for trial in race.round_plan(baseline, cells, max_seeds, first):
        if trial not in done:
            raise InputError(f"not a full grid at {max_seeds} seeds: no FINISHED run of "
                             f"{trial[0]} seed {trial[1]}")  # fmt: skip
    visible = race.visible_runs(runs, every, first)
    table = race.race_table(visible, metric, ranks(visible) if ranks else None, margin=margin)
    return race.verdict_of(table, cells, metric)


def replay(
    runs: pd.DataFrame,
    start_seeds: int,
    max_seeds: int,
    metric: str = "rsum",
    ranks: Callable[[pd.DataFrame], Any] | None = None,
    say: Callable[[str], None] = race._say,
    margin: float = DEFAULT_MARGIN,
    spending: str = DEFAULT_SPENDING,
) -> dict[str, Any]:
    """The race replayed on ``runs`` (a full grid's ``runs_frame``) and the comparison with
    the full grid's verdict, as a JSON-ready report.

    ``runs`` may also be an earlier race's ledger instead of a full grid: then the race alone
    is reported (``grid_verdict`` and ``same`` None), and a replay that asks for a trial the
    ledger lacks raises InputError naming it. The race's seeds count up from the grid's
    smallest (``first_seed``), as ``--first-seed`` would have run it."""
    baseline, cells, steps = grid_cells(runs)
    first = first_seed(runs)
    try:
        grid = full_grid_verdict(runs, baseline, cells, max_seeds, metric, ranks, first, margin)
    except InputError as error:
        say(f"race_replay: {error}; the race is replayed alone")
        grid = None
    result = race.race_loop(baseline, cells, start_seeds, max_seeds, lambda: runs, None,
                            metric=metric, steps=steps, ranks=ranks, say=say,
                            first_seed=first, margin=margin, spending=spending)  # fmt: skip
    assert result.verdict is not None
    return {
        "experiment": runs.attrs.get("experiment"),
        "start_seeds": start_seeds,
        "first_seed": first,
        "margin": margin,
        "spending": spending,
        **result.as_dict(),
        "share": result.spent_steps / result.full_steps,
        "grid_verdict": None if grid is None else grid.as_dict(),
        "same": None if grid is None else result.verdict.same_as(grid),
    }


def _counts(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return "-"
    return " / ".join(str(len(verdict[k])) for k in ("better", "worse", "equivalent", "open"))


def markdown_row(report: dict[str, Any]) -> str:
    """One row under ``MARKDOWN_HEADER``."""

    def yes(flag: bool | None) -> str:
        return "-" if flag is None else "yes" if flag else "**no**"

    same = report["same"] or {}
    return (
        f"| {report['experiment']} | {report['start_seeds']}..{report['max_seeds']} "
        f"| {report['trials']} | {report['spent_steps']} | {report['full_steps']} "
        f"| {report['share']:.0%} | {_counts(report['verdict'])} "
        f"| {_counts(report['grid_verdict'])} | {yes(same.get('better'))} "
        f"| {yes(same.get('worse'))} | {yes(same.get('equivalent'))} |"
    )
