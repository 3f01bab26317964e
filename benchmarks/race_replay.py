"""Seed racing replayed offline on a full grid: how many trial-steps would ``--race`` have spent,
and would it have reached the full grid's verdict?

    # 1. a full grid: every pair set (baseline included) at M seeds
    conaclip ablate --preset single_additions --seeds 5 --out runs/bench/race --name grid5
    # 2. the race replayed on it, from 2 seeds to at most 5
    python benchmarks/race_replay.py --tracking-uri sqlite:///$PWD/runs/bench/race/mlruns.db \\
        --experiment grid5 --start-seeds 2 --max-seeds 5 --out runs/bench/race/replay.json

Why a replay is the race: a trial's result depends only on its (pair set, seed, settings), never
on which other trials ran or when (each trial seeds its own model and data order; evaluation
does not touch the training RNG). The race that ``conaclip ablate --race`` would have run with
these settings would therefore have seen exactly the runs of the grid it asked for. The replay
runs the race's own loop (``orchestrator.race.race_loop``, the same ``decide`` and
``visible_runs``) with nothing to launch: at each round only the runs the race would have asked
for are visible (seeds below each cell's count: the open cells and the baseline at round k's
seeds, a dropped cell at the seeds it had when dropped), and the verdict is built from the
same table the race would have printed.

The full grid's verdict (``orchestrator.race.verdict_of`` over every cell of the table of all
runs with seed < M) is compared part by part with the race's: the winner, the set of cells
with verdict "better" and the set with verdict "worse". Output: a JSON report (``--out``) and
one Markdown table row on stdout.

The report also gives the fewest trials any race could spend (``fewest_trials``): whatever its
rules, a race that starts every cell at K0 seeds and ends with the grid's better and worse
sets must run each of those cells up to a seed count at which its seed test passes at the
least strict level the table's correction can give a cell in a verdict that size (Holm over m
cells with at most R significant: ``0.05 / (m - R + 1)``), and the baseline as far as the
furthest of them. When that floor is above a share, no race rule reaches the share on this
grid without changing the verdict's tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import trainers  # noqa: E402,F401  (torchvision compat before anything imports open_clip)
from orchestrator import race, race_rules, tracking  # noqa: E402
from trainers.errors import InputError  # noqa: E402

MARKDOWN_HEADER = (
    "| experiment | seeds | race trials | race trial-steps | full grid trial-steps | share "
    "| fewest possible | race winner | grid winner | same winner | same better | same worse |\n"
    "|---|---|---:|---:|---:|---:|---:|---|---|:-:|:-:|:-:|"
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
    ranks,
    first: int = 0,
) -> race.RaceVerdict:
    """The verdict of the full grid at ``max_seeds`` seeds from seed ``first``; InputError when
    a (cell, seed) of it has no FINISHED run."""
    every = {name: max_seeds for name in (baseline, *cells)}
    done = race.finished_trials(runs)
    for trial in race.round_plan(baseline, cells, max_seeds, first):
        if trial not in done:
            raise InputError(f"not a full grid at {max_seeds} seeds: no FINISHED run of "
                             f"{trial[0]} seed {trial[1]}")  # fmt: skip
    visible = race.visible_runs(runs, every, first)
    table = race.race_table(visible, metric, ranks(visible) if ranks else None)
    return race.verdict_of(table, cells, metric)


def _passes(row: dict[str, Any], verdict: str, seed_level: float, boot_level: float) -> bool:
    """Whether a table row could have ``verdict`` in a race's last table: its raw seed p below
    ``seed_level``, its raw bootstrap p below ``boot_level``, at least two paired seeds and the
    gain's sign (the rule of ``orchestrator.table``, with raw p-values against levels that no
    adjusted p can beat)."""
    gain_n = row.get("gain_n")
    if gain_n is None or pd.isna(gain_n) or gain_n < 2:
        return False
    if not (row["p_seed"] < seed_level and row["p_boot"] < boot_level):
        return False
    return row["gain_mean"] > 0 if verdict == race_rules.BETTER else row["gain_mean"] < 0


def seed_level(correction: str, alpha: float, members: int, rejected: int) -> float:
    """The largest raw seed p a cell can have and still be significant after ``correction``
    in a family of ``members`` p-values of which at most ``rejected`` are significant.

    Holm rejects a prefix of the ascending p-values and needs ``p_(j) < alpha / (m - j + 1)``
    at every step j of it, so a rejected cell, at most at step ``rejected``, needs
    ``p < alpha / (m - rejected + 1)``. Benjamini-Hochberg rejects every ``p <= p_(k)`` where
    ``p_(k) < alpha k / m``, so a rejected cell needs ``p < alpha rejected / m``."""
    if not 0 < rejected <= members:
        raise ValueError(f"rejected {rejected} of {members}: expected 1..{members}")
    if correction == "bh":
        return alpha * rejected / members
    return alpha / (members - rejected + 1)


def tables_by_seeds(
    runs: pd.DataFrame,
    baseline: str,
    cells: list[str],
    counts: range,
    metric: str,
    ranks,
    first: int = 0,
) -> dict[int, pd.DataFrame]:
    """n -> the selection table of every cell (baseline included) at its first n seeds from
    ``first``, as a race that gave every cell n seeds would see it, for each n in ``counts``."""
    tables = {}
    for n in counts:
        visible = race.visible_runs(runs, {name: n for name in (baseline, *cells)}, first)
        tables[n] = race.race_table(visible, metric, ranks(visible) if ranks else None)
    return tables


def fewest_trials(
    runs: pd.DataFrame,
    baseline: str,
    cells: list[str],
    grid: race.RaceVerdict,
    start_seeds: int,
    max_seeds: int,
    metric: str,
    ranks,
    first: int = 0,
    tables: dict[int, pd.DataFrame] | None = None,
) -> dict[str, Any]:
    """A floor under the trials of any race from ``start_seeds`` seeds that ends with
    ``grid``'s better and worse sets: ``{"seeds": {cell: n}, "trials": sum, "share": of the
    full grid, "seed_level": the raw seed p a decided cell needs}``.

    A race's verdict comes from one last table in which every cell has its own seeds (from
    seed ``first``, as a race adds them). From ``start_seeds`` >= 2 every cell has a seed p,
    so the seed family has one member per cell (m). In it the grid's D decided cells must be
    significant after the table's correction, and so can be only the D decided cells plus
    the open cells whose bootstrap test might fail (they may pass the seed test and stay
    open): an open cell whose raw bootstrap p is below ``alpha / m`` at every seed count
    passes it whatever the correction. With at most R such rejections a decided cell's raw
    seed p must be below ``seed_level`` (Holm: ``alpha / (m - R + 1)``). From 1 seed a cell
    dropped at once has no seed p, the family may shrink to the decided cells, and the level
    is ``alpha``. A decided cell needs the first seed count n >= max(2, ``start_seeds``) at
    which its row, in the table of every cell at n seeds, has a seed p below that level, a
    bootstrap p below ``alpha`` (no correction lowers a p) and its verdict's sign; the
    baseline needs the largest of those n (the gains pair each seed with its baseline run);
    every other cell needs ``start_seeds`` (round 1 runs them all). The winner part is left
    out: it can only add trials, so the floor stays a floor. ``tables``: ``tables_by_seeds``
    over at least max(2, ``start_seeds``)..``max_seeds``, when the caller has it already."""
    decided = {c: race_rules.BETTER for c in grid.better}
    decided.update({c: race_rules.WORSE for c in grid.worse})
    counts = range(max(2, start_seeds), max_seeds + 1)
    if tables is None:
        tables = tables_by_seeds(runs, baseline, cells, counts, metric, ranks, first)
    rows_at = {n: {str(row["pair_set"]): row for row in tables[n].to_dict("records")}
               for n in counts}  # fmt: skip
    alpha = float(tables[counts[-1]].attrs.get("alpha", 0.05))
    correction = str(tables[counts[-1]].attrs.get("correction", "holm"))
    members = len(cells)
    sure_boot = alpha / members

    def may_fail_boot(cell: str) -> bool:
        return any(not rows_at[n][cell]["p_boot"] < sure_boot for n in rows_at)

    unsure = [c for c in cells if c not in decided and may_fail_boot(c)]
    level = alpha
    if decided and start_seeds >= 2:
        rejected = min(members, len(decided) + len(unsure))
        level = seed_level(correction, alpha, members, rejected)
    need: dict[str, int] = {}
    for n, rows in rows_at.items():
        for cell, verdict in decided.items():
            if cell not in need and _passes(rows[cell], verdict, level, alpha):
                need[cell] = n
    # A decided cell passes at max_seeds in the grid's own table (the same seeds), where its
    # adjusted p is below alpha, so it is reached; max_seeds is only a guard.
    seeds = {cell: max(start_seeds, need.get(cell, max_seeds)) if cell in decided else start_seeds
             for cell in cells}  # fmt: skip
    seeds = {baseline: max([start_seeds, *(seeds[c] for c in decided)]), **seeds}
    trials = sum(seeds.values())
    return {"seeds": seeds, "trials": trials, "share": trials / ((len(cells) + 1) * max_seeds),
            "seed_level": level}  # fmt: skip


def replay(
    runs: pd.DataFrame,
    start_seeds: int,
    max_seeds: int,
    metric: str = "rsum",
    ranks=None,
    say=race._say,
    futility: str = "uncorrected",
) -> dict[str, Any]:
    """The race replayed on ``runs`` (a full grid's ``runs_frame``) with the futility rule
    ``futility`` and the comparison with the full grid's verdict, as the JSON-ready report
    ``main`` writes.

    ``runs`` may also be an earlier race's ledger instead of a full grid: then the race alone
    is reported (``grid_verdict``, ``same`` and ``fewest_trials`` None), and a replay that asks
    for a trial the ledger lacks raises InputError naming it (a rule that races differently).
    The race's seeds count up from the grid's smallest (``first_seed``), as ``--first-seed``
    would have run it."""
    baseline, cells, steps = grid_cells(runs)
    first = first_seed(runs)
    try:
        grid = full_grid_verdict(runs, baseline, cells, max_seeds, metric, ranks, first)
    except InputError as error:
        say(f"race_replay: {error}; the race is replayed alone")
        grid = None
    result = race.race_loop(baseline, cells, start_seeds, max_seeds, lambda: runs, None,
                            metric=metric, steps=steps, ranks=ranks, say=say,
                            futility=futility, first_seed=first)  # fmt: skip
    assert result.verdict is not None
    floor = None
    if grid is not None:
        floor = fewest_trials(
            runs, baseline, cells, grid, start_seeds, max_seeds, metric, ranks, first
        )
    return {
        "experiment": runs.attrs.get("experiment"),
        "start_seeds": start_seeds,
        "first_seed": first,
        "futility": futility,
        **result.as_dict(),
        "share": result.spent_steps / result.full_steps,
        "grid_verdict": None if grid is None else grid.as_dict(),
        "same": None if grid is None else result.verdict.same_as(grid),
        "fewest_trials": floor,
    }


def markdown_row(report: dict[str, Any]) -> str:
    def yes(flag: bool | None) -> str:
        return "-" if flag is None else "yes" if flag else "**no**"

    same = report["same"] or {}
    grid = report["grid_verdict"]
    floor = report["fewest_trials"]
    return (
        f"| {report['experiment']} | {report['start_seeds']}..{report['max_seeds']} "
        f"| {report['trials']} | {report['spent_steps']} | {report['full_steps']} "
        f"| {report['share']:.0%} | {'-' if floor is None else format(floor['share'], '.0%')} "
        f"| {report['verdict']['winner'] or '-'} "
        f"| {'-' if grid is None else grid['winner'] or '-'} | {yes(same.get('winner'))} "
        f"| {yes(same.get('better'))} | {yes(same.get('worse'))} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="MLflow URI holding the full grid")
    parser.add_argument("--experiment", required=True, help="the grid's MLflow experiment")
    parser.add_argument("--start-seeds", type=int, default=2, help="K0, as --seeds under --race")
    parser.add_argument("--max-seeds", type=int, default=5, help="M, as --max-seeds")
    parser.add_argument("--metric", default="rsum")
    parser.add_argument("--futility", choices=race_rules.FUTILITY_RULES, default="uncorrected",
                        help="the futility rule replayed: 'uncorrected' is conaclip's race; "
                        "'family' applies Holm to every racing cell's projection (measured, "
                        "not used by --race)")  # fmt: skip
    parser.add_argument(
        "--no-bootstrap",
        action="store_true",
        help="do not read the runs' eval ranks (bootstrap columns NaN, every verdict open)",
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    try:
        tracking.check_tracking_uri(args.tracking_uri, must_exist=True)
        runs = without_verification(tracking.runs_frame(args.tracking_uri, args.experiment))
        ranks = None if args.no_bootstrap else race.RanksCache(args.tracking_uri)
        report = replay(runs, args.start_seeds, args.max_seeds, args.metric, ranks,
                        futility=args.futility)  # fmt: skip
    except InputError as error:
        print(f"race_replay: error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    print(MARKDOWN_HEADER)
    print(markdown_row(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
