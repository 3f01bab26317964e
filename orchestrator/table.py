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

p-values are adjusted across the table's non-baseline rows (Holm by default, or
Benjamini-Hochberg), and a row's verdict is "better" / "worse" only when its paired gain
survives both noises at ``alpha`` with at least two seeds.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from orchestrator import stats
from search_spaces.presets import PairSet, pair_text
from trainers.errors import InputError
from trainers.graph import LEARNING_TYPES, STRATEGIES, is_valid

RECALLS = ("t2i_R1", "t2i_R5", "t2i_R10", "i2t_R1", "i2t_R5", "i2t_R10", "rsum")
FINISHED = "FINISHED"
TableFormat = Literal["md", "csv", "json"]
FORMATS: tuple[str, ...] = ("md", "csv", "json")
VERDICTS = ("baseline", "better", "worse", "open")
GAIN_COLUMNS = ("gain_n", "gain_mean", "gain_std", "gain_ci_low", "gain_ci_high", "p_seed")
BOOT_COLUMNS = ("boot_low", "boot_high", "boot_gain_low", "boot_gain_high", "p_boot")
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
) -> pd.DataFrame:
    """One row per pair set (``params.pair_set`` x ``params.pairs``) of ``runs_frame`` output.

    ``ranks``: ``{run_id: eval ranks}`` (``load_ranks``) for the bootstrap over eval queries;
    None gives NaN bootstrap columns. ``correction``: "holm" (family-wise) or "bh" (false
    discovery rate) across the non-baseline rows; ``alpha``: the level of the verdict;
    ``n_boot`` resamples drawn with ``numpy.random.default_rng(boot_seed)``.

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
    - ``p_seed_adj, p_boot_adj``: adjusted by ``correction``, each family separately, NaN
      p-values not members;
    - ``verdict``: "baseline"; "better" / "worse" when gain_n >= 2, the sign of gain_mean and
      both adjusted p < alpha; "open" otherwise;
    - ``steps`` (the fewest training steps a finished run reached), ``runs``, ``status``.

    Rows: the baseline first, then by ``<metric>_mean`` descending. ``attrs``: ``metric``,
    ``baseline`` (its key or None), ``experiment``, ``correction``, ``alpha``, ``n_boot``,
    ``boot_seed``, ``eval_set`` (what the bootstrap resampled, or None) and ``boot_note``
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
    boot = _Bootstrap(finished, metric, ranks, n_boot, boot_seed, tagged)
    base_done = finished[tagged[finished.index]]
    base_seeds = _by_seed(base_done, column)

    rows = []
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
        row.update(boot.cell(done, by_seed, base_seeds, is_baseline))
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
    family = ~table["is_baseline"]
    for p in ("p_seed", "p_boot"):
        adjusted = np.full(len(table), np.nan)
        adjusted[family.to_numpy()] = stats.adjust_pvalues(table.loc[family, p], correction)
        table[f"{p}_adj"] = adjusted
    table["verdict"] = [_verdict(row, alpha) for row in table.to_dict("records")]
    table = table.sort_values(
        by=["is_baseline", f"{metric}_mean"], ascending=[False, False], na_position="last"
    ).reset_index(drop=True)
    head = ["pair_set", "pairs", "added", "n_added", "is_baseline", "seeds", "used_weight",
            "used_temperature"]  # fmt: skip
    per_metric = [f"{m}_{s}" for m in stat_metrics(metric)
                  for s in ("mean", "std", "ci_low", "ci_high")]  # fmt: skip
    tail = [f"{metric}_by_seed", f"delta_{metric}", *GAIN_COLUMNS, *BOOT_COLUMNS,
            "p_seed_adj", "p_boot_adj", "verdict", "steps", "runs", "status"]  # fmt: skip
    table = table[[*head, *per_metric, *tail]]
    table.attrs.update(
        metric=metric,
        baseline=None if baseline is None else baseline.key(),
        experiment=runs.attrs.get("experiment"),
        correction=correction,
        alpha=alpha,
        n_boot=n_boot,
        boot_seed=boot_seed,
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


def _verdict(row: Mapping[str, Any], alpha: float) -> str:
    if row["is_baseline"]:
        return "baseline"
    if pd.isna(row["gain_n"]) or row["gain_n"] < 2:
        return "open"  # one seed cannot tell a gain from training noise
    significant = row["p_seed_adj"] < alpha and row["p_boot_adj"] < alpha
    if significant and row["gain_mean"] > 0:
        return "better"
    if significant and row["gain_mean"] < 0:
        return "worse"
    return "open"


class _Bootstrap:
    """The table's bootstrap over eval queries: one shared draw, per-run resampled metrics,
    and the reasons cells get NaN (collected into one note line)."""

    def __init__(
        self,
        finished: pd.DataFrame,
        metric: str,
        ranks: Mapping[str, Mapping[str, np.ndarray]] | None,
        n_boot: int,
        seed: int,
        tagged: pd.Series,
    ) -> None:
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
        if not self.problems:
            return None
        reasons = "; ".join(self.problems)
        if not self.samples:
            return (
                f"bootstrap over eval queries: {reasons}: every bootstrap column is NaN, so "
                "no row can be better or worse"
            )
        return f"bootstrap over eval queries: {reasons} (their cells' bootstrap columns are NaN)"

    def cell(
        self,
        done: pd.DataFrame,
        by_seed: Mapping[str, tuple[str, float]],
        base_seeds: Mapping[str, tuple[str, float]],
        is_baseline: bool,
    ) -> dict[str, float]:
        out = dict.fromkeys(BOOT_COLUMNS, np.nan)
        run_ids = list(done["run_id"].astype(str))
        if run_ids and all(r in self.samples for r in run_ids):
            mean = np.mean([self.samples[r] for r in run_ids], axis=0)
            out["boot_low"], out["boot_high"] = stats.percentile_interval(mean, CONFIDENCE)
        seeds = _paired_seeds(by_seed, base_seeds)
        pairs = [(by_seed[s][0], base_seeds[s][0]) for s in seeds]
        if (
            is_baseline
            or not pairs
            or any(a not in self.samples or b not in self.samples for a, b in pairs)
        ):
            return out
        gains = np.mean([self.samples[a] - self.samples[b] for a, b in pairs], axis=0)
        out["boot_gain_low"], out["boot_gain_high"] = stats.percentile_interval(gains, CONFIDENCE)
        out["p_boot"] = stats.bootstrap_p(gains)
        return out


# ------------------------------------------------------------------------------ formats
def _num(value: Any, fmt: str = ".2f") -> str:
    return "" if value is None or pd.isna(value) else format(float(value), fmt)


def _interval(low: Any, high: Any, fmt: str = ".2f") -> str:
    if pd.isna(low) or pd.isna(high):
        return ""
    return f"[{format(float(low), fmt)}, {format(float(high), fmt)}]"


def mean_cell(row: Mapping[str, Any], metric: str) -> str:
    """``mean [low, high]`` (95% over seeds), ``mean (n=1)`` for one seed, ``—`` without runs."""
    mean = row[f"{metric}_mean"]
    if pd.isna(mean):
        return "—"
    if row["seeds"] < 2:
        return f"{mean:.2f} (n=1)"
    return f"{mean:.2f} {_interval(row[f'{metric}_ci_low'], row[f'{metric}_ci_high'])}"


def _gain_cell(row: Mapping[str, Any]) -> str:
    if row["is_baseline"] or pd.isna(row["gain_mean"]):
        return "—"
    if row["gain_n"] < 2:
        return f"{row['gain_mean']:+.2f} (n=1)"
    return f"{row['gain_mean']:+.2f} {_interval(row['gain_ci_low'], row['gain_ci_high'], '+.2f')}"


def _p_text(value: Any) -> str:
    if pd.isna(value):
        return "—"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _p_pair(p_seed: Any, p_boot: Any) -> str:
    return f"{_p_text(p_seed)} / {_p_text(p_boot)}"


def _used_text(value: Any) -> str:
    return "" if pd.isna(value) else f"{value:.3g}"


def format_table(table: pd.DataFrame, fmt: str = "md") -> str:
    """The table as Markdown, CSV or JSON records.

    CSV and JSON carry every column unrounded (NaN as empty / null; ``<metric>_by_seed`` as a
    JSON object). Markdown is the compact view: pair set, added pair, the weight and
    temperature it ran with, n, the metric's mean with its 95% interval over seeds ("n=1" for
    a single seed), the paired gain with its interval over seeds and over eval queries
    (bootstrap), the adjusted p-values (seed / boot), the verdict; then lines that say which
    noise each interval covers, the correction and alpha.
    """
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    metric = table.attrs.get("metric", "rsum")
    by_seed = f"{metric}_by_seed"
    if fmt == "csv":
        flat = table.copy()
        if by_seed in flat:
            flat[by_seed] = [json.dumps(v) for v in flat[by_seed]]
        return flat.to_csv(index=False)
    if fmt == "json":
        return table.to_json(orient="records", indent=2) + "\n"
    header = ["pair set", "added", "weight", "T", "n", f"{metric} [95% CI seeds]",
              "gain vs baseline [95% CI seeds]", "gain [95% CI eval queries]",
              "p adj (seed / boot)", "verdict"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in table.to_dict("records"):
        name = f"**{row['pair_set']}** (baseline)" if row["is_baseline"] else row["pair_set"]
        added = "—" if row["is_baseline"] else f"`{row['added'] or row['pairs']}`"
        n = str(row["seeds"]) if row["status"] == FINISHED else f"{row['seeds']} ({row['status']})"
        p = "" if row["is_baseline"] else _p_pair(row["p_seed_adj"], row["p_boot_adj"])
        verdict = row["verdict"]
        if verdict in ("better", "worse"):
            verdict = f"**{verdict}**"
        boot = _interval(row["boot_gain_low"], row["boot_gain_high"], "+.2f")
        used = [_used_text(row["used_weight"]), _used_text(row["used_temperature"])]
        cells = [name, added, *used, n, mean_cell(row, metric), _gain_cell(row), boot, p, verdict]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *table_notes(table)]
    return "\n".join(lines) + "\n"


def table_notes(table: pd.DataFrame) -> list[str]:
    """The lines under the Markdown table: what each interval covers, the correction, alpha
    and, when some bootstrap columns are NaN, why."""
    metric = table.attrs.get("metric", "rsum")
    correction = {"holm": "Holm (step-down, family-wise)",
                  "bh": "Benjamini-Hochberg (false discovery rate)"}  # fmt: skip
    family = int((~table["is_baseline"]).sum())
    alpha = table.attrs.get("alpha", 0.05)
    eval_set = table.attrs.get("eval_set")
    queries = (
        f"resamples of the eval set's images ({eval_set}) with all their captions"
        if eval_set
        else "resamples of the eval set's images with all their captions"
    )
    notes = [
        "CI seeds: Student t over the cell's finished seeds = training noise (initialisation "
        "+ data order) on a fixed eval set; the gain pairs each seed with the baseline's run "
        "of the same seed.",
        f"CI eval queries: percentile bootstrap, {table.attrs.get('n_boot', stats.DEFAULT_N_BOOT)} "
        f"{queries}, the same resamples for every run = which queries the eval set holds, "
        "trained models fixed.",
        f"p adj: paired t-test over seeds / bootstrap, each adjusted by "
        f"{correction.get(table.attrs.get('correction', 'holm'), '?')} across the {family} "
        f"non-baseline rows; verdict better/worse needs both < {alpha} and >= 2 seeds "
        f"(metric {metric}).",
    ]
    if table.attrs.get("boot_note"):
        notes.append(f"Note: {table.attrs['boot_note']}.")
    return notes


# ------------------------------------------------------------------------------ heatmap
@dataclass(frozen=True)
class HeatmapGrid:
    """What the heatmap draws: ``values`` (LEARNING_TYPES x STRATEGIES, float) holds the gain
    of the set "baseline + exactly that pair" over the baseline: the mean paired gain over
    shared seeds (``gain_mean``), or the unpaired ``delta_<metric>`` where no seed is shared
    (0 on the baseline's own pairs, NaN on invalid cells and cells without a finished run);
    ``labels`` holds the cell texts: the true value ("+1.23", with "*" when its verdict is
    better or worse, and a second line with the paired gain's 95% interval over seeds, or
    "n=<seeds>"), "base", "n/a" or ""; ``significant`` (bool)
    marks better/worse cells; ``halfrange`` is the colour scale's half-width
    (``color_halfrange``)."""

    values: pd.DataFrame
    labels: pd.DataFrame
    significant: pd.DataFrame
    halfrange: float
    metric: str


def color_halfrange(values: np.ndarray | pd.DataFrame) -> float:
    """Half-width of the diverging colour scale for ``values`` (NaN ignored).

    The largest |value|, unless it is more than twice the second largest: then one outlier
    (a collapsed trial, say) would flatten every other cell to white, so the second largest
    is used and the outlier saturates. 1.0 when nothing is nonzero."""
    data = np.abs(np.asarray(values, dtype=float))
    finite = np.sort(data[np.isfinite(data) & (data > 0)])[::-1]
    if finite.size == 0:
        return 1.0
    if finite.size >= 2 and finite[0] > 2 * finite[1]:
        return float(finite[1])
    return float(finite[0])


def _is_default(pair: Any) -> bool:
    # "auto" is the fair-cell default of single_additions, so it counts as the default weight.
    return pair.weight in (1.0, "auto") and pair.temperature is None


def heatmap_grid(table: pd.DataFrame) -> HeatmapGrid:
    """The grid for ``table`` (output of ``selection_table``); InputError without a baseline.

    Where several single-addition rows add the same pair (different weight or temperature),
    the one with the default weight (1 or "auto") and temperature wins, else the first in
    table order."""
    metric = table.attrs.get("metric", "rsum")
    base_key = table.attrs.get("baseline")
    if base_key is None:
        raise InputError("no run is tagged conaclip.baseline=true: the heatmap has no reference")
    baseline = PairSet.parse(base_key)
    values = pd.DataFrame(np.nan, index=list(LEARNING_TYPES), columns=list(STRATEGIES))
    labels = pd.DataFrame("", index=list(LEARNING_TYPES), columns=list(STRATEGIES))
    significant = pd.DataFrame(False, index=list(LEARNING_TYPES), columns=list(STRATEGIES))
    for lt in LEARNING_TYPES:
        for st in STRATEGIES:
            if not is_valid(lt, st):
                labels.loc[lt, st] = "n/a"
            elif f"{lt}:{st}" in baseline.pair_names:
                values.loc[lt, st] = 0.0
                labels.loc[lt, st] = "base"
    singles = table[(table["n_added"] == 1) & (table["seeds"] > 0)]
    chosen: dict[str, dict[str, Any]] = {}
    for row in singles.to_dict("records"):
        added = PairSet.parse(row["added"]).pairs[0]
        default = _is_default(added)
        if added.pair not in chosen or (default and not chosen[added.pair]["default"]):
            chosen[added.pair] = {**row, "default": default}
    for pair, row in chosen.items():
        lt, st = pair.split(":")
        # The paired gain is what the verdict tests; the unpaired delta only where no seed
        # is shared with the baseline.
        delta = row["gain_mean"] if pd.notna(row.get("gain_mean")) else row[f"delta_{metric}"]
        if pd.isna(delta):
            continue
        marked = row.get("verdict") in ("better", "worse")
        values.loc[lt, st] = delta
        significant.loc[lt, st] = marked
        low, high = row.get("gain_ci_low", np.nan), row.get("gain_ci_high", np.nan)
        second = f"n={row['seeds']}"
        if pd.notna(low) and pd.notna(high):
            second = f"[{low:+.1f}, {high:+.1f}]"
        labels.loc[lt, st] = f"{delta:+.2f}{'*' if marked else ''}\n{second}"
    return HeatmapGrid(values=values, labels=labels, significant=significant,
                       halfrange=color_halfrange(values), metric=metric)  # fmt: skip


def heatmap(table: pd.DataFrame, path: str | Path, title: str | None = None) -> HeatmapGrid:
    """Draw ``heatmap_grid(table)`` as a PNG at ``path`` and return the grid drawn.

    Diverging colours centred at 0 (blue = gain, red = loss) over ``grid.halfrange``; values
    beyond it saturate (the colour bar's arrows say so) while labels keep the true values.
    Significant cells (verdict better/worse) get a thick outline and a "*"; invalid
    cells are grey with "n/a"; cells without a run blank."""
    # The Agg canvas is attached explicitly: no pyplot, no process-wide backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import CenteredNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    grid = heatmap_grid(table)
    data = grid.values.to_numpy(dtype=float)
    half_range = grid.halfrange
    norm = CenteredNorm(vcenter=0.0, halfrange=half_range)
    finite = data[np.isfinite(data)]
    saturated = bool(finite.size and np.abs(finite).max() > half_range)

    fig = Figure(figsize=(1.3 * len(STRATEGIES) + 2.2, 0.9 * len(LEARNING_TYPES) + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    cmap = _diverging_cmap()
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
    for i, lt in enumerate(LEARNING_TYPES):
        for j, st in enumerate(STRATEGIES):
            text = grid.labels.loc[lt, st]
            if text == "n/a":
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, color="0.8", zorder=2))
            if grid.significant.loc[lt, st]:
                # Black outside, white inside: visible on dark and light cells alike.
                for inset, colour, width in ((0.47, "black", 3.0), (0.40, "white", 1.2)):
                    ax.add_patch(Rectangle((j - inset, i - inset), 2 * inset, 2 * inset,
                                           fill=False, edgecolor=colour, linewidth=width,
                                           zorder=4))  # fmt: skip
            dark = np.isfinite(data[i, j]) and abs(data[i, j]) > 0.6 * half_range
            ax.text(j, i, text, ha="center", va="center", fontsize=8, zorder=3,
                    fontweight="bold" if grid.significant.loc[lt, st] else "normal",
                    color="white" if dark else "black")  # fmt: skip
    # Cell borders, so a blank cell (no run) reads apart from a near-zero delta.
    ax.set_xticks(np.arange(len(STRATEGIES) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(LEARNING_TYPES) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="0.6", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.set_xticks(range(len(STRATEGIES)), labels=list(STRATEGIES))
    ax.set_yticks(range(len(LEARNING_TYPES)), labels=list(LEARNING_TYPES))
    ax.set_xlabel("strategy")
    ax.set_ylabel("learning type")
    ax.set_title(title or f"Δ {grid.metric} vs baseline (baseline + one pair)")
    fig.text(0.01, 0.01, "* outlined: significant (verdict better/worse); second line: "
             "paired gain, 95% CI over seeds", fontsize=7)  # fmt: skip
    fig.colorbar(image, ax=ax, label=f"Δ {grid.metric}", extend="both" if saturated else "neither")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return grid


def _diverging_cmap() -> Any:
    from matplotlib import colormaps

    return colormaps["RdBu"].with_extremes(bad="white")  # white: cells without a run
