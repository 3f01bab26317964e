"""The choice: best pair set, combined recipe, greedy forward selection, all from the table.

A pair set is in the recipe when its ``verdict`` in the table (see
``orchestrator.table.selection_table``) is "better": its paired gain over the baseline passes
the one test that carries training noise (seeds) and eval-set noise (which images), in the
table's error-controlled family. A *winner* is more: the better cell with the largest gain,
ahead of every other better cell by the same test on their paired difference (seed by seed,
with the bootstrap's shared resamples), Holm over those comparisons. Where it is not, ``best``
names the cells it cannot separate. Without a better cell there is no winner, only a
*leading candidate* (the largest paired gain) and a reason in plain words, with what would
settle it. Only rows with at least one finished run are considered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import yaml

from orchestrator import run_params, stats
from orchestrator.gain_test import GainTest, paired_gain_test
from orchestrator.verdicts import BETTER, EQUIVALENT, OPEN, WORSE, seeds_to_decide
from search_spaces.presets import PairSet, greedy_candidates
from trainers.errors import InputError
from trainers.run_config import PairConfig, pair_text

RECIPE_NAME = "combined_recipe"
# --seeds suggestions stop here: a gain that needs more is better settled by racing.
MAX_SUGGESTED_SEEDS = 30


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
    """The verdict of a table: ``winner`` (the better row ahead of every other better row, or
    None), ``leading`` (the non-baseline row with the largest paired gain among the better
    rows, else among all; None when the table has no candidate), ``reason``: plain sentences
    saying why, and what would settle it; ``rivals``: the better rows the leader is not told
    apart from (empty with a winner)."""

    winner: pd.Series | None
    leading: pd.Series | None
    reason: str
    rivals: tuple[str, ...] = ()


def row_difference(a: Mapping[str, Any], b: Mapping[str, Any], metric: str) -> GainTest:
    """The test of row ``a`` minus row ``b`` over the seeds both finished: per-seed values
    (``<metric>_by_seed``) and the shared bootstrap resamples (``<metric>_boot_by_seed``;
    none when a seed of either lacks them), as the table tests a cell against the baseline."""
    ours, theirs = a[f"{metric}_by_seed"], b[f"{metric}_by_seed"]
    seeds = [s for s in ours if s in theirs]
    gains = [ours[s] - theirs[s] for s in seeds]
    boot_a = a.get(f"{metric}_boot_by_seed") or {}
    boot_b = b.get(f"{metric}_boot_by_seed") or {}
    boot = None
    if seeds and all(s in boot_a and s in boot_b for s in seeds):
        boot = np.vstack([np.asarray(boot_a[s]) - np.asarray(boot_b[s]) for s in seeds])
    return paired_gain_test(gains, boot)


def separated(
    leader: Mapping[str, Any], rivals: list[Mapping[str, Any]], metric: str, alpha: float
) -> dict[str, float]:
    """Holm-adjusted p of "leader - rival = 0" for each rival (by pair-set name); the leader
    is ahead of a rival when that p is below ``alpha`` and the difference is positive. NaN
    for a rival that shares fewer than two seeds with the leader or lacks eval ranks."""
    tests = {str(r["pair_set"]): row_difference(leader, r, metric) for r in rivals}
    names = list(tests)
    raw = [t.p_diff if t.training_known else np.nan for t in tests.values()]
    adjusted = stats.adjust_pvalues(raw, "holm") if names else []
    return {
        name: (float(p) if tests[name].mean > 0 or np.isnan(p) else 1.0)
        for name, p in zip(names, adjusted, strict=True)
    }


def choose(table: pd.DataFrame, metric: str | None = None) -> Choice:
    """Winner, leading candidate and reason for ``table`` (``selection_table`` output).
    InputError when no row has a finished run, or ``metric`` is not the table's metric."""
    metric = _metric(table, metric)
    done = _finished(table)
    alpha = float(table.attrs.get("alpha", 0.05))
    candidates = done[~done["is_baseline"]]
    better = candidates[candidates["verdict"] == BETTER]
    if not better.empty:
        leader = better.loc[better["gain_mean"].idxmax()]
        others = [r for _, r in better.iterrows() if r["pair_set"] != leader["pair_set"]]
        p = separated(leader, others, metric, alpha)
        behind = [name for name, value in p.items() if not value < alpha]
        if not behind:
            return Choice(leader, leader, _winner_reason(leader, metric, alpha, len(others)))
        return Choice(None, leader, _tie_reason(leader, behind, p, metric, alpha), tuple(behind))
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
    """The winner of ``choose``: the better row ahead of every other better row, None when
    there is none (``choose`` says why). Ties go to the row earlier in the table."""
    return choose(table, metric).winner


def gain_text(row: pd.Series | Mapping[str, Any], metric: str) -> str:
    """``+8.00 rsum [95% CI +4.10, +11.90 over seeds and eval set; 3 seeds]``: the row's paired
    gain over the baseline with the interval of its one test (seed spread + eval set), or
    what is missing for it."""
    if pd.isna(row["gain_mean"]):
        return (
            f"{row[f'delta_{metric}']:+.2f} {metric} (unpaired: no seed shared with the baseline)"
        )
    n = int(row["gain_n"])
    if n < 2:
        part = "n=1 seed: no interval over seeds"
        if pd.notna(row["boot_gain_low"]):
            part += f"; {row['boot_gain_low']:+.2f}, {row['boot_gain_high']:+.2f} over eval queries"
    elif pd.notna(row["gain_low"]):
        part = f"{row['gain_low']:+.2f}, {row['gain_high']:+.2f} over seeds and eval set; {n} seeds"
    else:
        part = f"{row['gain_ci_low']:+.2f}, {row['gain_ci_high']:+.2f} over {n} seeds only"
    return f"{row['gain_mean']:+.2f} {metric} [95% CI {part}]"


def p_text(row: pd.Series | Mapping[str, Any]) -> str:
    """``adjusted p 0.012 (differs), 0.8 (within the margin)`` ("n/a" for NaN)."""

    def one(value: Any) -> str:
        return "n/a" if pd.isna(value) else f"{value:.3g}"

    return (
        f"adjusted p {one(row['p_diff_adj'])} (differs), {one(row['p_equiv_adj'])} (within "
        "the margin)"
    )


def _winner_reason(row: pd.Series, metric: str, alpha: float, others: int) -> str:
    text = f"{row['pair_set']} gains {gain_text(row, metric)}; {p_text(row)}, below {alpha}"
    if others:
        plural = "each of the other" if others > 1 else "the other"
        text += (
            f"; it is ahead of {plural} {others} better row{'s' if others > 1 else ''} by "
            "the same test on their paired difference (Holm)"
        )
    return text


def _tie_reason(
    row: pd.Series, behind: list[str], p: Mapping[str, float], metric: str, alpha: float
) -> str:
    shown = ", ".join(f"{name} (adjusted p {p[name]:.3g})" if not np.isnan(p[name])
                      else f"{name} (too few shared seeds)" for name in behind)  # fmt: skip
    return (
        f"no single winner: {row['pair_set']} has the largest gain, {gain_text(row, metric)}, "
        f"but is not told apart from {shown} at {alpha} (the same test on their paired "
        "difference, Holm over the other better rows). All are better than the baseline and "
        "in the combined recipe; more seeds of these rows would separate them if they differ."
    )


def _family(table: pd.DataFrame) -> int:
    return max(1, int((~table["is_baseline"]).sum()))


def _baseline_spread(table: pd.DataFrame) -> float:
    """The baseline's std over seeds of the table's metric (NaN with < 2 seeds)."""
    base = table[table["is_baseline"]]
    return float(base[f"{table.attrs.get('metric', 'rsum')}_std"].iloc[0]) if len(base) else np.nan


def _eval_var(row: pd.Series) -> float:
    """The eval-set part of the variance of the row's mean gain (its whole bootstrap
    variance with one seed, an upper bound on the shared part)."""
    if pd.isna(row["gain_se"]):
        return np.nan
    share = row["eval_share"] if pd.notna(row["eval_share"]) else 1.0
    return float(share * row["gain_se"] ** 2)


def _tally(table: pd.DataFrame) -> str:
    rows = table[~table["is_baseline"]]
    counts = [(v, int((rows["verdict"] == v).sum())) for v in (BETTER, WORSE, EQUIVALENT, OPEN)]
    return ", ".join(f"{n} {v}" for v, n in counts if n)


def _settle_text(table: pd.DataFrame, row: pd.Series, alpha: float, spread: float) -> str:
    """What would decide ``row``: seeds from ``verdicts.seeds_to_decide`` at Holm's first
    step over the table's family, or why seeds will not."""
    margin = float(table.attrs.get("margin", 6.0))
    level = alpha / _family(table)
    need = seeds_to_decide(float(row["gain_mean"]), spread, _eval_var(row), level, margin,
                           MAX_SUGGESTED_SEEDS)  # fmt: skip
    race = "or `conaclip ablate --race`"
    if need.seeds is not None:
        what = "it differs" if need.decision == "differs" else f"it is within ±{margin:g}"
        seeds = max(need.seeds, int(row["gain_n"]) + 1)
        return (
            f"If its gain and spread hold, about {seeds} seeds would show that {what} "
            f"(`--seeds {seeds}`, {race} with `--max-seeds {seeds}` or more)."
        )
    if need.eval_bound:
        return (
            "The eval set cannot resolve a gain this size: its own noise keeps the interval "
            f"wider than the distance to 0 and to ±{margin:g} whatever the seeds; evaluate on "
            "more images (eval_fold_size folds keep rsum's scale)."
        )
    return (
        f"Even {MAX_SUGGESTED_SEEDS} seeds would not decide it at this spread: a difference this "
        f"small is best read as no practical gain ({race})."
    )


def open_rows_text(table: pd.DataFrame) -> list[str]:
    """One line per open non-baseline row with a gain: what would decide it (seeds at its
    spread, or more eval images), so a user sees what an undecided table still needs."""
    alpha = float(table.attrs.get("alpha", 0.05))
    lines = []
    rows = table[(~table["is_baseline"]) & (table["verdict"] == OPEN) & table["gain_mean"].notna()]
    for _, row in rows.iterrows():
        n = int(row["gain_n"])
        spread = row["gain_std"] if n >= 2 else _baseline_spread(table) * np.sqrt(2)
        if pd.isna(row["gain_se"]) or pd.isna(spread):
            lines.append(f"open: {row['pair_set']}: {row.get('verdict_note') or 'no test'}")
            continue
        lines.append(
            f"open: {row['pair_set']} ({n} seed{'s' if n != 1 else ''}, gain "
            f"{row['gain_mean']:+.2f}): {_settle_text(table, row, alpha, float(spread))}"
        )
    return lines


def _open_reason(table: pd.DataFrame, row: pd.Series, metric: str, alpha: float) -> str:
    name = row["pair_set"]
    lead = f"the leading candidate is {name}: {gain_text(row, metric)}"
    gain = row["gain_mean"]
    tally = _tally(table)
    if pd.isna(gain):
        return (
            f"no significant winner: {lead}. No seed of it matches a finished baseline seed "
            "(params.seed), so the gain cannot be paired or tested; rerun both with the same "
            "`--seeds`."
        )
    if gain <= 0:
        largest = f"{gain:+.2f} {metric}, by {name}"
        return (
            f"no pair set gains over the baseline (the largest paired gain is {largest}; {tally})"
        )
    if row["verdict"] == EQUIVALENT:
        return (
            f"no significant winner: {lead}; {p_text(row)}: it is within "
            f"±{table.attrs.get('margin', 6.0):g} {metric} of the baseline, no practical "
            f"difference ({tally})."
        )
    n = int(row["gain_n"])
    if n < 2:
        return (
            f"no significant winner: {lead}. With one seed the gain cannot be told apart "
            "from training noise. "
            + _settle_text(table, row, alpha, _baseline_spread(table) * np.sqrt(2))
        )
    if pd.isna(row["gain_se"]) or pd.isna(row["p_diff_adj"]):
        note = table.attrs.get("boot_note") or row.get("verdict_note") or "no test"
        return (
            f"no significant winner: {lead}; the eval-set part of its test is missing "
            f"({note}): rerun the trials so that they log eval_ranks.npz."
        )
    return (
        f"no significant winner: {lead}; {p_text(row)}, neither below {alpha} ({tally}). "
        + _settle_text(table, row, alpha, float(row["gain_std"]))
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


def greedy_next(table: pd.DataFrame, current: PairSet, metric: str | None = None) -> PairSet | None:
    """Next round's current set: among ``greedy_candidates(current)`` measured in the table,
    the one with the highest mean ``metric``, if its gain over ``current`` counts; None when it
    does not or none is left. InputError when ``current`` or all candidates are missing from
    the table (they have to be run first).

    The gain is paired by seed against the *current* set (not the baseline) and judged by the
    table's own test (``row_difference``: seed spread plus the eval set's shared noise): it
    counts when the difference is positive and its p is below the table's alpha, with at least
    two shared seeds and eval ranks. One test per step, no correction over steps: greedy takes
    one step at a time, and the final set is judged by the table's verdicts like any other."""
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
    test = row_difference(top, reference, metric)
    alpha = float(table.attrs.get("alpha", 0.05))
    if not (test.training_known and test.mean > 0 and test.p_diff < alpha):
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
