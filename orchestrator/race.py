"""Seed racing (F-Race style): spend seeds only on the cells whose verdict is still open.

Round 1 runs every cell (pair set) and the baseline with seeds ``S..S+K0-1`` (``--first-seed``
S, default 0). After each round the decision rules of ``orchestrator.race_rules`` (``decide``)
keep or drop each active cell on the strategy-selection table of the runs so far, built with
the race's ``Design`` (its planned looks, K0..M seeds): every look is a test, and the table's
sequential p-values spend the error rate over the planned looks, so a verdict taken at round 2
is as sound as one taken at M. This module is the ledger and the loop around them.

The next round adds one seed to every open cell and to the baseline (gains are paired with the
same-seed baseline, so the baseline runs every seed any cell runs). The race stops when every
cell is decided or when the cells reach ``--max-seeds`` (M). The design, margin and seeds are
recorded on the MLflow experiment (``tracking.record_race``), so `conaclip table` of a race
gives the race's own verdicts and a resume cannot quietly change the looks.

MLflow is the ledger: a round launches only the (pair set, seed) trials that have no FINISHED run
in the experiment yet, and each round's decision is taken on the runs the race itself asked
for up to that round (``visible_runs``). Re-running a race, or ``--resume`` after an interruption,
therefore replays the finished rounds from MLflow without a trial and continues where it
stopped; ``conaclip replay`` runs the same loop offline over a full grid.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

# The decision rules, re-exported: callers read a race as one module (race.decide, ...).
from orchestrator.race_rules import RaceStep, RaceVerdict, decide, verdict_of
from orchestrator.race_rules import leader_of as leader_of
from orchestrator.sequential import DEFAULT_SPENDING, Design
from orchestrator.verdicts import DEFAULT_MARGIN
from trainers.errors import InputError

# A TrialOutcome's status (orchestrator.ablation); INTERRUPTED: Ctrl-C stopped its Tune run.
FINISHED, FAILED, INTERRUPTED = "FINISHED", "FAILED", "INTERRUPTED"

Trial = tuple[str, int]  # (pair set name, seed)
# Launches a round's trials; returns what happened to each (orchestrator.ablation.TrialOutcome;
# status FINISHED, FAILED or INTERRUPTED).
Launcher = Callable[[int, list[Trial]], list[Any]]


@dataclass
class RaceRound:
    """One round: its number, the seeds per cell it brings the race to, the trials it asked
    for (every (cell, seed) needed so far), the ones it had to launch, and its decision."""

    number: int
    seeds: int
    planned: list[Trial]
    launched: list[Trial]
    step: RaceStep
    first_seed: int = 0


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
    # A round stopped by Ctrl-C: the race ends there, undecided (no verdict), resumable.
    interrupted: bool = False
    stopped: str | None = None  # why the race ended before its design did (a time budget)

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
            "interrupted": self.interrupted,
            "stopped": self.stopped,
        }


def _round_dict(r: RaceRound) -> dict[str, Any]:
    return {
        "round": r.number,
        "first_seed": r.first_seed,
        "seeds": r.seeds,
        "trials": len(r.planned),
        "launched": len(r.launched),
        "kept": list(r.step.kept),
        "dropped": r.step.dropped,
        "leader": r.step.leader,
        "stop": r.step.stop,
        "reason": r.step.reason,
    }


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


def visible_runs(runs: pd.DataFrame, limits: dict[str, int], first_seed: int = 0) -> pd.DataFrame:
    """The runs of ``runs`` the race has asked for: pair set in ``limits`` and seed in
    ``first_seed .. first_seed + limit - 1`` (limit: the seeds that cell had when it was last
    run). Other runs of the experiment (later rounds of an interrupted race, a ``best --verify``
    recipe, another race's seeds) are left out, so a decision is taken on the same runs whether
    the race runs live, resumes or is replayed."""
    if runs.empty or "params.pair_set" not in runs:
        return runs.iloc[0:0]
    names = runs["params.pair_set"].astype("string")
    seeds = _seeds(runs)
    limit = names.map(lambda n: limits.get(str(n), 0) if pd.notna(n) else 0).astype(float)
    return runs[seeds.notna() & (seeds >= first_seed) & (seeds < first_seed + limit)]


def round_plan(baseline: str, cells: Sequence[str], seeds: int, first_seed: int = 0) -> list[Trial]:
    """Every (cell, seed) a round needs: the baseline and ``cells`` at seeds
    ``first_seed .. first_seed + seeds - 1``, seed by seed (Tune's grid order)."""
    return [
        (name, seed)
        for seed in range(first_seed, first_seed + seeds)
        for name in (baseline, *cells)
    ]


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
    runs: pd.DataFrame,
    metric: str,
    ranks: Mapping[str, Any] | None = None,
    design: Design | None = None,
    first_seed: int = 0,
    margin: float = DEFAULT_MARGIN,
) -> pd.DataFrame:
    """``selection_table`` of ``runs`` under the race's ``design``; ``ranks`` (``{run_id:
    eval ranks}``) feeds its bootstrap over eval queries (None: no cell can leave ``open``)."""
    from orchestrator import table

    return table.selection_table(
        runs, metric, ranks=ranks, margin=margin, design=design, first_seed=first_seed
    )


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
    """``race round k: n trials (l launched), seeds f..f+s-1; active (a/N): ...; dropped: ...``"""
    launched = f"{len(r.launched)} launched" if r.launched else "all already in MLflow"
    kept = ", ".join(r.step.kept) or "-"
    dropped = "; ".join(f"{c} ({why})" for c, why in r.step.dropped.items()) or "-"
    return (
        f"race round {r.number}: {len(r.planned)} trials ({launched}), seeds "
        f"{r.first_seed}..{r.first_seed + r.seeds - 1} "
        f"per cell; active ({len(r.step.kept)}/{cells_total}): {kept}; dropped: {dropped}; "
        f"leader {r.step.leader}; {r.step.reason}"
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
    first_seed: int = 0,
    margin: float = DEFAULT_MARGIN,
    spending: str = DEFAULT_SPENDING,
    deadline: float | None = None,
    clock: Callable[[], float] = time.time,
    pace_s: float | None = None,
) -> RaceResult:
    """Race ``cells`` against ``baseline`` from ``start_seeds`` to at most ``max_seeds`` seeds.

    Each round: plan (``round_plan``), launch what ``read_runs()`` lacks a FINISHED run for and
    this call has not tried yet (a trial that failed here is not retried until the next
    invocation), decide (``decide``) on ``visible_runs``, say one line (``round_line``).
    ``launch`` None replays: every planned trial must already be in ``read_runs()``
    (InputError naming the first one missing). ``steps`` (per trial) only feeds the accounting.
    ``first_seed``: the race's seeds are ``first_seed``, ``first_seed + 1``, ... (another
    race's seeds in the same experiment are not read). ``margin`` and ``spending``: the
    equivalence margin and the spending function of the race's design
    (``Design.race(start_seeds, max_seeds, spending)``). ``deadline`` (``clock()`` seconds):
    a round after the first is not started when, at the pace of the last launched round, it
    would end past it; the race then ends on the last table (its open cells stay open, which
    the design allows: a look not taken cannot add an error). ``pace_s``: wall seconds per
    trial to judge the first launched round by (``ledger_pace``); without it that round runs.
    """
    if start_seeds < 1 or max_seeds < start_seeds:
        raise InputError(f"race: need 1 <= --seeds ({start_seeds}) <= --max-seeds ({max_seeds})")
    design = Design.race(start_seeds, max_seeds, spending)
    active = [c for c in cells if c != baseline]
    result = RaceResult(baseline, tuple(active), metric, max_seeds, steps)
    limits: dict[str, int] = {}
    tried: set[Trial] = set()
    seeds = start_seeds
    per_trial_s = pace_s  # wall seconds per launched trial, the last round's
    for number in range(1, max_seeds - start_seeds + 2):
        plan = round_plan(baseline, active, seeds, first_seed)
        runs = read_runs()
        missing = [t for t in plan if t not in finished_trials(runs) and t not in tried]
        if missing and launch is None:
            name, seed = missing[0]
            raise InputError(f"replay: no FINISHED run of {name} seed {seed}: not a full grid")
        if missing and deadline is not None and per_trial_s is not None:
            expected = per_trial_s * len(missing)
            if clock() + expected > deadline:
                result.stopped = (
                    f"time budget: round {number} ({len(missing)} trials, about "
                    f"{expected / 60:.1f} min at the last round's pace) would end past it; "
                    f"{len(active)} cell(s) left open"
                )
                say(f"race: {result.stopped}")
                break
        limits.update({name: seeds for name in (baseline, *active)})
        if missing:
            started = clock()
            outcomes = launch(number, missing)
            per_trial_s = (clock() - started) / len(missing)
            result.trials += outcomes
            tried.update(missing)
            cut = [t for t in outcomes if getattr(t, "status", None) == INTERRUPTED]
            if cut:
                # Deciding on a round cut short would drop or keep cells on the seeds that
                # happened to finish: stop here; re-running the race resumes this round.
                result.interrupted = True
                say(f"race round {number}: interrupted with {len(cut)} of its {len(missing)} "
                    "trials unfinished; no cell is decided on a partial round")  # fmt: skip
                return result
            runs = read_runs()
        visible = visible_runs(runs, limits, first_seed)
        table = race_table(
            visible, metric, ranks(visible) if ranks else None, design, first_seed, margin
        )
        step = decide(table, active, seeds, max_seeds, metric)
        result.rounds.append(RaceRound(number, seeds, plan, missing, step, first_seed))
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
        winner = f"none (the leader {verdict.leader} is not told apart from every better cell)"
    elif verdict.leader is None:
        winner = "none"
    else:
        winner = f"none (the leader {verdict.leader} is not better than the baseline)"
    share = result.spent_steps / result.full_steps if result.full_steps else math.nan
    return [
        f"race verdict ({result.metric}, {len(result.rounds)} round(s), up to {last.seeds} "
        f"seeds): winner {winner}; better: {', '.join(verdict.better) or '-'}; "
        f"worse: {', '.join(verdict.worse) or '-'}; equivalent: "
        f"{', '.join(verdict.equivalent) or '-'}; open: {', '.join(verdict.open) or '-'}",
        f"race spent {len(result.asked)} trials = {result.spent_steps} trial-steps vs "
        f"{result.full_steps} for the full grid ({len(result.cells) + 1} pair sets x "
        f"{result.max_seeds} seeds): {share:.0%}",
        *([f"race stopped early: {result.stopped}"] if result.stopped else []),
    ]


def ledger_pace(runs: pd.DataFrame, concurrent: int) -> float | None:
    """Wall seconds per trial that earlier FINISHED runs of the experiment imply when
    ``concurrent`` run at once (the median run's start-to-end over ``concurrent``); None
    without finished runs."""
    if runs.empty or "end_time" not in runs:
        return None
    from orchestrator.table import run_status

    done = runs[(run_status(runs) == FINISHED) & runs["end_time"].notna()]
    if done.empty:
        return None
    seconds = (done["end_time"] - done["start_time"]).dt.total_seconds()
    return float(seconds.median()) / max(concurrent, 1)


def run_race(
    spec: Any, say: Callable[[str], None] = _say, deadline: float | None = None
) -> RaceResult:
    """Race ``spec`` (an ``AblationSpec`` with ``race`` settings and a baseline) for real.

    Round k is its own Tune run ``<name>-round<k>`` (tag ``conaclip.round=k``) with an explicit
    trial list, logging into the one MLflow experiment ``<name>``. A round whose Tune state
    survives an interruption is restored first (trials resume from their checkpoints and keep
    their MLflow run); what is still missing then runs as ``<name>-round<k>-retry<j>``.
    """
    from orchestrator import tracking
    from orchestrator.ablation import run_ablation
    from orchestrator.ablation_spec import save_spec

    if spec.race is None or spec.baseline is None:
        raise InputError("--race needs race settings and a baseline pair set")
    settings = spec.race
    cells = [name for name in spec.pair_sets if name != spec.baseline]
    save_spec(spec)

    def read_runs() -> pd.DataFrame:
        return tracking.runs_frame(spec.tracking_uri, spec.experiment_name)

    check_ledger(read_runs(), spec.pair_keys(), spec.run.steps)
    tracking.record_race(spec.tracking_uri, spec.experiment_name, settings)

    def launch(number: int, trials: list[Trial]) -> list[Any]:
        return _launch_round(spec, number, trials, run_ablation, read_runs)

    pace = None
    if deadline is not None:
        from orchestrator.ablation import max_concurrent

        pace = ledger_pace(read_runs(), max_concurrent(spec))

    return race_loop(
        spec.baseline, cells, settings.start_seeds, settings.max_seeds, read_runs, launch,
        metric=settings.metric, steps=spec.run.steps, ranks=RanksCache(spec.tracking_uri),
        say=say, first_seed=settings.first_seed, margin=settings.margin,
        spending=settings.spending, deadline=deadline, pace_s=pace,
    )  # fmt: skip


def _launch_round(
    spec: Any,
    number: int,
    trials: list[Trial],
    run_ablation: Callable[..., Any],
    read_runs: Callable[[], pd.DataFrame],
) -> list[Any]:
    from ray import tune

    from orchestrator.ablation_spec import load_spec

    base = f"{spec.name}-round{number}"
    outcomes: list[Any] = []
    if tune.Tuner.can_restore(str(spec.tune_dir / base)):
        restored = run_ablation(load_spec(spec.out_dir, base), resume=True)
        # MLflow, not Tune's state, says what is done: a restored Tune run keeps its errored
        # trials errored, and a trial Tune counts as ended may have no FINISHED run.
        done = finished_trials(read_runs())
        wanted = set(trials)
        outcomes += [t for t in restored.trials if (t.pair_set, t.seed) in wanted & done]
        if restored.interrupted:  # Ctrl-C again: no retry run starts behind the user's back
            return outcomes + [t for t in restored.trials if t.status == INTERRUPTED]
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
