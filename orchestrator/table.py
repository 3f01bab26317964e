"""The strategy-selection table: MLflow runs -> one row per pair set, deltas vs the baseline.

Statistics use FINISHED runs only (a failed or running trial's last values are not results);
``seeds`` counts them and ``status`` says what happened to the others. Standard deviations are
sample std over seeds (ddof=1), 0 for a single seed. Recalls are percent (0-100), rsum their
sum (0-600).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from search_spaces.presets import PairSet, pair_text
from trainers.errors import InputError
from trainers.graph import LEARNING_TYPES, STRATEGIES, is_valid

RECALLS = ("t2i_R1", "t2i_R5", "t2i_R10", "i2t_R1", "i2t_R5", "i2t_R10", "rsum")
FINISHED = "FINISHED"
TableFormat = Literal["md", "csv", "json"]
FORMATS: tuple[str, ...] = ("md", "csv", "json")


def stat_metrics(metric: str) -> tuple[str, ...]:
    """Metrics the table summarises: the recalls, rsum, and ``metric`` if it is another one."""
    return RECALLS if metric in RECALLS else (*RECALLS, metric)


def _run_status(runs: pd.DataFrame) -> pd.Series:
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


def selection_table(runs: pd.DataFrame, metric: str = "rsum") -> pd.DataFrame:
    """One row per pair set (``params.pair_set`` x ``params.pairs``) of ``runs_frame`` output.

    Columns: ``pair_set, pairs`` (canonical key), ``added`` (pairs beyond the baseline; "" on
    the baseline row; None when the set lacks the baseline's pairs), ``n_added``,
    ``is_baseline``, ``seeds`` (finished runs), ``<m>_mean, <m>_std`` for every
    ``stat_metrics(metric)``, ``delta_<metric>`` (mean minus the baseline's mean; NaN without a
    finished baseline), ``steps`` (the fewest training steps a finished run reached), ``runs``,
    ``status``. Rows: the baseline first, then by ``<metric>_mean`` descending.
    ``attrs``: ``metric``, ``baseline`` (its key or None), ``experiment`` when ``runs`` had one.
    Runs without ``params.pairs`` (not trials) are ignored.
    """
    column = f"metrics.{metric}"
    if "params.pairs" in runs:
        runs = runs[runs["params.pairs"].notna()]
    if runs.empty:
        raise InputError("no conaclip trial runs to tabulate (no run has a 'pairs' parameter)")
    if column not in runs:
        known = sorted(c.removeprefix("metrics.") for c in runs if c.startswith("metrics."))
        raise InputError(f"--metric {metric}: no run logged it; logged metrics: {known}")
    runs = runs.assign(_status=_run_status(runs))
    names = runs["params.pair_set"] if "params.pair_set" in runs else runs["params.pairs"]
    runs = runs.assign(**{"params.pair_set": names.fillna(runs["params.pairs"])})
    baseline = _baseline(runs)
    tagged = _tagged_baseline(runs)

    rows = []
    for (name, key), group in runs.groupby(["params.pair_set", "params.pairs"], sort=False):
        pair_set = _parse_key(str(key), str(group["run_id"].iloc[0]))
        done = group[group["_status"] == FINISHED]
        added = _added(pair_set, baseline)
        row: dict[str, Any] = {
            "pair_set": name,
            "pairs": pair_set.key(),
            "added": added,
            "n_added": None if added is None else len([a for a in added.split(",") if a]),
            "is_baseline": bool(tagged[group.index].any()),
            "seeds": len(done),
        }
        for m in stat_metrics(metric):
            values = done[f"metrics.{m}"].astype(float) if f"metrics.{m}" in done else None
            row[f"{m}_mean"] = values.mean() if values is not None and len(done) else np.nan
            row[f"{m}_std"] = (
                np.nan
                if values is None or len(done) == 0
                else 0.0
                if len(done) == 1
                else values.std(ddof=1)
            )
        row["steps"] = _steps(done)
        row["runs"] = len(group)
        row["status"] = _status_text(group["_status"].tolist())
        rows.append(row)

    table = pd.DataFrame(rows)
    table["n_added"] = table["n_added"].astype("Int64")
    table["steps"] = table["steps"].astype("Int64")
    base_rows = table[table["is_baseline"]]
    base_mean = base_rows[f"{metric}_mean"].iloc[0] if len(base_rows) else np.nan
    table[f"delta_{metric}"] = table[f"{metric}_mean"] - base_mean
    table = table.sort_values(
        by=["is_baseline", f"{metric}_mean"], ascending=[False, False], na_position="last"
    ).reset_index(drop=True)
    order = [c for c in table.columns if c not in ("steps", "runs", "status")]
    table = table[[*order, "steps", "runs", "status"]]
    table.attrs.update(
        metric=metric,
        baseline=None if baseline is None else baseline.key(),
        experiment=runs.attrs.get("experiment"),
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


# ------------------------------------------------------------------------------ formats
def _mean_std(mean: float, std: float) -> str:
    return "—" if pd.isna(mean) else f"{mean:.2f} ± {std:.2f}"


def format_table(table: pd.DataFrame, fmt: str = "md") -> str:
    """The table as Markdown ("mean ± std" cells, 2 decimals), CSV or JSON records (numbers
    unrounded, separate ``_mean`` / ``_std`` columns, NaN as empty / null)."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return table.to_json(orient="records", indent=2) + "\n"
    metric = table.attrs.get("metric", "rsum")
    delta = f"delta_{metric}"
    header = ["pair set", "pairs", "seeds"]
    header += [m.replace("_R", " R@") for m in stat_metrics(metric)]
    header += [f"Δ {metric}", "steps", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        name = f"**{row['pair_set']}** (baseline)" if row["is_baseline"] else row["pair_set"]
        cells = [name, f"`{row['pairs']}`", str(row["seeds"])]
        cells += [_mean_std(row[f"{m}_mean"], row[f"{m}_std"]) for m in stat_metrics(metric)]
        cells.append("" if pd.isna(row[delta]) else f"{row[delta]:+.2f}")
        cells.append("" if pd.isna(row["steps"]) else str(row["steps"]))
        cells.append(row["status"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ heatmap
@dataclass(frozen=True)
class HeatmapGrid:
    """What the heatmap draws: ``values`` (LEARNING_TYPES x STRATEGIES, float) holds the delta
    of the set "baseline + exactly that pair" (0 on the baseline's own pairs, NaN on invalid
    cells and cells without a finished run); ``labels`` holds the cell texts: the delta
    ("+1.23", with "±std" on a second line when several seeds), "base", "n/a" or ""."""

    values: pd.DataFrame
    labels: pd.DataFrame
    metric: str


def heatmap_grid(table: pd.DataFrame) -> HeatmapGrid:
    """The grid for ``table`` (output of ``selection_table``); InputError without a baseline.

    Where several single-addition rows add the same pair (different weight or temperature),
    the one with default weight and temperature wins, else the first in table order."""
    metric = table.attrs.get("metric", "rsum")
    base_key = table.attrs.get("baseline")
    if base_key is None:
        raise InputError("no run is tagged conaclip.baseline=true: the heatmap has no reference")
    baseline = PairSet.parse(base_key)
    values = pd.DataFrame(np.nan, index=list(LEARNING_TYPES), columns=list(STRATEGIES))
    labels = pd.DataFrame("", index=list(LEARNING_TYPES), columns=list(STRATEGIES))
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
        default = added.weight == 1.0 and added.temperature is None
        if added.pair not in chosen or (default and not chosen[added.pair]["default"]):
            chosen[added.pair] = {**row, "default": default}
    for pair, row in chosen.items():
        lt, st = pair.split(":")
        delta, std = row[f"delta_{metric}"], row[f"{metric}_std"]
        if pd.isna(delta):
            continue
        values.loc[lt, st] = delta
        labels.loc[lt, st] = f"{delta:+.2f}" + (f"\n±{std:.2f}" if row["seeds"] > 1 else "")
    return HeatmapGrid(values=values, labels=labels, metric=metric)


def heatmap(table: pd.DataFrame, path: str | Path, title: str | None = None) -> HeatmapGrid:
    """Draw ``heatmap_grid(table)`` as a PNG at ``path`` and return the grid drawn.

    Diverging colours centred at 0 (blue = gain, red = loss), symmetric around the largest
    absolute delta; invalid cells grey with "n/a"; cells without a run blank."""
    # The Agg canvas is attached explicitly: no pyplot, no process-wide backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import CenteredNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    grid = heatmap_grid(table)
    data = grid.values.to_numpy(dtype=float)
    finite = np.abs(data[np.isfinite(data)])
    half_range = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    norm = CenteredNorm(vcenter=0.0, halfrange=half_range)

    fig = Figure(figsize=(1.3 * len(STRATEGIES) + 2.2, 0.9 * len(LEARNING_TYPES) + 1.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    cmap = _diverging_cmap()
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
    for i, lt in enumerate(LEARNING_TYPES):
        for j, st in enumerate(STRATEGIES):
            text = grid.labels.loc[lt, st]
            if text == "n/a":
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, color="0.8", zorder=2))
            dark = np.isfinite(data[i, j]) and abs(data[i, j]) > 0.6 * half_range
            ax.text(j, i, text, ha="center", va="center", fontsize=9, zorder=3,
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
    fig.colorbar(image, ax=ax, label=f"Δ {grid.metric}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return grid


def _diverging_cmap() -> Any:
    from matplotlib import colormaps

    return colormaps["RdBu"].with_extremes(bad="white")  # white: cells without a run
