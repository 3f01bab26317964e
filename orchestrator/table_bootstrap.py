"""The selection table's bootstrap over eval queries (``orchestrator.table``): which
eval ranks are usable, one shared cluster-bootstrap draw over eval images for all runs, so
every comparison is paired query by query, and each cell's bootstrap columns."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from orchestrator import stats

BOOT_COLUMNS = ("boot_low", "boot_high", "boot_gain_low", "boot_gain_high", "p_boot")


class TableBootstrap:
    """The table's bootstrap over eval queries for the FINISHED runs ``finished``: one shared
    draw of ``n_boot`` resamples (``seed``) on the eval set of the baseline (the runs
    ``tagged``), each run's ``metric`` per resample, and the reasons cells get NaN. Intervals
    are percentile intervals at ``confidence``."""

    def __init__(
        self,
        finished: pd.DataFrame,
        metric: str,
        ranks: Mapping[str, Mapping[str, np.ndarray]] | None,
        n_boot: int,
        seed: int,
        tagged: pd.Series,
        confidence: float,
    ) -> None:
        self.confidence = confidence
        self.samples: dict[str, np.ndarray] = {}
        self.eval_set: str | None = None
        self.problems: list[str] = []
        if ranks is None:
            self.problems.append("no eval ranks were loaded")
            return
        if metric not in stats.RANK_METRICS:
            self.problems.append(f"{metric} is not computable from eval ranks")
            return
        usable: dict[str, tuple[str, Mapping[str, np.ndarray]]] = {}
        missing, invalid = [], []
        for run_id in finished["run_id"].astype(str):
            run_ranks = ranks.get(run_id)
            if run_ranks is None:
                missing.append(run_id)
            elif (problem := stats.check_ranks(run_ranks)) is not None:
                invalid.append(f"{run_id}: {problem}")
            else:
                usable[run_id] = (stats.eval_set_id(run_ranks), run_ranks)
        if missing:
            self.problems.append(f"{len(missing)} finished runs have no eval_ranks.npz")
        if invalid:
            self.problems.append(f"{len(invalid)} have unusable ranks ({invalid[0]})")
        if not usable:
            return
        # The baseline's eval set is the reference; runs scored on another one cannot be
        # compared with it query by query.
        base_ids = set(finished.loc[tagged[finished.index], "run_id"].astype(str))
        sets = Counter(s for run_id, (s, _) in usable.items() if run_id in base_ids)
        sets = sets or Counter(s for s, _ in usable.values())
        self.eval_set = sets.most_common(1)[0][0]
        other = sorted({s for s, _ in usable.values() if s != self.eval_set})
        if other:
            count = sum(1 for s, _ in usable.values() if s != self.eval_set)
            self.problems.append(
                f"{count} runs scored another eval set ({other[0]}) than {self.eval_set}"
            )
        reference = next(r for s, r in usable.values() if s == self.eval_set)
        n_images = int(np.asarray(reference["i2t_rank"]).size)
        draw = stats.QueryBootstrap(stats.bootstrap_indices(n_images, n_boot, seed))
        for run_id, (eval_set, run_ranks) in usable.items():
            if eval_set == self.eval_set:
                self.samples[run_id] = draw.metric(run_ranks, metric)

    def note(self) -> str | None:
        """One line saying why some (or all) bootstrap columns are NaN; None when none is."""
        if not self.problems:
            return None
        reasons = "; ".join(self.problems)
        if not self.samples:
            return (
                f"bootstrap over eval queries: {reasons}: every bootstrap column is NaN, so "
                "no row can be better or worse"
            )
        return f"bootstrap over eval queries: {reasons} (their cells' bootstrap columns are NaN)"

    def paired_gain(self, run_id: str, base_id: str) -> np.ndarray | None:
        """The resampled gain run minus baseline run (length B), None when either lacks one."""
        if run_id not in self.samples or base_id not in self.samples:
            return None
        return self.samples[run_id] - self.samples[base_id]

    def cell(
        self, run_ids: Sequence[str], pairs: Sequence[tuple[str, str]], is_baseline: bool
    ) -> dict[str, float]:
        """``BOOT_COLUMNS`` of one cell: the interval of the mean over its finished runs
        ``run_ids``, and the interval and p of the mean paired gain over ``pairs`` (run id,
        baseline run id of the same seed); NaN where a run has no resampled metric."""
        out = dict.fromkeys(BOOT_COLUMNS, np.nan)
        if run_ids and all(r in self.samples for r in run_ids):
            mean = np.mean([self.samples[r] for r in run_ids], axis=0)
            out["boot_low"], out["boot_high"] = stats.percentile_interval(mean, self.confidence)
        if (
            is_baseline
            or not pairs
            or any(a not in self.samples or b not in self.samples for a, b in pairs)
        ):
            return out
        gains = np.mean([self.samples[a] - self.samples[b] for a, b in pairs], axis=0)
        out["boot_gain_low"], out["boot_gain_high"] = stats.percentile_interval(
            gains, self.confidence
        )
        out["p_boot"] = stats.bootstrap_p(gains)
        return out
