"""Seed racing (F-Race style): spend seeds only on the cells whose verdict is still open.

Round 1 runs every cell (pair set) and the baseline with seeds ``0..K0-1``. After each round the
strategy-selection table (``orchestrator.table.selection_table``: per-cell 95% t intervals over
seeds, paired gains vs the same-seed baseline, adjusted p-values and a ``verdict``) decides,
per active cell (``decide``):

- drop it when its verdict is ``worse`` (significantly below the baseline);
- drop it when its ``<metric>_ci_high`` is below the leader's ``<metric>_ci_low`` (it cannot be
  the best; the leader is the active cell, baseline included, with the highest mean);
- drop it when F-Race's test (Birattari et al., 2002) says it cannot be the best (Friedman's
  test with seeds as blocks, then Conover's comparison of its rank sum with the top one) and
  its mean paired gain is not above the baseline's (a cell ahead of the baseline may still be
  significantly better: the verdict's set of better cells is the combined recipe);
- keep it otherwise.

The next round adds one seed to every kept cell and to the baseline (gains are paired with the
same-seed baseline, so the baseline runs every seed any cell runs). The race stops when it is
settled or when the cells reach ``--max-seeds`` (M).

MLflow is the ledger: a round launches only the (pair set, seed) trials that have no FINISHED run
in the experiment yet, and each round's decision is taken on the runs the race itself asked
for up to that round (``visible_runs``). Re-running a race, or ``--resume`` after an interruption,
therefore replays the finished rounds from MLflow without a trial and continues where it
stopped; ``benchmarks/race_replay.py`` runs the same loop offline over a full grid.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import stats
from trainers.errors import InputError

FINISHED = "FINISHED"
BASELINE, BETTER, WORSE, OPEN = "baseline", "better", "worse", "open"

Trial = tuple[str, int]  # (pair set name, seed)
# Launches a round's trials; returns what happened to each (orchestrator.ablation.TrialOutcome).
Launcher = Callable[[int, list[Trial]], list[Any]]


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

    ``winner``: the leader when it is a non-baseline cell with verdict ``better`` whose
    ``ci_low`` is above the ``ci_high`` of every other contender (contenders: the cells the
    verdict is taken over, minus the baseline and the cells with verdict ``worse``, which are
    below a baseline the leader beats); None otherwise. ``better`` / ``worse``: every
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


@dataclass
class RaceRound:
    """One round: its number, the seeds per cell it brings the race to, the trials it asked
    for (every (cell, seed) needed so far), the ones it had to launch, and its decision."""

    number: int
    seeds: int
    planned: list[Trial]
    launched: list[Trial]
    step: RaceStep


@dataclass
class RaceResult:
    """The whole race: its rounds, the verdict, the outcomes of the trials it launched (empty
    when MLflow already held them all) and the trial-steps spent vs the full grid."""

    baseline: str
    cells: tuple[str, ...]
    metric: str
    max_seeds: int
    steps: int
    rounds: list[RaceRound] = field(default_factory=list)
    verdict: RaceVerdict | None = None
    trials: list[Any] = field(default_factory=list)

    @property
    def asked(self) -> set[Trial]:
        """Every (cell, seed) the race needed, whether launched now or found in MLflow."""
        return {trial for r in self.rounds for trial in r.planned}

    @property
    def spent_steps(self) -> int:
        return len(self.asked) * self.steps

    @property
    def full_steps(self) -> int:
        """Trial-steps of the full grid: every cell and the baseline at ``max_seeds`` seeds."""
        return (len(self.cells) + 1) * self.max_seeds * self.steps

    def as_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "cells": list(self.cells),
            "metric": self.metric,
            "max_seeds": self.max_seeds,
            "steps": self.steps,
            "rounds": [_round_dict(r) for r in self.rounds],
            "verdict": self.verdict.as_dict() if self.verdict else None,
            "trials": len(self.asked),
            "spent_steps": self.spent_steps,
            "full_steps": self.full_steps,
        }


def _round_dict(r: RaceRound) -> dict[str, Any]:
    return {
        "round": r.number,
        "seeds": r.seeds,
        "trials": len(r.planned),
        "launched": len(r.launched),
        "kept": list(r.step.kept),
        "dropped": r.step.dropped,
        "leader": r.step.leader,
        "stop": r.step.stop,
        "reason": r.step.reason,
        "ranking": r.step.ranking,
    }


# ------------------------------------------------------------------------------ decisions
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


def decide(
    table: pd.DataFrame,
    active: Sequence[str],
    seeds: int,
    max_seeds: int,
    metric: str = "rsum",
    alpha: float = 0.05,
) -> RaceStep:
    """The next round's plan from ``table`` (``selection_table`` output over the runs the race
    has so far), the non-baseline cells still racing (``active``) and the seeds each has.

    Per active cell, in this order:

    - dropped when its ``verdict`` is ``worse`` (significantly below the baseline);
    - dropped when its ``<metric>_ci_high`` is below the leader's ``<metric>_ci_low`` (NaN
      compares false: with one seed nothing is dropped on intervals);
    - dropped when F-Race's test says it cannot be the best and it is not ahead of the
      baseline (``gain_mean <= 0``; a cell ahead may still become significantly better and
      join the recipe, so it races on): Friedman's test over the seeds (blocks) of the
      baseline and the active cells not worse (at least 3 of them, 2 seeds in common) is
      significant at ``alpha`` and the cell's rank sum is below the top rank sum by more than
      Conover's critical difference (``stats.friedman_conover``). Seeds are blocks
      because a seed fixes the initialisation and data order every cell shares (a strong
      common effect: comparisons within a seed are paired), and the rank variance is pooled
      over every racing cell, so at 2 seeds the comparison has ``k - 1`` degrees of freedom
      where a paired t-test of two cells has 1. The interval rule catches what ranks cannot
      with few cells (with 4 cells and 2 seeds Friedman's p is never below 0.11);
    - kept otherwise, also when it has no finished run or no interval yet.

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
        if cell != leader and high < leader_low:
            dropped[cell] = (
                f"{metric} CI high {high:.2f} is below the CI low {leader_low:.2f} of "
                f"the leader {leader}"
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
                # A cell ahead of the baseline may still turn out significantly better, i.e.
                # join the recipe: it races on although it cannot be the best.
                gain = _num(rows.get(name), "gain_mean")
                if math.isnan(gain) or gain > 0:
                    continue
                dropped[name] = f"rank sum {rank_sum:g} < {bar:.2f}, F-Race; gain {gain:+.2f}"
        else:
            ranking += ": not significant, nothing dropped on ranks"
    kept = [c for c in survivors if c not in dropped]
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
        if all(low > _num(rows.get(c), f"{metric}_ci_high") for c in rivals):
            winner = leader
    return RaceVerdict(winner, leader, better, worse)


# ------------------------------------------------------------------------------ the ledger
def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name] if name in runs else pd.Series(pd.NA, index=runs.index, dtype="object")


def _seeds(runs: pd.DataFrame) -> pd.Series:
    return pd.to_numeric(_column(runs, "params.seed"), errors="coerce")


def finished_trials(runs: pd.DataFrame) -> set[Trial]:
    """(pair set, seed) of every run whose ``tags.conaclip.status`` (MLflow's own status when
    the tag is missing, as ``table`` reads it) is FINISHED."""
    if runs.empty:
        return set()
    from orchestrator.table import run_status

    status = run_status(runs)
    seeds = _seeds(runs)
    done = runs[(status == FINISHED) & seeds.notna() & _column(runs, "params.pair_set").notna()]
    pairs = zip(done["params.pair_set"], seeds[done.index], strict=True)
    return {(str(name), int(seed)) for name, seed in pairs}


def visible_runs(runs: pd.DataFrame, limits: dict[str, int]) -> pd.DataFrame:
    """The runs of ``runs`` the race has asked for: pair set in ``limits`` and seed below its
    limit (the seeds that cell had when it was last run). Other runs of the experiment (later
    rounds of an interrupted race, a ``best --verify`` recipe) are left out, so a decision is
    taken on the same runs whether the race runs live, resumes or is replayed."""
    if runs.empty or "params.pair_set" not in runs:
        return runs.iloc[0:0]
    names = runs["params.pair_set"].astype("string")
    seeds = _seeds(runs)
    limit = names.map(lambda n: limits.get(str(n), 0) if pd.notna(n) else 0).astype(float)
    return runs[seeds.notna() & (seeds < limit)]


def round_plan(baseline: str, cells: Sequence[str], seeds: int) -> list[Trial]:
    """Every (cell, seed) a round needs: the baseline and ``cells`` at seeds ``0..seeds-1``,
    seed by seed (Tune's grid order)."""
    return [(name, seed) for seed in range(seeds) for name in (baseline, *cells)]


def check_ledger(runs: pd.DataFrame, expected: dict[str, str], steps: int) -> None:
    """InputError when a FINISHED run of one of the race's cells was made with other pairs
    (``expected``: pair-set name -> ``PairSet.key()``) or another number of steps: the ledger
    would then count a different trial as done."""
    if runs.empty or "params.pair_set" not in runs:
        return
    done = finished_trials(runs)
    for row, seed in zip(runs.to_dict("records"), _seeds(runs), strict=True):
        name = row.get("params.pair_set")
        if name not in expected or pd.isna(seed) or (name, int(seed)) not in done:
            continue
        pairs, run_steps = row.get("params.pairs"), row.get("params.steps")
        if pairs != expected[name] or str(run_steps) != str(steps):
            raise InputError(
                f"experiment {runs.attrs.get('experiment', '?')}: run {row['run_id']} "
                f"({name} seed {int(seed)}) has pairs {pairs} and {run_steps} steps, this race "
                f"{expected[name]} and {steps}; race under another --name"
            )


def race_table(
    runs: pd.DataFrame, metric: str, ranks: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """``selection_table`` of ``runs``; ``ranks`` (``{run_id: eval ranks}``) feeds its bootstrap
    over eval queries (None: bootstrap columns NaN, so no verdict leaves ``open``)."""
    from orchestrator import table

    return table.selection_table(runs, metric, ranks=ranks)


class RanksCache:
    """``table.load_ranks`` for the runs of a frame, each run's artifact read once: a finished
    run's ranks never change, and a race reads the same runs again every round."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._seen: set[str] = set()
        self._ranks: dict[str, Any] = {}

    def __call__(self, runs: pd.DataFrame) -> dict[str, Any]:
        from orchestrator import table

        if runs.empty:
            return {}
        new = runs[~runs["run_id"].astype(str).isin(self._seen)]
        self._ranks.update(table.load_ranks(self.tracking_uri, new))
        # Only finished runs are read; one still running is read again once it has finished.
        status = table.run_status(new)
        self._seen.update(new.loc[status == FINISHED, "run_id"].astype(str))
        ids = runs["run_id"].astype(str)
        return {run_id: self._ranks[run_id] for run_id in ids if run_id in self._ranks}


# ------------------------------------------------------------------------------ the loop
def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def round_line(r: RaceRound, cells_total: int) -> str:
    """``race round k: n trials (l launched), seeds 0..s-1; active (a/N): ...; dropped: ...``"""
    launched = f"{len(r.launched)} launched" if r.launched else "all already in MLflow"
    kept = ", ".join(r.step.kept) or "-"
    dropped = "; ".join(f"{c} ({why})" for c, why in r.step.dropped.items()) or "-"
    return (
        f"race round {r.number}: {len(r.planned)} trials ({launched}), seeds 0..{r.seeds - 1} "
        f"per cell; active ({len(r.step.kept)}/{cells_total}): {kept}; dropped: {dropped}; "
        f"leader {r.step.leader}; {r.step.reason}"
        + (f"; F-Race: {r.step.ranking}" if r.step.ranking else "")
    )


def race_loop(
    baseline: str,
    cells: Sequence[str],
    start_seeds: int,
    max_seeds: int,
    read_runs: Callable[[], pd.DataFrame],
    launch: Launcher | None,
    metric: str = "rsum",
    steps: int = 0,
    ranks: Callable[[pd.DataFrame], Mapping[str, Any]] | None = None,
    say: Callable[[str], None] = _say,
) -> RaceResult:
    """Race ``cells`` against ``baseline`` from ``start_seeds`` to at most ``max_seeds`` seeds.

    Each round: plan (``round_plan``), launch what ``read_runs()`` lacks a FINISHED run for and
    this call has not tried yet (a trial that failed here is not retried until the next
    invocation), decide (``decide``) on ``visible_runs``, say one line (``round_line``).
    ``launch`` None replays: every planned trial must already be in ``read_runs()``
    (InputError naming the first one missing). ``steps`` (per trial) only feeds the accounting.
    """
    if start_seeds < 1 or max_seeds < start_seeds:
        raise InputError(f"race: need 1 <= --seeds ({start_seeds}) <= --max-seeds ({max_seeds})")
    active = [c for c in cells if c != baseline]
    result = RaceResult(baseline, tuple(active), metric, max_seeds, steps)
    limits: dict[str, int] = {}
    tried: set[Trial] = set()
    seeds = start_seeds
    for number in range(1, max_seeds - start_seeds + 2):
        plan = round_plan(baseline, active, seeds)
        limits.update({name: seeds for name in (baseline, *active)})
        runs = read_runs()
        missing = [t for t in plan if t not in finished_trials(runs) and t not in tried]
        if missing and launch is None:
            name, seed = missing[0]
            raise InputError(f"replay: no FINISHED run of {name} seed {seed}: not a full grid")
        if missing:
            outcomes = launch(number, missing)
            result.trials += outcomes
            tried.update(missing)
            runs = read_runs()
        visible = visible_runs(runs, limits)
        table = race_table(visible, metric, ranks(visible) if ranks else None)
        step = decide(table, active, seeds, max_seeds, metric)
        result.rounds.append(RaceRound(number, seeds, plan, missing, step))
        say(round_line(result.rounds[-1], len(result.cells)))
        active = list(step.kept)
        if step.stop:
            break
        seeds = step.next_seeds
    result.verdict = verdict_of(table, active, metric)
    return result


def verdict_lines(result: RaceResult) -> list[str]:
    """The race's closing lines: verdict, then trial-steps spent vs the full grid."""
    verdict = result.verdict or RaceVerdict(None, None, (), ())
    last = result.rounds[-1]
    if verdict.winner is not None:
        winner = verdict.winner
    elif verdict.leader == result.baseline:
        winner = "none (the baseline leads: no addition beats it)"
    elif verdict.leader in verdict.better:
        winner = f"none (the leader {verdict.leader} is not told apart from every rival)"
    else:
        winner = f"none (the leader {verdict.leader} is not yet better than the baseline)"
    share = result.spent_steps / result.full_steps if result.full_steps else math.nan
    return [
        f"race verdict ({result.metric}, {len(result.rounds)} round(s), up to {last.seeds} "
        f"seeds): winner {winner}; better: {', '.join(verdict.better) or '-'}; "
        f"worse: {', '.join(verdict.worse) or '-'}",
        f"race spent {len(result.asked)} trials = {result.spent_steps} trial-steps vs "
        f"{result.full_steps} for the full grid ({len(result.cells) + 1} pair sets x "
        f"{result.max_seeds} seeds): {share:.0%}",
    ]


def run_race(spec: Any, say: Callable[[str], None] = _say) -> RaceResult:
    """Race ``spec`` (an ``AblationSpec`` with ``race`` settings and a baseline) for real.

    Round k is its own Tune run ``<name>-round<k>`` (tag ``conaclip.round=k``) with an explicit
    trial list, logging into the one MLflow experiment ``<name>``. A round whose Tune state
    survives an interruption is restored first (trials resume from their checkpoints and keep
    their MLflow run); what is still missing then runs as ``<name>-round<k>-retry<j>``.
    """
    from orchestrator import tracking
    from orchestrator.ablation import run_ablation, save_spec

    if spec.race is None or spec.baseline is None:
        raise InputError("--race needs race settings and a baseline pair set")
    settings = spec.race
    cells = [name for name in spec.pair_sets if name != spec.baseline]
    save_spec(spec)

    def read_runs() -> pd.DataFrame:
        return tracking.runs_frame(spec.tracking_uri, spec.experiment_name)

    check_ledger(read_runs(), spec.pair_keys(), spec.run.steps)

    def launch(number: int, trials: list[Trial]) -> list[Any]:
        return _launch_round(spec, number, trials, run_ablation, read_runs)

    return race_loop(
        spec.baseline, cells, settings.start_seeds, settings.max_seeds, read_runs, launch,
        metric=settings.metric, steps=spec.run.steps, ranks=RanksCache(spec.tracking_uri),
        say=say,
    )  # fmt: skip


def _launch_round(
    spec: Any,
    number: int,
    trials: list[Trial],
    run_ablation: Callable[..., Any],
    read_runs: Callable[[], pd.DataFrame],
) -> list[Any]:
    from ray import tune

    from orchestrator.ablation import load_spec

    base = f"{spec.name}-round{number}"
    outcomes: list[Any] = []
    if tune.Tuner.can_restore(str(spec.tune_dir / base)):
        restored = run_ablation(load_spec(spec.out_dir, base), resume=True)
        # MLflow, not Tune's state, says what is done: a restored Tune run keeps its errored
        # trials errored, and a trial Tune counts as ended may have no FINISHED run.
        done = finished_trials(read_runs())
        wanted = set(trials)
        outcomes += [t for t in restored.trials if (t.pair_set, t.seed) in wanted & done]
        trials = [t for t in trials if t not in done]
    if not trials:
        return outcomes
    name, attempt = base, 1
    while (spec.tune_dir / name).exists():
        name, attempt = f"{base}-retry{attempt}", attempt + 1
    cells = {cell for cell, _ in trials}
    round_spec = spec.model_copy(
        update={
            "name": name,
            "experiment": spec.experiment_name,
            "pair_sets": {k: v for k, v in spec.pair_sets.items() if k in cells},
            "seeds": sorted({seed for _, seed in trials}),
            "trials": trials,
            "round": number,
        }
    )
    return outcomes + run_ablation(round_spec).trials
