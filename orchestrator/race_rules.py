"""Seed racing's decision rules: after a round, which cells race on, which leave, and the verdict.

These are pure functions of one strategy-selection table (``orchestrator.table.selection_table``:
per-cell 95% t intervals over seeds, paired gains vs the same-seed baseline, adjusted p-values
and a ``verdict``); they read no MLflow and launch nothing, so a live race, a resumed one and
``benchmarks/race_replay.py`` take the same decision on the same table. Per active cell
(``decide``):

- drop it when its verdict is ``worse`` (significantly below the baseline: settled);
- drop it as futile when its mean paired gain, with the spread its seeds show, would not be
  significant even at ``--max-seeds`` seeds (a planning projection: the observed mean and
  spread taken as true): it can become neither better nor worse, so it is settled too. Rule
  ``uncorrected``, the one ``conaclip ablate --race`` uses, tests the projection alone,
  uncorrected, which is Holm's most lenient step. Rule ``family`` (``futile_in_family``)
  projects every racing cell to ``--max-seeds`` and applies the table's own correction; it is
  kept for ``benchmarks/race_replay.py --futility family``, which measured it losing the
  winner of an 8-seed race after 2 seeds (the README's race table), so no race runs it;
- drop a cell whose verdict is already ``better`` (it is in the recipe) when it cannot be the
  best: its ``<metric>_ci_high`` is below the leader's ``<metric>_ci_low`` (the leader is the
  active cell, baseline included, with the highest mean), the leader beats it seed for seed
  (``behind_leader``: a paired t-test on the per-seed differences, Holm over the better
  cells), or F-Race's test (Birattari et al., 2002) rules it out (Friedman's test with seeds
  as blocks, then Conover's comparison of its rank sum with the top one);
- keep it otherwise: an open cell races on even when it cannot be the best, because it may
  still turn better or worse, and the verdict reports both (dropping such cells early lost
  three "worse" verdicts of a 5-seed grid in the README's replay).

``verdict_of`` turns the last table into a ``RaceVerdict`` (winner, leader, better, worse). The
ledger and the loop that run the rounds are ``orchestrator.race``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import stats

BASELINE, BETTER, WORSE, OPEN = "baseline", "better", "worse", "open"
FUTILITY_RULES = ("uncorrected", "family")


@dataclass(frozen=True)
class RaceStep:
    """The decision taken after one round.

    ``kept``: the non-baseline cells that race on, in the order they were given; ``dropped``:
    cell -> why it left the race this round; ``leader``: the cell (possibly the baseline) with
    the highest mean, None when nothing finished; ``stop`` and ``reason`` (why it stops, or why
    it goes on); ``next_seeds``: seeds per cell after the next round (== ``seeds`` on stop);
    ``ranking``: the F-Race test of this round in one line (None when it could not run).
    """

    seeds: int
    kept: tuple[str, ...]
    dropped: dict[str, str]
    leader: str | None
    stop: bool
    reason: str
    next_seeds: int
    ranking: str | None = None


@dataclass(frozen=True)
class RaceVerdict:
    """What a race (or a full grid) concludes.

    ``winner``: the leader when it is a non-baseline cell with verdict ``better`` that is
    told apart from every other contender, by intervals (its ``ci_low`` above the rival's
    ``ci_high``) or seed for seed (``behind_leader``, Holm over the contenders) (contenders: the
    cells the verdict is taken over, minus the baseline and the cells with verdict ``worse``,
    which are below a baseline the leader beats); None otherwise. ``better`` / ``worse``: every
    non-baseline row of the table with that verdict, in table order.
    """

    winner: str | None
    leader: str | None
    better: tuple[str, ...]
    worse: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"winner": self.winner, "leader": self.leader, "better": list(self.better),
                "worse": list(self.worse)}  # fmt: skip

    def same_as(self, other: RaceVerdict) -> dict[str, bool]:
        """Per part (winner; set of better cells; set of worse cells), whether both agree."""
        return {
            "winner": self.winner == other.winner,
            "better": set(self.better) == set(other.better),
            "worse": set(self.worse) == set(other.worse),
        }


def _rows(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    return {str(row["pair_set"]): row for row in table.to_dict("records")}


def _num(row: dict[str, Any] | None, key: str) -> float:
    value = None if row is None else row.get(key)
    return math.nan if value is None or pd.isna(value) else float(value)


def _baseline_name(table: pd.DataFrame) -> str | None:
    rows = table[table["is_baseline"].astype(bool)]
    return None if rows.empty else str(rows["pair_set"].iloc[0])


def leader_of(table: pd.DataFrame, cells: Iterable[str], metric: str = "rsum") -> str | None:
    """The cell among ``cells`` and the table's baseline with the highest ``<metric>_mean``
    (cells without a finished run are not candidates); ties go to the baseline, then to the
    cell given first. None when no candidate has a mean."""
    rows = _rows(table)
    baseline = _baseline_name(table)
    candidates = ([baseline] if baseline is not None else []) + [c for c in cells if c != baseline]
    best, best_mean = None, -math.inf
    for name in candidates:
        mean = _num(rows.get(name), f"{metric}_mean")
        if not math.isnan(mean) and mean > best_mean:
            best, best_mean = name, mean
    return best


def _worse_reason(row: dict[str, Any]) -> str:
    return (
        f"worse than the baseline (gain {_num(row, 'gain_mean'):+.2f}, 95% CI "
        f"{_num(row, 'gain_ci_low'):+.2f}..{_num(row, 'gain_ci_high'):+.2f}, "
        f"adjusted p {_num(row, 'p_seed_adj'):.3g})"
    )


def ranked_seeds(
    table: pd.DataFrame, names: Sequence[str], metric: str = "rsum"
) -> tuple[list[str], list[str], np.ndarray]:
    """(names ranked, their common seeds, values of shape (names, seeds)) from the table's
    ``<metric>_by_seed`` column: the complete blocks Friedman's test needs. Only the names
    with the most finished seeds are ranked (a cell one failed trial short is left out, not
    every cell cut to its seeds), over the seeds they all have."""
    rows = _rows(table)
    by_seed = {n: dict(rows[n].get(f"{metric}_by_seed") or {}) for n in names if n in rows}
    most = max((len(values) for values in by_seed.values()), default=0)
    by_seed = {n: values for n, values in by_seed.items() if values and len(values) == most}
    if not by_seed:
        return [], [], np.empty((0, 0))
    common = set.intersection(*(set(values) for values in by_seed.values()))
    # The table's by-seed dicts are already in seed order.
    seeds = [seed for seed in next(iter(by_seed.values())) if seed in common]
    kept = list(by_seed)
    values = np.array([[float(by_seed[n][s]) for s in seeds] for n in kept]).reshape(
        len(kept), len(seeds)
    )
    return kept, [str(s) for s in seeds], values


def _futile(row: dict[str, Any] | None, max_seeds: int, alpha: float) -> str | None:
    """Why the cell of ``row`` cannot reach a verdict by ``max_seeds`` seeds, or None.

    Futile: even if its mean paired gain and their spread stayed what they are now, the
    paired t-test at ``max_seeds`` seeds would not clear ``alpha`` uncorrected
    (``stats.seeds_needed`` with a family of one). Uncorrected is Holm's most lenient step, so
    a cell below it can become neither better nor worse after the correction either. Needs a
    gain over at least 2 seeds with a finite spread (else None: nothing is known yet)."""
    if row is None:
        return None
    n = row.get("gain_n")
    mean, std = _num(row, "gain_mean"), _num(row, "gain_std")
    if n is None or pd.isna(n) or int(n) < 2 or math.isnan(mean) or math.isnan(std):
        return None
    if stats.seeds_needed(mean, std, alpha, family=1, max_seeds=max_seeds) is not None:
        return None
    return (
        f"futile: gain {mean:+.2f} ± {std:.2f} (sd) would not be significant even at "
        f"{max_seeds} seeds"
    )


def futile_in_family(
    table: pd.DataFrame, racing: Sequence[str], max_seeds: int, alpha: float = 0.05
) -> dict[str, str]:
    """The ``racing`` cells that would stay open at ``max_seeds`` seeds under the table's own
    multiple-comparison correction even if every racing cell's mean paired gain and spread
    held: cell -> why.

    The family is the table's: every non-baseline row with a seed p-value. A racing cell with
    a gain over at least 2 seeds and a finite spread enters with ``stats.projected_p`` at
    ``max(max_seeds, gain_n)`` seeds; a racing cell without one (nothing known yet) with p 0,
    the most lenient assumption for the rest, and is never futile; every other row (a cell
    that left the race keeps its seeds) with its current ``p_seed``. The projected p-values
    are adjusted with ``table.attrs["correction"]`` (Holm unless the table says otherwise); a
    racing cell whose adjusted projection is not below ``alpha`` is futile. The projection
    takes every racing cell at its best case at once (more seeds, the same effect), so a cell
    it leaves behind needs a larger effect than its seeds show, not just more of them. Only
    the seed test is projected; the bootstrap over eval queries, which a verdict also needs,
    is taken to pass."""
    rows = [r for r in table.to_dict("records") if not r["is_baseline"]]
    racing_set = set(racing)
    p_values: list[float] = []
    projected: dict[str, float] = {}  # the racing cells with something known
    for row in rows:
        name = str(row["pair_set"])
        if name not in racing_set:
            p_values.append(_num(row, "p_seed"))
            continue
        n = row.get("gain_n")
        n = 0 if n is None or pd.isna(n) else int(n)
        mean, std = _num(row, "gain_mean"), _num(row, "gain_std")
        p = stats.projected_p(mean, std, max(max_seeds, n)) if n >= 2 else math.nan
        if not math.isnan(p):
            projected[name] = p
        p_values.append(projected.get(name, 0.0))
    correction = table.attrs.get("correction", "holm")
    adjusted = stats.adjust_pvalues(p_values, correction)
    members = int(np.isfinite(p_values).sum())
    futile: dict[str, str] = {}
    for row, adj in zip(rows, adjusted, strict=True):
        name = str(row["pair_set"])
        if name in projected and not adj < alpha:
            futile[name] = (
                f"futile: gain {_num(row, 'gain_mean'):+.2f} ± {_num(row, 'gain_std'):.2f} "
                f"(sd) would reach p {projected[name]:.3g} at {max_seeds} seeds, "
                f"{correction}-adjusted {adj:.3g} over the table's {members} cells"
            )
    return futile


def behind_leader(
    table: pd.DataFrame,
    leader: str | None,
    rivals: Sequence[str],
    metric: str = "rsum",
    alpha: float = 0.05,
) -> dict[str, str]:
    """The ``rivals`` the leader beats seed for seed: rival -> why.

    Per rival, the paired differences ``leader_s - rival_s`` over the seeds both have (a seed
    fixes the initialisation and data order both cells share, so within a seed they are
    paired, as the gains against the baseline are); a two-sided one-sample t-test on them,
    Holm-adjusted over ``rivals`` (the family of comparisons with the leader). A rival is
    behind when its adjusted p is below ``alpha`` and the mean difference is positive. Needs
    at least 2 common seeds (else the rival is not behind)."""
    rows = _rows(table)
    lead = dict(rows[leader].get(f"{metric}_by_seed") or {}) if leader in rows else {}
    diffs: dict[str, np.ndarray] = {}
    for rival in rivals:
        theirs = dict(rows[rival].get(f"{metric}_by_seed") or {}) if rival in rows else {}
        common = [seed for seed in lead if seed in theirs]
        if rival != leader and len(common) >= 2:
            diffs[rival] = np.array([float(lead[s]) - float(theirs[s]) for s in common])
    if not diffs:
        return {}
    names = list(diffs)
    adjusted = stats.adjust_pvalues([stats.t_test_p(diffs[n]) for n in names], "holm")
    behind: dict[str, str] = {}
    for name, p_adj in zip(names, adjusted, strict=True):
        mean, _, low, high = stats.t_interval(diffs[name])
        if p_adj < alpha and mean > 0:
            behind[name] = (
                f"the leader {leader} is ahead by {mean:+.2f} [{low:+.2f}, {high:+.2f}] paired "
                f"over {diffs[name].size} seeds (Holm-adjusted p {p_adj:.3g} over {len(names)})"
            )
    return behind


def decide(
    table: pd.DataFrame,
    active: Sequence[str],
    seeds: int,
    max_seeds: int,
    metric: str = "rsum",
    alpha: float = 0.05,
    futility: str = "uncorrected",
) -> RaceStep:
    """The next round's plan from ``table`` (``selection_table`` output over the runs the race
    has so far), the non-baseline cells still racing (``active``) and the seeds each has.

    Per active cell, in this order:

    - dropped when its ``verdict`` is ``worse`` (significantly below the baseline);
    - dropped when its verdict is ``better`` and its ``<metric>_ci_high`` is below the
      leader's ``<metric>_ci_low`` (NaN compares false: with one seed nothing is dropped on
      intervals);
    - dropped when its verdict is ``better`` and F-Race's test says it cannot be the best:
      Friedman's test over the seeds (blocks) of the baseline and the active cells not worse
      (at least 3 of them, 2 seeds in common) is significant at ``alpha`` and the cell's rank
      sum is below the top rank sum by more than Conover's critical difference
      (``stats.friedman_conover``). Seeds are blocks because a seed fixes the initialisation
      and data order every cell shares (a strong common effect: comparisons within a seed are
      paired), and the rank variance is pooled over every racing cell;
    - dropped when its verdict is ``better`` and the leader beats it seed for seed
      (``behind_leader`` over the better cells: paired t-test, Holm, at ``alpha``);
    - dropped as futile when, before the last round, its mean paired gain and their spread
      over its seeds, if they held, would not make it significant even at ``max_seeds``
      seeds: more seeds of it cannot change the verdict, so none are spent. ``futility``
      "uncorrected" (``_futile``) tests each cell's projection uncorrected; "family"
      (``futile_in_family``) applies the table's correction to every racing cell's projection;
    - kept otherwise, also when it has no finished run or no interval yet, and when it is open
      but cannot be the best (it may still turn better or worse).

    The baseline is ranked with the cells (it may hold the top rank sum) but is never dropped.
    The leader (``leader_of``) is the cell, baseline included, with the highest mean among
    those not dropped as worse.

    Stops (``stop=True``) when settled, i.e. no kept cell is left besides the leader and the
    leader's own verdict is not ``open`` (a leader that has not yet been told apart from the
    baseline is still an open question, which only more seeds of it and the baseline answer;
    the race goes on with just those two), or when ``seeds >= max_seeds``. Otherwise the next
    round brings every kept cell and the baseline to ``seeds + 1`` seeds.
    """
    rows = _rows(table)
    baseline = _baseline_name(table)
    active = [c for c in active if c != baseline]
    dropped: dict[str, str] = {}
    for cell in active:
        row = rows.get(cell)
        if row is not None and row.get("verdict") == WORSE:
            dropped[cell] = _worse_reason(row)
    # The leader is chosen among the cells that survive the test against the baseline.
    survivors = [c for c in active if c not in dropped]
    leader = leader_of(table, survivors, metric)
    leader_low = _num(rows.get(leader), f"{metric}_ci_low")
    for cell in survivors:
        high = _num(rows.get(cell), f"{metric}_ci_high")
        # Only a cell already better than the baseline is settled by not being the best: any
        # other may still turn better or worse, which the verdict reports too.
        if cell != leader and high < leader_low and rows.get(cell, {}).get("verdict") == BETTER:
            dropped[cell] = (
                f"better, and its {metric} CI high {high:.2f} is below the CI low "
                f"{leader_low:.2f} of the leader {leader}"
            )
    contenders = ([baseline] if baseline is not None else []) + survivors
    names, common, values = ranked_seeds(table, contenders, metric)
    ranking = None
    if len(names) >= 3 and len(common) >= 2:
        test = stats.friedman_conover(values, alpha)
        top = int(np.argmax(test.rank_sums))
        ranking = (
            f"Friedman p {test.p:.3g} over {len(names)} cells x seeds {common[0]}..{common[-1]}"
        )
        if test.p < alpha and not math.isnan(test.critical_difference):
            bar = test.rank_sums[top] - test.critical_difference
            ranking += (
                f", top rank sum {test.rank_sums[top]:g} ({names[top]}), Conover's critical "
                f"difference {test.critical_difference:.2f}: below {bar:.2f} cannot be the best"
            )
            for name, rank_sum in zip(names, test.rank_sums, strict=True):
                if name in (baseline, leader) or name in dropped or rank_sum >= bar:
                    continue
                # As above: only a cell whose verdict is settled (better) leaves for not
                # being the best; an open one may still turn better or worse.
                if rows.get(name, {}).get("verdict") != BETTER:
                    continue
                dropped[name] = f"better, and rank sum {rank_sum:g} < {bar:.2f}, F-Race"
        else:
            ranking += ": not significant, nothing dropped on ranks"
    settled = [c for c in survivors if rows.get(c, {}).get("verdict") == BETTER]
    for cell, why in behind_leader(table, leader, settled, metric, alpha).items():
        dropped.setdefault(cell, f"better, and {why}")
    if futility not in FUTILITY_RULES:
        raise ValueError(f"futility {futility!r}: expected one of {', '.join(FUTILITY_RULES)}")
    if seeds < max_seeds:
        racing = [c for c in survivors if c not in dropped]
        if futility == "family":
            futile = futile_in_family(table, racing, max_seeds, alpha)
        else:
            futile = {c: why for c in racing if (why := _futile(rows.get(c), max_seeds, alpha))}
        dropped.update(futile)
    kept = [c for c in survivors if c not in dropped]
    if leader in dropped:  # futile: the lead passes to the best of what races on
        leader = leader_of(table, kept, metric)
    dropped = {c: dropped[c] for c in active if c in dropped}  # in the order given

    others = [c for c in kept if c != leader]
    leader_verdict = None if leader is None else rows[leader].get("verdict")
    if not others and leader_verdict != OPEN:
        reason = (
            "settled: no cell is left but the baseline"
            if not kept
            else f"settled: only the leader {leader} is left, verdict {leader_verdict}"
        )
        return RaceStep(seeds, tuple(kept), dropped, leader, True, reason, seeds, ranking)
    if seeds >= max_seeds:
        reason = f"reached --max-seeds {max_seeds} with {len(kept)} cell(s) still open"
        return RaceStep(seeds, tuple(kept), dropped, leader, True, reason, seeds, ranking)
    if others:
        reason = f"{len(others)} cell(s) not yet told apart from the leader {leader}"
    else:
        reason = f"the leader {leader} is not yet told apart from the baseline"
    return RaceStep(seeds, tuple(kept), dropped, leader, False, reason, seeds + 1, ranking)


def verdict_of(table: pd.DataFrame, cells: Iterable[str], metric: str = "rsum") -> RaceVerdict:
    """The verdict over ``table`` when ``cells`` (non-baseline names) are the contenders: see
    ``RaceVerdict``; the leader is taken among the baseline and the cells not ``worse``. For a
    race, ``cells`` are the cells kept at the end; for a full grid, all of them."""
    rows = _rows(table)
    baseline = _baseline_name(table)
    cells = [c for c in cells if c != baseline]
    # As in decide: a cell significantly below the baseline is no candidate for the lead.
    leader = leader_of(table, [c for c in cells if rows.get(c, {}).get("verdict") != WORSE], metric)
    non_base = [r for r in table.to_dict("records") if not r["is_baseline"]]
    better = tuple(str(r["pair_set"]) for r in non_base if r.get("verdict") == BETTER)
    worse = tuple(str(r["pair_set"]) for r in non_base if r.get("verdict") == WORSE)
    winner = None
    if leader is not None and leader != baseline and rows[leader].get("verdict") == BETTER:
        low = _num(rows[leader], f"{metric}_ci_low")
        rivals = [c for c in cells if c != leader and rows.get(c, {}).get("verdict") != WORSE]
        alpha = float(table.attrs.get("alpha", 0.05))
        behind = behind_leader(table, leader, rivals, metric, alpha)
        if all(c in behind or low > _num(rows.get(c), f"{metric}_ci_high") for c in rivals):
            winner = leader
    return RaceVerdict(winner, leader, better, worse)
