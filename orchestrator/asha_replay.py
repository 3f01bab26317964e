"""ASHA judged against a full fifo grid: real ASHA runs, or Tune's ASHA replayed on its reports.

The inputs are run records as ``benchmarks/ablation_scale.py run`` writes them: a dict with
``trials``, each a dict with ``pair_set``, ``seed``, ``step`` (the last step it reached) and
``rsum`` (its rsum there), a fifo grid's trials also with ``trial_id`` and ``curve`` ([step,
rsum] at every report); a grid's ``args.eval_every``; an ASHA run's ``grace_period``. Nothing
here starts Ray: ``replay_asha`` drives Tune's scheduler object by hand.
"""

from __future__ import annotations

import heapq
import math
from types import SimpleNamespace
from typing import Any

from scipy.stats import kendalltau

from orchestrator.ablation import asha_scheduler

Record = dict[str, Any]


def asha_vs_grid(grid: Record, asha: Record) -> list[dict[str, Any]]:
    """One row per seed of the ASHA run: its trial-steps against the grid's trials of the same
    seed, each run's top-1 pair set (ASHA's among the trials it ran to the end), the grid's rank
    (1 = top) and rsum gap of ASHA's pick, the step at which ASHA stopped the grid's top-1, and
    the largest rsum difference between a trial ASHA ran to the end and the grid's same trial
    (0 when evaluating more often leaves training untouched). Raises ValueError when the grid
    lacks one of ASHA's seeds."""
    rows = []
    for seed in sorted({t["seed"] for t in asha["trials"]}):
        ran = [t for t in asha["trials"] if t["seed"] == seed]
        full = {t["pair_set"]: t for t in grid["trials"] if t["seed"] == seed}
        if not full:
            raise ValueError(f"{grid.get('ablation', 'grid')}: no trials of seed {seed}")
        end = max(t["step"] or 0 for t in full.values())
        done = [t for t in ran if t["step"] == end and t["rsum"] is not None]
        order = sorted(full, key=lambda name: full[name]["rsum"], reverse=True)
        grid_top = order[0]
        pick = max(done, key=lambda t: t["rsum"])["pair_set"] if done else None
        stopped = {t["pair_set"]: t["step"] for t in ran}
        steps = {"asha": sum(t["step"] or 0 for t in ran),
                 "grid": sum(t["step"] or 0 for t in full.values())}  # fmt: skip
        rows.append(
            {
                "seed": seed,
                "grace_period": asha.get("grace_period"),
                "asha_steps": steps["asha"],
                "grid_steps": steps["grid"],
                "share": steps["asha"] / steps["grid"],
                "ran_to_end": len(done),
                "grid_top": grid_top,
                "grid_top_rsum": full[grid_top]["rsum"],
                "asha_top": pick,
                "asha_top_rsum": full[pick]["rsum"] if pick else None,
                "same_top": pick == grid_top,
                "asha_top_grid_rank": order.index(pick) + 1 if pick else None,
                "gap": full[grid_top]["rsum"] - full[pick]["rsum"] if pick else None,
                "grid_top_stopped_at": stopped.get(grid_top),
                "max_rsum_diff": max(
                    (abs(t["rsum"] - full[t["pair_set"]]["rsum"]) for t in done), default=None
                ),
            }
        )
    return rows


def asha_rungs(reports: int, grace: int, rf: int = 2) -> list[int]:
    """Tune's ASHA milestones (in reports) for ``max_t=reports``, ``grace_period=grace`` and
    reduction factor ``rf``, in ascending order (the formula of Tune's ``_Bracket``, s = 0)."""
    count = int(math.log(reports / grace) / math.log(rf) + 1)
    return [grace * rf**k for k in range(count)]


def halving_step_share(reports: int, grace: int, rf: int = 2) -> float:
    """Share of a full grid's trial-steps that synchronous successive halving spends on those
    rungs: every trial reaches the first rung, 1/rf of them the next, and so on, and the last
    rung's survivors run to ``reports``. Asynchronous ASHA lets the first trials at a rung
    through before its cutoff has data, so it usually spends more."""
    share, reached, done = 0.0, 1.0, 0
    for milestone in [*asha_rungs(reports, grace, rf), reports]:
        share += reached * (min(milestone, reports) - done)
        done, reached = min(milestone, reports), reached / rf
    return share / reports


def replay_asha(
    trials: list[Record],
    grace: int,
    reduction_factor: int,
    eval_every: int,
    concurrency: int = 2,
    startup_steps: int = 40,
) -> dict[str, int]:
    """Tune's own ASHA scheduler (``orchestrator.ablation.asha_scheduler``) fed the reports a
    fifo run recorded (each trial's ``curve``: [step, rsum] per report), in the order a real
    run would deliver them: trials start in ``trials``' order, ``concurrency`` at a time,
    each paying ``startup_steps`` (Ray's start-up, in step-times) before its first step, a
    report every ``eval_every`` steps. Returns {pair set: the step it stopped at}; a trial
    that was not stopped ends at its last report. Exact where training does not depend on how
    often it is evaluated (``asha_vs_grid``'s max_rsum_diff checks that on a real ASHA run)."""
    reports = max(len(t["curve"]) for t in trials)
    scheduler = asha_scheduler(reports, grace, reduction_factor)
    scheduler.set_search_properties("rsum", "max")
    stopped: dict[str, int] = {}
    events: list[tuple[int, int, int]] = []  # (time in step-times, trial index, report index)
    waiting = list(range(len(trials)))[::-1]

    def start(now: int) -> None:
        index = waiting.pop()
        scheduler.on_trial_add(None, SimpleNamespace(trial_id=str(index)))
        heapq.heappush(events, (now + startup_steps + eval_every, index, 0))

    for _ in range(min(concurrency, len(waiting))):
        start(0)
    while events:
        now, index, k = heapq.heappop(events)
        step, rsum = trials[index]["curve"][k]
        result = {"training_iteration": k + 1, "rsum": rsum}
        decision = scheduler.on_trial_result(None, SimpleNamespace(trial_id=str(index)), result)
        if decision == "STOP" or k + 1 == len(trials[index]["curve"]):
            stopped[trials[index]["pair_set"]] = step
            if waiting:
                start(now)
        else:
            heapq.heappush(events, (now + eval_every, index, k + 1))
    return stopped


def asha_replay_rows(
    grid: Record, graces: list[int], factors: list[int], **timing: int
) -> list[dict[str, Any]]:
    """One row per (seed, grace, reduction factor): ``replay_asha`` (``timing``: its
    ``concurrency`` and ``startup_steps``) on that seed's trials of a fifo grid that reported
    every ``eval_every`` steps, judged as ``asha_vs_grid`` judges a real ASHA run against the
    grid's final rsums."""
    eval_every = grid["args"]["eval_every"]
    rows = []
    for seed in sorted({t["seed"] for t in grid["trials"]}):
        trials = sorted(
            (t for t in grid["trials"] if t["seed"] == seed), key=lambda t: t["trial_id"]
        )
        for grace in graces:
            for factor in factors:
                stops = replay_asha(trials, grace, factor, eval_every, **timing)
                replayed = {"grace_period": grace, "trials": [
                    {"pair_set": t["pair_set"], "seed": seed, "step": stops[t["pair_set"]],
                     "rsum": dict(map(tuple, t["curve"]))[stops[t["pair_set"]]]}
                    for t in trials
                ]}  # fmt: skip
                [row] = asha_vs_grid(grid, replayed)
                rows.append({**row, "reduction_factor": factor})
    return rows


def report_ranks(grid: Record) -> list[dict[str, Any]]:
    """Per report step, over the seeds of a fifo grid: Kendall's tau between the cells' rsum
    at that step and at the end, and where the final top-1 cell ranks at that step
    (1 = top). How much an early rung can know of the end."""
    rows = []
    for seed in sorted({t["seed"] for t in grid["trials"]}):
        trials = [t for t in grid["trials"] if t["seed"] == seed]
        final = [t["curve"][-1][1] for t in trials]
        top = max(range(len(trials)), key=final.__getitem__)
        for k, (step, _) in enumerate(trials[top]["curve"]):
            at = [t["curve"][k][1] for t in trials]
            rank = 1 + sum(value > at[top] for value in at)
            rows.append({"seed": seed, "step": step, "tau": kendall_tau(at, final),
                         "top_rank": rank, "cells": len(trials)})  # fmt: skip
    return rows


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two score lists over the same items (ties count as neither)."""
    return float(kendalltau(a, b).statistic)
