"""The choice: best pair set, combined recipe, greedy forward selection, all from the table.

A pair set wins only with a significant gain: its ``verdict`` in the table (see
``orchestrator.table.selection_table``) is "better", i.e. its paired gain over the baseline
(same seeds) survives training noise (t-test over seeds) and eval-query noise (bootstrap),
both adjusted for the table's many comparisons, with at least two seeds. Otherwise there is
no winner, only a *leading candidate* (the largest paired gain) and a reason in plain words,
with what would settle it. Only rows with at least one finished run are considered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import yaml

from orchestrator import run_params, stats
from orchestrator.race_rules import behind_leader
from search_spaces.presets import PairSet, greedy_candidates
from trainers.errors import InputError
from trainers.run_config import PairConfig, pair_text

RECIPE_NAME = "combined_recipe"
# --seeds suggestions stop here: a gain that needs more is better settled by racing.
MAX_SUGGESTED_SEEDS = 20


def _metric(table: pd.DataFrame, metric: str | None) -> str:
    own = table.attrs.get("metric", "rsum")
    metric = metric or own
    if f"{metric}_mean" not in table:
        known = [c.removesuffix("_mean") for c in table if c.endswith("_mean")]
        raise InputError(f"--metric {metric}: not in the table; expected one of {known}")
    if metric != own:
        raise InputError(
            f"--metric {metric}: the table's gains and verdicts are for {own}; build it with "
            f"selection_table(runs, metric={metric!r})"
        )
    return metric


def _finished(table: pd.DataFrame) -> pd.DataFrame:
    done = table[table["seeds"] > 0]
    if done.empty:
        raise InputError("no pair set has a finished run yet")
    return done


@dataclass(frozen=True)
class Choice:
    """The verdict of a table: ``winner`` (the "better" row with the largest gain_mean, or
    None), ``leading`` (the non-baseline row with the largest paired gain, the winner when
    there is one; None when the table has no candidate) and ``reason``: plain sentences
    saying why, and what would settle it when nothing is significant. ``rivals``: with a
    winner, the part of ``reason`` about the other significant rows (``_rivals_text``)."""

    winner: pd.Series | None
    leading: pd.Series | None
    reason: str
    rivals: str = ""


def choose(table: pd.DataFrame, metric: str | None = None) -> Choice:
    """Winner, leading candidate and reason for ``table`` (``selection_table`` output).
    InputError when no row has a finished run, or ``metric`` is not the table's metric."""
    metric = _metric(table, metric)
    done = _finished(table)
    alpha = float(table.attrs.get("alpha", 0.05))
    candidates = done[~done["is_baseline"]]
    better = candidates[candidates["verdict"] == "better"]
    if not better.empty:
        winner = better.loc[better["gain_mean"].idxmax()]
        rivals = _rivals_text(done, better, winner, metric, alpha)
        return Choice(winner, winner, _winner_reason(winner, metric, alpha, rivals), rivals)
    if not done["is_baseline"].any():
        return Choice(
            None,
            None,
            "there is no finished baseline run (tag "
            "conaclip.baseline=true), so no gain can be measured",
        )
    if candidates.empty:
        return Choice(None, None, "only the baseline has finished runs: nothing to compare")
    gains = candidates["gain_mean"].where(
        candidates["gain_mean"].notna(), candidates[f"delta_{metric}"]
    )
    if gains.isna().all():
        return Choice(None, None, "no pair set shares a finished seed with the baseline")
    leading = candidates.loc[gains.idxmax()]
    return Choice(None, leading, _open_reason(table, leading, metric, alpha))


def best_pair_set(table: pd.DataFrame, metric: str | None = None) -> pd.Series | None:
    """The "better" row with the largest mean paired gain, None when no row is significantly
    better than the baseline (``choose`` says why). Ties go to the row earlier in the table."""
    return choose(table, metric).winner


def gain_text(row: pd.Series | Mapping[str, Any], metric: str) -> str:
    """``+8.00 rsum [95% CI +3.03, +12.97 over 3 seeds; +5.10, +10.85 over eval queries]``:
    the row's paired gain over the baseline with whichever intervals exist."""
    if pd.isna(row["gain_mean"]):
        return (
            f"{row[f'delta_{metric}']:+.2f} {metric} (unpaired: no seed shared with the baseline)"
        )
    parts = []
    if pd.notna(row["gain_ci_low"]):
        parts.append(
            f"{row['gain_ci_low']:+.2f}, {row['gain_ci_high']:+.2f} over {row['gain_n']} seeds"
        )
    else:
        parts.append(f"n={row['gain_n']} seed: no interval over seeds")
    if pd.notna(row["boot_gain_low"]):
        parts.append(f"{row['boot_gain_low']:+.2f}, {row['boot_gain_high']:+.2f} over eval queries")
    return f"{row['gain_mean']:+.2f} {metric} [95% CI {'; '.join(parts)}]"


def p_text(row: pd.Series | Mapping[str, Any]) -> str:
    """``adjusted p 0.012 over seeds, 0.001 over eval queries`` ("n/a" for NaN)."""

    def one(value: Any) -> str:
        return "n/a" if pd.isna(value) else f"{value:.3g}"

    seeds, queries = one(row["p_seed_adj"]), one(row["p_boot_adj"])
    return f"adjusted p {seeds} over seeds, {queries} over eval queries"


def _rivals_text(
    done: pd.DataFrame, better: pd.DataFrame, winner: pd.Series, metric: str, alpha: float
) -> str:
    """ "; N other rows are significantly better too" (``better``: the significant rows of
    ``done``, the finished ones, winner included) and whether the winner is ahead of each of
    them seed for seed (``race_rules.behind_leader``: paired t-test, Holm over those rows);
    "" when no other row is significantly better."""
    rivals = [str(name) for name in better["pair_set"] if name != winner["pair_set"]]
    if not rivals:
        return ""
    behind = behind_leader(done, str(winner["pair_set"]), rivals, metric, alpha)
    count = len(rivals)
    text = f"; {count} other row{'s are' if count > 1 else ' is'} significantly better too"
    open_rivals = [r for r in rivals if r not in behind]
    if not open_rivals:
        return text + (
            f", and seed for seed it is ahead of {'each' if count > 1 else 'it'} (paired "
            "t-test, Holm)"
        )
    return text + (
        f"; seed for seed (paired t-test, Holm) it is ahead of {len(behind)} of them, not "
        f"yet of {', '.join(open_rivals)}"
    )


def _winner_reason(row: pd.Series, metric: str, alpha: float, others: str) -> str:
    return (
        f"{row['pair_set']} gains {gain_text(row, metric)}; {p_text(row)}, both below "
        f"{alpha}{others}"
    )


def _family(table: pd.DataFrame) -> int:
    return max(1, int((~table["is_baseline"]).sum()))


def _baseline_spread(table: pd.DataFrame) -> float:
    """The baseline's std over seeds of the table's metric (NaN with < 2 seeds)."""
    base = table[table["is_baseline"]]
    return float(base[f"{table.attrs.get('metric', 'rsum')}_std"].iloc[0]) if len(base) else np.nan


def _suggest_seeds(table: pd.DataFrame, row: pd.Series, alpha: float) -> int | None:
    """Seeds that would let a gain of this size clear the corrected test, from the row's own
    spread over seeds, or, with one seed, from the baseline's spread (x sqrt 2: a difference
    of two independent runs). None: more than MAX_SUGGESTED_SEEDS, or nothing to go on."""
    spread = row["gain_std"]
    if pd.isna(spread):
        spread = _baseline_spread(table) * np.sqrt(2)
    return stats.seeds_needed(
        float(row["gain_mean"]), float(spread), alpha, _family(table), MAX_SUGGESTED_SEEDS
    )


def _open_reason(table: pd.DataFrame, row: pd.Series, metric: str, alpha: float) -> str:
    name = row["pair_set"]
    lead = f"the leading candidate is {name}: {gain_text(row, metric)}"
    gain = row["gain_mean"]
    race = "or let `conaclip ablate --race` spend seeds where they decide something"
    if pd.isna(gain):
        return (
            f"no significant winner: {lead}. No seed of it matches a finished baseline seed "
            "(params.seed), so the gain cannot be paired or tested; rerun both with the same "
            "`--seeds`."
        )
    if gain <= 0:
        largest = f"{gain:+.2f} {metric}, by {name}"
        return f"no pair set gains over the baseline (the largest paired gain is {largest})"
    n = int(row["gain_n"])
    if n < 2:
        k = _suggest_seeds(table, row, alpha)
        if k is None and _baseline_spread(table) > 0:
            return (
                f"no significant winner: {lead}. With one seed the gain cannot be told apart "
                f"from training noise, and at the baseline's spread over seeds a gain this "
                f"size would need more than {MAX_SUGGESTED_SEEDS} seeds: treat it as no gain, "
                f"{race}."
            )
        return (
            f"no significant winner: {lead}. With one seed the gain cannot be told apart "
            f"from training noise; rerun with `--seeds {max(k or 3, 3)}` ({race})."
        )
    if not (row["p_seed_adj"] < alpha):
        k = _suggest_seeds(table, row, alpha)
        if k is None:
            return (
                f"no significant winner: {lead}; {p_text(row)}. The gain is small for "
                f"its spread over seeds: more than {MAX_SUGGESTED_SEEDS} seeds would be "
                f"needed, so treat it as no gain, {race}."
            )
        k = max(k, n + 1)
        return (
            f"no significant winner: {lead}; {p_text(row)}, not below {alpha} over "
            f"seeds. If the gain is real, about `--seeds {k}` would settle it ({race})."
        )
    if pd.isna(row["p_boot_adj"]):
        note = table.attrs.get("boot_note") or "its runs have no eval ranks"
        return (
            f"no significant winner: {lead}; {p_text(row)}. It survives training noise, "
            f"but eval-query noise is untested ({note}); rerun the trials so that they "
            "log eval_ranks.npz."
        )
    return (
        f"no significant winner: {lead}; {p_text(row)}. It survives training noise but "
        f"not eval-query noise: the eval set is too small to resolve a gain this size "
        "(more seeds will not narrow that interval); evaluate on more images."
    )


def _baseline_row(table: pd.DataFrame) -> pd.Series:
    rows = table[table["is_baseline"] & (table["seeds"] > 0)]
    if rows.empty:
        raise InputError("the table has no finished baseline run (tag conaclip.baseline=true)")
    return rows.iloc[0]


def combined_recipe(
    table: pd.DataFrame, metric: str | None = None, name: str = RECIPE_NAME
) -> PairSet:
    """The baseline's pairs plus every single-addition pair whose verdict is "better"; the
    baseline alone when none is. Where the same pair was tried with several weights or
    temperatures and more than one is better, the one with the largest mean paired gain is
    used."""
    _metric(table, metric)
    base = _baseline_row(table)
    singles = table[(table["n_added"] == 1) & (table["seeds"] > 0)]
    winners = singles[singles["verdict"] == "better"]
    chosen: dict[str, Any] = {}
    for _, row in winners.sort_values("gain_mean", ascending=False, kind="stable").iterrows():
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


def paired_gain(row: pd.Series, reference: pd.Series, metric: str) -> tuple[int, float, float]:
    """``(n, mean, ci_low)`` of ``row``'s per-seed ``metric`` minus ``reference``'s over the
    seeds both finished (``<metric>_by_seed``); ci_low is the 95% t lower bound, NaN when
    n < 2; mean NaN when n = 0."""
    ours, theirs = row[f"{metric}_by_seed"], reference[f"{metric}_by_seed"]
    gains = [ours[s] - theirs[s] for s in ours if s in theirs]
    mean, _, low, _ = stats.t_interval(gains)
    return len(gains), mean, low


def greedy_next(table: pd.DataFrame, current: PairSet, metric: str | None = None) -> PairSet | None:
    """Next round's current set: among ``greedy_candidates(current)`` measured in the table,
    the one with the highest mean ``metric``, if its gain over ``current`` counts; None when it
    does not or none is left. InputError when ``current`` or all candidates are missing from
    the table (they have to be run first).

    The gain is paired by seed against the *current* set (not the baseline): with >= 2 shared
    seeds it counts when the 95% t lower bound of the mean gain is > 0; with one shared seed
    (no spread to test against) when the gain is > 0; with none it does not count. No
    multiplicity correction: greedy takes one step at a time, and its rounds are exploratory;
    the final set is judged by the table's verdicts like any other."""
    metric = _metric(table, metric)
    candidates = {c.key(): c for c in greedy_candidates(current)}
    if not candidates:
        return None
    done = table[table["seeds"] > 0]
    reference_rows = done[done["pairs"] == current.key()]
    if reference_rows.empty:
        raise InputError(f"greedy: the current set {current.key()} has no finished run")
    reference = reference_rows.iloc[0]
    measured = done[done["pairs"].isin(list(candidates))]
    if measured.empty:
        raise InputError(f"greedy: no candidate of {current.name} has a finished run yet")
    top = measured.loc[measured[f"{metric}_mean"].idxmax()]
    n, mean, low = paired_gain(top, reference, metric)
    gains = (low > 0) if n >= 2 else (n == 1 and mean > 0)
    if not gains:
        return None
    return PairSet(str(top["pair_set"]), candidates[top["pairs"]].pairs)


def common_settings(runs: pd.DataFrame, pairs: list[PairConfig] | None = None) -> dict[str, Any]:
    """The run settings that every run of ``runs_frame`` output shares, read back through
    ``DistillConfig`` (so typed: ints as int) as a recipe of ``pairs`` (default: the config's
    default pairs) carries them (``run_params.recipe_settings``); a param with several
    values, or none, is left out."""
    shared = {
        name: values.pop()
        for name, values in run_params.setting_values(runs).items()
        if len(values) == 1
    }
    return run_params.recipe_settings(shared, pairs)
