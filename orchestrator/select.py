"""The choice: best pair set, combined recipe, greedy forward selection, all from the table.

"Gain" is a pair set's mean ``metric`` minus the reference's mean (the baseline for the
recipe, the current set for greedy); it counts only when it exceeds the pair set's own std over
seeds (sample std; 0 with one seed, so then any gain > 0 counts). Only rows with at least one
finished run are considered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import yaml

from search_spaces.presets import PairSet, greedy_candidates, pair_text
from trainers.errors import InputError

RECIPE_NAME = "combined_recipe"
# Run parameters that make the recipe reproduce the ablation's setting.
SETTING_PARAMS = ("student", "teacher", "steps", "batch_size")


def _metric(table: pd.DataFrame, metric: str | None) -> str:
    metric = metric or table.attrs.get("metric", "rsum")
    if f"{metric}_mean" not in table:
        known = [c.removesuffix("_mean") for c in table if c.endswith("_mean")]
        raise InputError(f"--metric {metric}: not in the table; expected one of {known}")
    return metric


def _finished(table: pd.DataFrame) -> pd.DataFrame:
    done = table[table["seeds"] > 0]
    if done.empty:
        raise InputError("no pair set has a finished run yet")
    return done


def best_pair_set(table: pd.DataFrame, metric: str | None = None) -> pd.Series:
    """The row with the highest mean ``metric`` (default: the table's); ties go to the row
    earlier in the table."""
    metric = _metric(table, metric)
    done = _finished(table)
    return done.loc[done[f"{metric}_mean"].idxmax()]


def _baseline_row(table: pd.DataFrame) -> pd.Series:
    rows = table[table["is_baseline"] & (table["seeds"] > 0)]
    if rows.empty:
        raise InputError("the table has no finished baseline run (tag conaclip.baseline=true)")
    return rows.iloc[0]


def _gains(row: pd.Series, reference: float, metric: str) -> bool:
    return bool(row[f"{metric}_mean"] - reference > row[f"{metric}_std"])


def combined_recipe(
    table: pd.DataFrame, metric: str | None = None, name: str = RECIPE_NAME
) -> PairSet:
    """The baseline's pairs plus every single-addition pair whose mean gain over the baseline
    beats its std. Where the same pair was tried with several weights or temperatures and more
    than one qualifies, the one with the largest mean is used."""
    metric = _metric(table, metric)
    base = _baseline_row(table)
    reference = float(base[f"{metric}_mean"])
    singles = table[(table["n_added"] == 1) & (table["seeds"] > 0)]
    winners = singles[[_gains(row, reference, metric) for _, row in singles.iterrows()]]
    chosen: dict[str, Any] = {}
    for _, row in winners.sort_values(f"{metric}_mean", ascending=False).iterrows():
        added = PairSet.parse(row["added"]).pairs[0]
        chosen.setdefault(added.pair, added)
    return PairSet(name, (*PairSet.parse(base["pairs"]).pairs, *chosen.values()))


def recipe_yaml(recipe: PairSet, settings: Mapping[str, Any] | None = None) -> str:
    """A config for ``conaclip ablate --config``: the settings (student, steps, ...) at the top
    level, then ``pair_sets: [{name, pairs: [...]}]`` with pairs in the ``*weight@temp`` form;
    ``search_spaces.presets.pair_sets_from_yaml`` reads it back to the same pairs."""
    document: dict[str, Any] = dict(settings or {})
    document["pair_sets"] = [{"name": recipe.name, "pairs": [pair_text(p) for p in recipe.pairs]}]
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=100)


def greedy_next(table: pd.DataFrame, current: PairSet, metric: str | None = None) -> PairSet | None:
    """Next round's current set: among ``greedy_candidates(current)`` measured in the table,
    the one with the highest mean ``metric``, if its gain over ``current`` beats its std;
    None when none does or none is left. InputError when ``current`` or all candidates are
    missing from the table (they have to be run first)."""
    metric = _metric(table, metric)
    candidates = {c.key(): c for c in greedy_candidates(current)}
    if not candidates:
        return None
    done = table[table["seeds"] > 0]
    reference_rows = done[done["pairs"] == current.key()]
    if reference_rows.empty:
        raise InputError(f"greedy: the current set {current.key()} has no finished run")
    reference = float(reference_rows[f"{metric}_mean"].iloc[0])
    measured = done[done["pairs"].isin(list(candidates))]
    if measured.empty:
        raise InputError(f"greedy: no candidate of {current.name} has a finished run yet")
    top = measured.loc[measured[f"{metric}_mean"].idxmax()]
    if not _gains(top, reference, metric):
        return None
    return PairSet(str(top["pair_set"]), candidates[top["pairs"]].pairs)


def common_settings(runs: pd.DataFrame) -> dict[str, Any]:
    """The ``SETTING_PARAMS`` that every run of ``runs_frame`` output shares, typed (ints as
    int); a parameter with several values, or none, is left out."""
    settings: dict[str, Any] = {}
    for name in SETTING_PARAMS:
        column = f"params.{name}"
        if column not in runs:
            continue
        values = set(runs[column].dropna().astype(str)) - {"None", ""}
        if len(values) == 1:
            value = values.pop()
            settings[name] = int(value) if value.isdigit() else value
    return settings
