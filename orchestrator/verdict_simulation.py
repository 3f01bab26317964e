"""Known truth for the verdict rule: simulated tables whose cells' true gains are set, with
both noises and the correlations a real grid has, decided by the same functions the table and
the race use (``orchestrator.gain_test``, ``orchestrator.verdicts``).

Cell c's gain at seed s, image i of an eval set of N images (rsum units):

    d[c, s, i] = mu_c + alpha[c, i] + beta[c, s, i],     g[c, s] = mean_i d[c, s, i] + e[c, s]

``alpha``: the cell's eval-set effect, shared by its seeds (its mean over the drawn images has
sd ``eval_sd``); ``beta``: the per-seed eval-set part (sd of its mean ``eval_seed_sd``); ``e``:
training noise (sd ``seed_sd``). Every part is a cell-minus-baseline difference in which the
baseline's half is the same for every cell (``baseline_share`` of the variance), as when every
cell is paired with one baseline run per seed: cells' gains are positively correlated. The
bootstrap resamples the N images (one shared draw per table) as the table does.

A false decision is "better" or "worse" for a cell whose true gain is 0, the wrong sign for a
cell with a gain, and "equivalent" for a cell whose true |gain| is at least the margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from orchestrator.gain_test import paired_gain_test
from orchestrator.sequential import Design
from orchestrator.verdicts import (
    BETTER,
    EQUIVALENT,
    OPEN,
    WORSE,
    LookP,
    family_verdicts,
    leaves_race,
    sequential_p,
)


@dataclass(frozen=True)
class Scenario:
    """True gains and noise of one simulated grid (rsum units)."""

    effects: tuple[float, ...]
    seed_sd: float = 3.2
    eval_sd: float = 1.3
    eval_seed_sd: float = 1.0
    baseline_share: float = 0.5
    images: int = 200
    n_boot: int = 200
    margin: float = 6.0
    alpha: float = 0.05
    # Cells differ in training noise: each cell's sd is seed_sd times a lognormal factor
    # whose log has this sd (0: every cell alike).
    seed_sd_spread: float = 0.0


@dataclass
class Tally:
    """Counts over replicates: ``fwer`` (replicates with at least one false decision),
    ``decisions[c][verdict]``, ``trials`` (cell-seeds plus baseline seeds spent)."""

    replicates: int = 0
    fwer: int = 0
    false: int = 0
    decisions: list[dict[str, int]] = field(default_factory=list)
    trials: int = 0
    decided_by: dict[int, int] = field(default_factory=dict)  # seeds -> correct decisions

    def add(
        self,
        scenario: Scenario,
        verdicts: Sequence[str],
        trials: int,
        seeds_used: Sequence[int] = (),
    ) -> None:
        if not self.decisions:
            self.decisions = [dict.fromkeys((BETTER, WORSE, EQUIVALENT, OPEN), 0)
                              for _ in verdicts]  # fmt: skip
        wrong = [is_false(mu, v, scenario.margin) for mu, v in zip(scenario.effects, verdicts,
                                                                   strict=True)]  # fmt: skip
        self.replicates += 1
        self.fwer += any(wrong)
        self.false += sum(wrong)
        self.trials += trials
        for counts, verdict in zip(self.decisions, verdicts, strict=True):
            counts[verdict] += 1
        for verdict, bad, n in zip(verdicts, wrong, seeds_used, strict=False):
            if verdict != OPEN and not bad:
                self.decided_by[n] = self.decided_by.get(n, 0) + 1

    def correct_by(self, seeds: int) -> float:
        """Correct decisions per replicate reached with at most ``seeds`` seeds."""
        total = sum(count for n, count in self.decided_by.items() if n <= seeds)
        return total / self.replicates if self.replicates else float("nan")

    @property
    def fwer_rate(self) -> float:
        return self.fwer / self.replicates if self.replicates else float("nan")

    def decided_rate(self, cell: int) -> float:
        counts = self.decisions[cell]
        return 1 - counts[OPEN] / self.replicates


def is_false(mu: float, verdict: str, margin: float) -> bool:
    """Whether ``verdict`` is a false decision for a cell whose true gain is ``mu``."""
    if verdict == BETTER:
        return mu <= 0
    if verdict == WORSE:
        return mu >= 0
    if verdict == EQUIVALENT:
        return abs(mu) >= margin
    return False


def draw_grid(scenario: Scenario, seeds: int, rng: np.random.Generator):
    """``(gains, boot)``: shape (cells, seeds) and (cells, seeds, n_boot)."""
    m, n, share = len(scenario.effects), scenario.images, scenario.baseline_share

    def parts(sd: float, shape: tuple[int, ...], shared_shape: tuple[int, ...]) -> np.ndarray:
        own = rng.normal(0, sd * np.sqrt(1 - share), shape)
        return own - rng.normal(0, sd * np.sqrt(share), shared_shape)

    mu = np.asarray(scenario.effects, dtype=float)[:, None, None]
    alpha = parts(scenario.eval_sd * np.sqrt(n), (m, 1, n), (1, 1, n))
    beta = parts(scenario.eval_seed_sd * np.sqrt(n), (m, seeds, n), (1, seeds, n))
    train = parts(scenario.seed_sd, (m, seeds), (1, seeds))
    if scenario.seed_sd_spread:
        train = train * np.exp(rng.normal(0, scenario.seed_sd_spread, (m, 1)))
    d = mu + alpha + beta
    counts = np.stack(
        [np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(scenario.n_boot)]
    ).astype(float)
    gains = d.mean(axis=2) + train
    boot = np.einsum("bi,csi->csb", counts, d) / n + train[:, :, None]
    return gains, boot


def decide(
    scenario: Scenario, gains: np.ndarray, boot: np.ndarray, design: Design, race: bool
) -> tuple[tuple[str, ...], list[int]]:
    """The verdicts of one simulated grid (all seeds drawn) under ``design``, and the seeds
    each cell used: a fixed grid uses ``design.looks[-1]`` seeds of every cell; a race tests
    the open cells at each look and stops a cell once it is decided."""
    m = gains.shape[0]
    looks: list[list[LookP]] = [[] for _ in range(m)]
    active = list(range(m))
    used = [0] * m
    verdicts: tuple[str, ...] = (OPEN,) * m
    ps: list[tuple[float, float]] = [(np.nan, np.nan)] * m
    means = [np.nan] * m
    plan = design.looks if race else design.looks[-1:]
    for n in plan:
        # A cell that left the race keeps its looks, so its p-values and mean stand as they were.
        for c in active:
            test = paired_gain_test(gains[c, :n], boot[c, :n])
            looks[c].append(LookP.of(test, scenario.margin))
            used[c] = n
            ps[c] = sequential_p(looks[c], design if race else Design((n,)))
            means[c] = float(gains[c, :n].mean())
        result = family_verdicts(means, [p[0] for p in ps], [p[1] for p in ps], scenario.alpha)
        verdicts = result.verdicts
        active = [c for c in active if not leaves_race(verdicts[c])]
        if not active:
            break
    return verdicts, used


def simulate(
    scenario: Scenario, design: Design, replicates: int, seed: int = 0
) -> tuple[Tally, Tally]:
    """``(fixed grid, race)`` tallies over ``replicates`` draws; the same draws feed both, the
    fixed grid at ``design.looks[-1]`` seeds."""
    rng = np.random.default_rng(seed)
    fixed, raced = Tally(), Tally()
    for _ in range(replicates):
        gains, boot = draw_grid(scenario, design.looks[-1], rng)
        for race, tally in ((False, fixed), (True, raced)):
            verdicts, used = decide(scenario, gains, boot, design, race)
            # The baseline runs every seed any cell runs.
            tally.add(scenario, verdicts, sum(used) + max(used), used)
    return fixed, raced
