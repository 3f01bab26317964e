"""The strategy-selection table: MLflow runs -> one row per pair set, with its verdict.

Statistics use FINISHED runs only (a failed or running trial's last values are not results);
``seeds`` counts them and ``status`` says what happened to the others. Recalls are percent
(0-100), rsum their sum (0-600). Two noises are measured separately (``orchestrator.stats``):

- over seeds (training noise: initialisation and data order): mean, sample std (ddof=1) and a
  95% Student-t interval per cell, and the *paired* gain: each seed's run minus the baseline's
  run of the same seed (``params.seed``), with its t interval and one-sample t-test;
- over eval queries (which images and captions the eval set holds): a cluster bootstrap over
  eval images from each run's ``eval_ranks.npz``, one shared draw for all runs, so every
  comparison is paired query by query.

Both are shown, and one test carries both (``orchestrator.table_verdict``: the seed spread plus
the cross-seed covariance of the bootstrap gains): its p-values, for "differs from the
baseline" and for "lies within +-margin of it", share one family over the table's
non-baseline rows (Holm with Shaffer's restriction, or Benjamini-Hochberg), and give each row
its verdict: better, worse, equivalent or open.

The bootstrap's cells are ``orchestrator.table_bootstrap``; the table as text is
``orchestrator.table_format``, its single additions as a heatmap ``orchestrator.heatmap``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import stats
from orchestrator.sequential import Design
from orchestrator.table_bootstrap import BOOT_COLUMNS, TableBootstrap
from orchestrator.table_verdict import VERDICT_COLUMNS, PairedCell, verdict_columns
from orchestrator.verdicts import DEFAULT_MARGIN
from search_spaces.presets import PairSet
from trainers.errors import InputError
from trainers.run_config import pair_text

RECALLS = ("t2i_R1", "t2i_R5", "t2i_R10", "i2t_R1", "i2t_R5", "i2t_R10", "rsum")
FINISHED = "FINISHED"
GAIN_COLUMNS = ("gain_n", "gain_mean", "gain_std", "gain_ci_low", "gain_ci_high", "p_seed")
CONFIDENCE = 0.95  # every interval in the table is 95%


def stat_metrics(metric: str) -> tuple[str, ...]:
    """Metrics the table summarises: the recalls, rsum, and ``metric`` if it is another one."""
    return RECALLS if metric in RECALLS else (*RECALLS, metric)


def run_status(runs: pd.DataFrame) -> pd.Series:
    """Each run's status: conaclip's own tag, MLflow's run status where the tag is missing."""
    # The ablation's own tag is the authority (a trial can fail after MLflow marked the run).
    status = runs["status"].astype("string")
    if "tags.conaclip.status" in runs:
        status = runs["tags.conaclip.status"].astype("string").fillna(status)
    return status


def _status_text(statuses: list[str]) -> str:
    counts = Counter(statuses)
    if counts[FINISHED] == len(statuses):
        return FINISHED
    others = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s != FINISHED)
    return f"{counts[FINISHED]}/{len(statuses)} {FINISHED}, {others}"


def _added(pair_set: PairSet, baseline: PairSet | None) -> str | None:
    """Text of the pairs beyond the baseline, "" for the baseline itself, None when the set
    does not contain the baseline (then it is not an addition to it)."""
    if baseline is None or not set(baseline.pairs) <= set(pair_set.pairs):
        return None
    return ",".join(pair_text(p) for p in pair_set.pairs if p not in baseline.pairs)


def _parse_key(key: str, run_id: str) -> PairSet:
    try:
        return PairSet.parse(key)
    except InputError as error:
        raise InputError(f"run {run_id}: params.pairs {key!r}: {error}") from None


def load_ranks(tracking_uri: str, runs: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """``{run_id: eval ranks}`` for the FINISHED trial runs of ``runs`` (``runs_frame``
    output) that logged ``eval_ranks.npz``; runs without it are left out. An unreadable file
    maps to ``{}`` so that ``selection_table`` reports it as invalid instead of failing."""
    from orchestrator import tracking

    if runs.empty or "params.pairs" not in runs:
        return {}
    trials = runs[runs["params.pairs"].notna() & (run_status(runs) == FINISHED)]
    loaded: dict[str, dict[str, np.ndarray]] = {}
    for run_id in trials["run_id"].astype(str):
        try:
            ranks = tracking.read_eval_ranks(tracking_uri, run_id)
        except InputError:
            ranks = {}
        if ranks is not None:
            loaded[run_id] = ranks
    return loaded


def selection_table(
    runs: pd.DataFrame,
    metric: str = "rsum",
    ranks: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    correction: stats.Correction = "holm",
    alpha: float = 0.05,
    n_boot: int = stats.DEFAULT_N_BOOT,
    boot_seed: int = stats.DEFAULT_BOOT_SEED,
    margin: float = DEFAULT_MARGIN,
    design: Design | None = None,
    first_seed: int = 0,
) -> pd.DataFrame:
    """One row per pair set (``params.pair_set`` x ``params.pairs``) of ``runs_frame`` output.

    ``ranks``: ``{run_id: eval ranks}`` (``load_ranks``) for the bootstrap over eval queries;
    None gives NaN bootstrap columns (and no verdict). ``correction``: "holm" (family-wise)
    or "bh" (false discovery rate) across the non-baseline rows; ``alpha``: the level of the
    verdict; ``n_boot`` resamples drawn with ``numpy.random.default_rng(boot_seed)``;
    ``margin``: the equivalence margin D (the metric's units); ``design``: the looks of a
    race (seed counts from ``first_seed``), None for a fixed grid (one look at each cell's
    own seeds).

    Columns (n = the cell's finished runs; intervals 95%):

    - ``pair_set, pairs`` (canonical key), ``added`` (pairs beyond the baseline; "" on the
      baseline row; None when the set lacks the baseline's pairs), ``n_added``,
      ``is_baseline``, ``seeds`` (n);
    - ``used_weight, used_temperature``: on single-addition rows the mean over finished runs
      of the added pair's logged ``weight_<lt>_<st>`` / ``temperature_<lt>_<st>`` (what
      ran, e.g. the weight an ``*auto`` pair was given); NaN when not logged or not a single;
    - for every ``stat_metrics(metric)``: ``<m>_mean, <m>_std, <m>_ci_low, <m>_ci_high``
      (std and interval NaN when n = 1);
    - ``<metric>_by_seed``: ``{seed: value}`` of the finished runs (the latest run per seed);
    - ``delta_<metric>``: mean minus the baseline's mean (NaN without a finished baseline);
    - ``gain_n, gain_mean, gain_std, gain_ci_low, gain_ci_high, p_seed``: the paired gains
      ``g_s = cell_s - baseline_s`` over the seeds both finished (t interval and two-sided
      one-sample t-test p, NaN when gain_n < 2; NA / NaN on the baseline row);
    - ``boot_low, boot_high`` (the mean over the cell's seeds), ``boot_gain_low,
      boot_gain_high, p_boot`` (the mean paired gain): the bootstrap over eval queries, only
      for metrics in ``stats.RANK_METRICS``, NaN where a run lacks usable ranks;
    - ``<metric>_boot_by_seed``: ``{seed: B resampled values}`` of the cell's finished runs
      (the shared draw; empty without ranks): what pairwise comparisons of rows read;
    - the test of both noises at the cell's last look: ``gain_se`` (sqrt of seed part + eval
      part), ``gain_low, gain_high`` (95%), ``eval_share`` (the eval set's share of the
      variance), ``p_diff`` ("gain = 0", two-sided), ``p_equiv`` ("|gain| >= margin", TOST);
      ``p_diff_seq, p_equiv_seq`` over the design's looks (equal to those for a fixed grid),
      ``p_diff_adj, p_equiv_adj`` adjusted over the table's family, ``looks``;
    - ``verdict``: "baseline"; "better" / "worse" when p_diff_adj < alpha (by the gain's
      sign); "equivalent" when not and p_equiv_adj < alpha; "open" otherwise, always with
      fewer than two seeds or without eval ranks; ``verdict_note``: why a row is open;
    - ``steps`` (the fewest training steps a finished run reached), ``runs``, ``status``.

    Rows: the baseline first, then by ``<metric>_mean`` descending. ``attrs``: ``metric``,
    ``baseline`` (its key or None), ``experiment``, ``correction``, ``alpha``, ``n_boot``,
    ``boot_seed``, ``margin``, ``design`` (its text), ``looks`` (a race's seed counts, or
    None), ``first_seed``, ``eval_set`` (what the bootstrap resampled, or None) and
    ``boot_note``
    (one line saying why bootstrap columns are NaN, or None). Runs without ``params.pairs``
    (not trials) are ignored.
    """
    if correction not in stats.CORRECTIONS:
        raise InputError(
            f"--correction {correction}: expected one of {', '.join(stats.CORRECTIONS)}"
        )
    if not 0 < alpha < 1:
        raise InputError(f"--alpha {alpha}: expected a level between 0 and 1")
    if n_boot < 1:
        raise InputError(f"--n-boot {n_boot}: expected at least 1 resample")
    if not (margin > 0 and np.isfinite(margin)):
        raise InputError(f"--margin {margin}: expected a positive gain ({metric} units)")
    column = f"metrics.{metric}"
    if "params.pairs" in runs:
        runs = runs[runs["params.pairs"].notna()]
    if runs.empty:
        raise InputError("no conaclip trial runs to tabulate (no run has a 'pairs' parameter)")
    if column not in runs:
        known = sorted(c.removeprefix("metrics.") for c in runs if c.startswith("metrics."))
        raise InputError(f"--metric {metric}: no run logged it; logged metrics: {known}")
    runs = runs.assign(_status=run_status(runs))
    names = runs["params.pair_set"] if "params.pair_set" in runs else runs["params.pairs"]
    runs = runs.assign(**{"params.pair_set": names.fillna(runs["params.pairs"])})
    baseline = _baseline(runs)
    tagged = _tagged_baseline(runs)

    cells = []
    for (name, key), group in runs.groupby(["params.pair_set", "params.pairs"], sort=False):
        pair_set = _parse_key(str(key), str(group["run_id"].iloc[0]))
        done = group[group["_status"] == FINISHED]
        cells.append((name, pair_set, group, done, bool(tagged[group.index].any())))
    finished = runs[runs["_status"] == FINISHED]
    boot = TableBootstrap(finished, metric, ranks, n_boot, boot_seed, tagged, CONFIDENCE)
    base_done = finished[tagged[finished.index]]
    base_seeds = _by_seed(base_done, column)

    rows = []
    paired_cells: list[PairedCell | None] = []
    for name, pair_set, group, done, is_baseline in cells:
        added = _added(pair_set, baseline)
        row: dict[str, Any] = {
            "pair_set": name,
            "pairs": pair_set.key(),
            "added": added,
            "n_added": None if added is None else len([a for a in added.split(",") if a]),
            "is_baseline": is_baseline,
            "seeds": len(done),
        }
        row.update(_used_settings(pair_set, baseline, done))
        for m in stat_metrics(metric):
            values = done[f"metrics.{m}"].astype(float) if f"metrics.{m}" in done else []
            mean, std, low, high = stats.t_interval(values, CONFIDENCE)
            row.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_ci_low": low,
                        f"{m}_ci_high": high})  # fmt: skip
        by_seed = _by_seed(done, column)
        row[f"{metric}_by_seed"] = {seed: value for seed, (_, value) in by_seed.items()}
        row.update(_gain_columns(by_seed, base_seeds, is_baseline))
        seeds = _paired_seeds(by_seed, base_seeds)
        paired = [(by_seed[s][0], base_seeds[s][0]) for s in seeds]
        row[f"{metric}_boot_by_seed"] = {
            seed: boot.samples[run_id] for seed, (run_id, _) in by_seed.items()
            if run_id in boot.samples
        }  # fmt: skip
        row.update(boot.cell(list(done["run_id"].astype(str)), paired, is_baseline))
        paired_cells.append(None if is_baseline else PairedCell(
            tuple(seeds),
            tuple(by_seed[s][1] - base_seeds[s][1] for s in seeds),
            tuple(boot.paired_gain(a, b) for a, b in paired),
        ))  # fmt: skip
        row["steps"] = _steps(done)
        row["runs"] = len(group)
        row["status"] = _status_text(group["_status"].tolist())
        rows.append(row)

    table = pd.DataFrame(rows)
    table["n_added"] = table["n_added"].astype("Int64")
    table["steps"] = table["steps"].astype("Int64")
    table["gain_n"] = table["gain_n"].astype("Int64")
    base_rows = table[table["is_baseline"]]
    base_mean = base_rows[f"{metric}_mean"].iloc[0] if len(base_rows) else np.nan
    table[f"delta_{metric}"] = table[f"{metric}_mean"] - base_mean
    judged = verdict_columns(table.to_dict("records"), paired_cells, design, first_seed, margin,
                             alpha, correction, CONFIDENCE)  # fmt: skip
    for column in VERDICT_COLUMNS:
        table[column] = [row[column] for row in judged]
    table["looks"] = table["looks"].astype("Int64")
    table = table.sort_values(
        by=["is_baseline", f"{metric}_mean"], ascending=[False, False], na_position="last"
    ).reset_index(drop=True)
    head = ["pair_set", "pairs", "added", "n_added", "is_baseline", "seeds", "used_weight",
            "used_temperature"]  # fmt: skip
    per_metric = [f"{m}_{s}" for m in stat_metrics(metric)
                  for s in ("mean", "std", "ci_low", "ci_high")]  # fmt: skip
    tail = [f"{metric}_by_seed", f"{metric}_boot_by_seed", f"delta_{metric}", *GAIN_COLUMNS,
            *BOOT_COLUMNS, *VERDICT_COLUMNS, "steps", "runs", "status"]  # fmt: skip
    table = table[[*head, *per_metric, *tail]]
    table.attrs.update(
        metric=metric,
        baseline=None if baseline is None else baseline.key(),
        experiment=runs.attrs.get("experiment"),
        correction=correction,
        alpha=alpha,
        n_boot=n_boot,
        boot_seed=boot_seed,
        margin=margin,
        design=design.text if design is not None else "fixed grid: one look at each cell's seeds",
        looks=list(design.looks) if design is not None else None,
        first_seed=first_seed,
        eval_set=boot.eval_set,
        boot_note=boot.note(),
    )
    return table


def _tagged_baseline(runs: pd.DataFrame) -> pd.Series:
    if "tags.conaclip.baseline" not in runs:
        return pd.Series(False, index=runs.index)
    return runs["tags.conaclip.baseline"].astype("string").str.lower().eq("true").fillna(False)


def _baseline(runs: pd.DataFrame) -> PairSet | None:
    tagged = runs[_tagged_baseline(runs)]
    keys = sorted(set(tagged["params.pairs"]))
    if len(keys) > 1:
        raise InputError(
            f"runs tagged conaclip.baseline=true have different pairs ({' | '.join(keys)}); "
            "expected one baseline pair set per experiment"
        )
    return _parse_key(keys[0], str(tagged["run_id"].iloc[0])) if keys else None


def _steps(done: pd.DataFrame) -> float:
    for column in ("metrics.step", "params.steps"):
        if column in done:
            values = pd.to_numeric(done[column], errors="coerce").dropna()
            if len(values):
                return float(values.min())
    return np.nan


def _by_seed(done: pd.DataFrame, column: str) -> dict[str, tuple[str, float]]:
    """``{seed: (run_id, value)}`` of finished runs with a seed and a value. Where a seed ran
    twice (a resumed or repeated trial) the later run counts: rows come in start-time order."""
    if "params.seed" not in done or column not in done:
        return {}
    out: dict[str, tuple[str, float]] = {}
    for run_id, seed, value in zip(done["run_id"], done["params.seed"], done[column], strict=True):
        if pd.notna(seed) and pd.notna(value):
            out[str(seed)] = (str(run_id), float(value))
    return dict(sorted(out.items(), key=lambda item: _seed_order(item[0])))


def _seed_order(seed: str) -> tuple[int, int | str]:
    return (0, int(seed)) if seed.lstrip("-").isdigit() else (1, seed)


def _paired_seeds(
    by_seed: Mapping[str, tuple[str, float]], base_seeds: Mapping[str, tuple[str, float]]
) -> list[str]:
    return [seed for seed in by_seed if seed in base_seeds]


def _gain_columns(
    by_seed: Mapping[str, tuple[str, float]],
    base_seeds: Mapping[str, tuple[str, float]],
    is_baseline: bool,
) -> dict[str, Any]:
    if is_baseline:
        return {"gain_n": pd.NA, **{c: np.nan for c in GAIN_COLUMNS[1:]}}
    gains = [by_seed[s][1] - base_seeds[s][1] for s in _paired_seeds(by_seed, base_seeds)]
    mean, std, low, high = stats.t_interval(gains, CONFIDENCE)
    return {"gain_n": len(gains), "gain_mean": mean, "gain_std": std, "gain_ci_low": low,
            "gain_ci_high": high, "p_seed": stats.t_test_p(gains)}  # fmt: skip


def _used_settings(pair_set: PairSet, baseline: PairSet | None, done: pd.DataFrame) -> dict:
    """Mean logged weight / temperature of the one pair a single-addition row adds."""
    used = {"used_weight": np.nan, "used_temperature": np.nan}
    if baseline is None:
        return used
    extra = [p for p in pair_set.pairs if p not in baseline.pairs]
    if len(extra) != 1 or not set(baseline.pairs) <= set(pair_set.pairs):
        return used
    slug = extra[0].pair.replace(":", "_")
    for field, prefix in (("used_weight", "weight"), ("used_temperature", "temperature")):
        column = f"metrics.{prefix}_{slug}"
        if column in done:
            values = pd.to_numeric(done[column], errors="coerce").dropna()
            if len(values):
                used[field] = float(values.mean())
    return used
