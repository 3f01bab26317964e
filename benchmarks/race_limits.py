"""What any seed race must spend on independent draws of one grid, when its rule drops a cell on
that cell's own evidence: a lower bound checked across draws, not one draw at a time.

    # two (or more) full grids of the same pair sets and settings on other seeds
    python benchmarks/race_limits.py \\
        --grid sqlite:///<run A>/mlruns.db <experiment A> \\
        --grid sqlite:///<run B>/mlruns.db <experiment B> \\
        --start-seeds 2 --max-seeds 5 --out runs/bench/race/limits.json

Why: ``race_replay.py``'s ``fewest_trials`` is a floor for one grid, reached only by a race that
knows which cells the full grid will leave open and drops exactly those after round 1. A real
rule sees only the seeds so far. This benchmark asks what such a rule must spend on every draw
at once.

The class of rules covered (the futility test ``conaclip ablate --race`` ships is one): after
round k, with k seeds per racing cell, a cell is dropped or kept on its own evidence, its mean
paired gain g against the baseline and the unadjusted p of the paired test over seeds, and
the rule is monotone: when it keeps a cell, it also keeps any cell with a gain of the same
sign, at least as large, and a p at least as small, unless that cell already passes its tests
unadjusted (a rule may drop a cell as settled). The thresholds may differ from round to round
and between gains and losses. Rules that read other cells (Holm over the projections, a pooled
spread) are not covered.

The bound, per round k = start .. max-1: the cells that must race on are the decided cells
(better or worse in their grid) whose floor seed count (``race_replay.fewest_trials``: the first
at which its seed p is below the level the table's correction allows a verdict that size) is
above k. A monotone rule keeps those, so it also keeps every racing cell, in any draw, whose
evidence at k seeds dominates one of them. The smallest such rule keeps exactly that set, and
each draw's cost under it (its cells' seed counts, plus the baseline as far as the furthest) is a
floor for every rule of the class. Computed over each draw alone ("this draw only": a rule tuned
to that draw) and over all draws together ("one rule for all"). When the second is above the
goal's share on some draw while the first is not, the draws contradict each other: a cell left
open at the grid's seeds in one draw shows at least the evidence of a cell another draw's
verdict needs seeded on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

BENCHMARKS = Path(__file__).resolve().parent
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import race_replay  # noqa: E402  (also puts the repository root on sys.path)

from orchestrator import race, tracking  # noqa: E402
from trainers.errors import InputError  # noqa: E402

Evidence = tuple[float, float]  # (mean paired gain vs the baseline, unadjusted paired p)


@dataclass(frozen=True)
class Draw:
    """One full grid as the bound needs it. ``need``: cell -> the seeds it must reach (decided
    cells: ``fewest_trials``' count; other cells: the start). ``evidence``: k -> cell ->
    (gain, p) from the table of every cell at k seeds; ``passes``: k -> the cells whose tests
    pass unadjusted at k seeds (in the direction of their gain). ``verdict``: cell ->
    better/worse/open in the full grid."""

    name: str
    baseline: str
    cells: tuple[str, ...]
    need: dict[str, int]
    evidence: dict[int, dict[str, Evidence]]
    passes: dict[int, frozenset[str]]
    verdict: dict[str, str]
    max_seeds: int


def dominates(x: Evidence, y: Evidence) -> bool:
    """Whether evidence ``x`` is at least as strong as ``y`` for a monotone rule: gains of the
    same sign (zero or NaN is a sign of its own), ``|g_x| >= |g_y|`` and ``p_x <= p_y`` (a NaN
    p, no test possible, counts as 1)."""

    def sign(g: float) -> int:
        return 0 if math.isnan(g) or g == 0 else (1 if g > 0 else -1)

    def size(g: float) -> float:
        return 0.0 if math.isnan(g) else abs(g)

    def p(value: float) -> float:
        return 1.0 if math.isnan(value) else value

    (gx, px), (gy, py) = x, y
    return sign(gx) == sign(gy) and size(gx) >= size(gy) and p(px) <= p(py)


def forced_seeds(
    draws: list[Draw], start_seeds: int, max_seeds: int
) -> tuple[dict[str, dict[str, int]], list[dict[str, Any]]]:
    """The seeds every cell reaches under the smallest monotone rule that lets each draw's
    decided cells reach their ``need`` (one rule shared by ``draws``): ``{draw: {cell: seeds}}``
    (baseline included: as far as its furthest cell) and the witnesses, one per cell kept only
    because its evidence dominates a cell that must race on: ``{round_seeds, draw, cell,
    evidence, because: {draw, cell, evidence, needs}}``."""
    seeds = {d.name: {c: start_seeds for c in d.cells} for d in draws}
    racing = {(d.name, c) for d in draws for c in d.cells}
    by_name = {d.name: d for d in draws}
    witnesses: list[dict[str, Any]] = []
    for k in range(start_seeds, max_seeds):
        must = {(n, c) for n, c in racing if by_name[n].need[c] > k}
        kept = set(must)
        # A cell that already passes may leave as settled whatever its evidence.
        free = {(n, c) for n, c in racing - must if c not in by_name[n].passes[k]}
        for name, cell in sorted(free):
            mine = by_name[name].evidence[k][cell]
            # Another draw's cell first: the witness then shows the draws disagreeing.
            for other, rival in sorted(must, key=lambda m: (m[0] == name, m)):
                theirs = by_name[other].evidence[k][rival]
                if dominates(mine, theirs):
                    kept.add((name, cell))
                    witnesses.append({
                        "round_seeds": k, "draw": name, "cell": cell, "evidence": mine,
                        "because": {"draw": other, "cell": rival, "evidence": theirs,
                                    "needs": by_name[other].need[rival]},
                    })  # fmt: skip
                    break
        for name, cell in kept:
            seeds[name][cell] = k + 1
        racing = kept
    for d in draws:
        seeds[d.name] = {d.baseline: max([start_seeds, *seeds[d.name].values()]), **seeds[d.name]}
    return seeds, witnesses


def share(draw: Draw, seeds: dict[str, int]) -> float:
    """Trials (all of one length, so trial-steps too) of ``seeds`` against the full grid's."""
    return sum(seeds.values()) / ((len(draw.cells) + 1) * draw.max_seeds)


def load_draw(tracking_uri: str, experiment: str, start_seeds: int, max_seeds: int,
              metric: str = "rsum") -> Draw:  # fmt: skip
    """A full grid's ``Draw`` read from MLflow (its eval ranks feed the bootstrap test, as in
    the table; the evidence is the seed test's p, which is the one that binds)."""
    tracking.check_tracking_uri(tracking_uri, must_exist=True)
    runs = race_replay.without_verification(tracking.runs_frame(tracking_uri, experiment))
    ranks = race.RanksCache(tracking_uri)
    return draw_of(runs, experiment, start_seeds, max_seeds, metric, ranks)


def draw_of(runs: pd.DataFrame, name: str, start_seeds: int, max_seeds: int, metric: str,
            ranks) -> Draw:  # fmt: skip
    """``Draw`` of a full grid's runs frame (``ranks``: as ``race_replay.replay``'s)."""
    baseline, cells, _ = race_replay.grid_cells(runs)
    first = race_replay.first_seed(runs)
    grid = race_replay.full_grid_verdict(runs, baseline, cells, max_seeds, metric, ranks, first)
    tables = race_replay.tables_by_seeds(
        runs, baseline, cells, range(start_seeds, max_seeds + 1), metric, ranks, first
    )
    floor = race_replay.fewest_trials(
        runs, baseline, cells, grid, start_seeds, max_seeds, metric, ranks, first, tables
    )
    evidence: dict[int, dict[str, Evidence]] = {}
    passes: dict[int, frozenset[str]] = {}
    for k in range(start_seeds, max_seeds):
        rows = {str(r["pair_set"]): r for r in tables[k].to_dict("records")}
        alpha = float(tables[k].attrs.get("alpha", 0.05))
        evidence[k] = {c: (float(rows[c]["gain_mean"]), float(rows[c]["p_seed"])) for c in cells}
        passes[k] = frozenset(
            c
            for c in cells
            # Unadjusted: the most cells a rule could call settled, so the bound stays low.
            if race_replay._passes(
                rows[c], "better" if evidence[k][c][0] > 0 else "worse", alpha, alpha
            )
        )
    verdict = {c: "open" for c in cells}
    verdict.update({c: "better" for c in grid.better})
    verdict.update({c: "worse" for c in grid.worse})
    need = {c: floor["seeds"][c] for c in cells}
    return Draw(name, baseline, tuple(cells), need, evidence, passes, verdict, max_seeds)


def report(draws: list[Draw], start_seeds: int, max_seeds: int) -> dict[str, Any]:
    """Per draw: the free floor (``fewest_trials``), the bound for a rule fitted to that draw
    alone and the bound for one rule on every draw; the witnesses of the shared bound."""
    alone = {d.name: forced_seeds([d], start_seeds, max_seeds)[0][d.name] for d in draws}
    shared, witnesses = forced_seeds(draws, start_seeds, max_seeds)
    rows = []
    for d in draws:
        free = {d.baseline: max([start_seeds, *d.need.values()]), **d.need}
        rows.append({
            "draw": d.name,
            "better": sorted(c for c, v in d.verdict.items() if v == "better"),
            "worse": sorted(c for c, v in d.verdict.items() if v == "worse"),
            "floor_share": share(d, free),
            "alone_share": share(d, alone[d.name]),
            "shared_share": share(d, shared[d.name]),
            "shared_seeds": shared[d.name],
            "evidence": {str(k): v for k, v in d.evidence.items()},
            "need": d.need,
        })  # fmt: skip
    return {"start_seeds": start_seeds, "max_seeds": max_seeds, "draws": rows,
            "witnesses": witnesses}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| draw | better / worse | floor (any rule) | monotone rule, this draw only "
        "| one monotone rule for all draws |",
        "|---|---|---:|---:|---:|",
    ]
    for row in result["draws"]:
        lines.append(
            f"| {row['draw']} | {len(row['better'])} / {len(row['worse'])} "
            f"| {row['floor_share']:.0%} | {row['alone_share']:.0%} | {row['shared_share']:.0%} |"
        )
    for w in result["witnesses"]:
        (g, p), b = w["evidence"], w["because"]
        lines.append(
            f"- after {w['round_seeds']} seeds, {w['draw']} {w['cell']} ({g:+.2f}, p {p:.3f}) "
            f"races on because it outweighs {b['draw']} {b['cell']} ({b['evidence'][0]:+.2f}, "
            f"p {b['evidence'][1]:.3f}), which needs {b['needs']} seeds"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", nargs=2, action="append", required=True,
                        metavar=("TRACKING_URI", "EXPERIMENT"),
                        help="a full grid (repeat: one per draw of seeds)")  # fmt: skip
    parser.add_argument("--start-seeds", type=int, default=2, help="K0, as --seeds under --race")
    parser.add_argument("--max-seeds", type=int, default=5, help="M, as --max-seeds")
    parser.add_argument("--metric", default="rsum")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.start_seeds < 2 or args.max_seeds <= args.start_seeds:
        print("race_limits: error: need 2 <= --start-seeds < --max-seeds", file=sys.stderr)
        return 2
    if len({name for _, name in args.grid}) != len(args.grid):
        print("race_limits: error: two --grid share an experiment name", file=sys.stderr)
        return 2
    try:
        draws = [load_draw(uri, name, args.start_seeds, args.max_seeds, args.metric)
                 for uri, name in args.grid]  # fmt: skip
    except InputError as error:
        print(f"race_limits: error: {error}", file=sys.stderr)
        return 2
    if len({frozenset(d.cells) for d in draws}) != 1 or len({d.baseline for d in draws}) != 1:
        print("race_limits: error: the grids have different pair sets or baselines",
              file=sys.stderr)  # fmt: skip
        return 2
    result = report(draws, args.start_seeds, args.max_seeds)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
