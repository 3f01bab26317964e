"""The selection table (``orchestrator.table.selection_table``) as text: Markdown, CSV or JSON,
and the notes under the Markdown table that say which noise each interval covers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

import pandas as pd

from orchestrator import stats
from orchestrator.table import FINISHED
from trainers.errors import InputError

TableFormat = Literal["md", "csv", "json"]
FORMATS: tuple[str, ...] = ("md", "csv", "json")


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
