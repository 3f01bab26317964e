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


def _p_pair(p_diff: Any, p_equiv: Any) -> str:
    return f"{_p_text(p_diff)} / {_p_text(p_equiv)}"


def _both_cell(row: Mapping[str, Any]) -> str:
    """The gain with its interval over both noises, or what is missing."""
    if row["is_baseline"] or pd.isna(row["gain_mean"]):
        return "—"
    if pd.isna(row["gain_low"]):
        return f"{row['gain_mean']:+.2f}"
    return f"{row['gain_mean']:+.2f} {_interval(row['gain_low'], row['gain_high'], '+.2f')}"


def _share_text(value: Any) -> str:
    return "" if pd.isna(value) else f"{100 * float(value):.0f}%"


def _used_text(value: Any) -> str:
    return "" if pd.isna(value) else f"{value:.3g}"


def format_table(table: pd.DataFrame, fmt: str = "md") -> str:
    """The table as Markdown, CSV or JSON records.

    CSV and JSON carry every column unrounded (NaN as empty / null; ``<metric>_by_seed`` as a
    JSON object; the per-run bootstrap resamples are left out). Markdown is the compact view:
    pair set, added pair, the weight and temperature it ran with, n, the metric's mean with
    its 95% interval over seeds ("n=1" for a single seed), the paired gain with its interval
    over seeds alone and over both noises, the eval set's share of that interval's variance,
    the adjusted p-values (differs / within the margin), the verdict; then lines that say
    what each interval covers, the margin, the design, the correction and alpha.
    """
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    metric = table.attrs.get("metric", "rsum")
    by_seed = f"{metric}_by_seed"
    table = table.drop(columns=[f"{metric}_boot_by_seed"], errors="ignore")
    if fmt == "csv":
        flat = table.copy()
        if by_seed in flat:
            flat[by_seed] = [json.dumps(v) for v in flat[by_seed]]
        return flat.to_csv(index=False)
    if fmt == "json":
        return table.to_json(orient="records", indent=2) + "\n"
    margin = _num(table.attrs.get("margin"), "g")
    header = ["pair set", "added", "weight", "T", "n", f"{metric} [95% CI seeds]",
              "gain vs baseline [95% CI seeds]", "gain [95% CI seeds + eval set]",
              "eval share", f"p adj (differs / within ±{margin})", "verdict"]  # fmt: skip
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in table.to_dict("records"):
        name = f"**{row['pair_set']}** (baseline)" if row["is_baseline"] else row["pair_set"]
        added = "—" if row["is_baseline"] else f"`{row['added'] or row['pairs']}`"
        n = str(row["seeds"]) if row["status"] == FINISHED else f"{row['seeds']} ({row['status']})"
        p = "" if row["is_baseline"] else _p_pair(row["p_diff_adj"], row["p_equiv_adj"])
        verdict = row["verdict"]
        if verdict in ("better", "worse", "equivalent"):
            verdict = f"**{verdict}**"
        elif row.get("verdict_note"):
            verdict = f"{verdict} ({row['verdict_note']})"
        used = [_used_text(row["used_weight"]), _used_text(row["used_temperature"])]
        share = "" if row["is_baseline"] else _share_text(row["eval_share"])
        cells = [name, added, *used, n, mean_cell(row, metric), _gain_cell(row),
                 _both_cell(row), share, p, verdict]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *table_notes(table)]
    return "\n".join(lines) + "\n"


def table_notes(table: pd.DataFrame) -> list[str]:
    """The lines under the Markdown table: what each interval covers, the margin, the
    design, the correction, alpha and, when some bootstrap columns are NaN, why."""
    metric = table.attrs.get("metric", "rsum")
    correction = {"holm": "Holm with Shaffer's restriction (family-wise)",
                  "bh": "Benjamini-Hochberg (false discovery rate)"}  # fmt: skip
    family = int((~table["is_baseline"]).sum())
    alpha = table.attrs.get("alpha", 0.05)
    margin = _num(table.attrs.get("margin"), "g")
    eval_set = table.attrs.get("eval_set")
    queries = (
        f"resamples of the eval set's images ({eval_set}) with all their captions"
        if eval_set
        else "resamples of the eval set's images with all their captions"
    )
    notes = [
        "CI seeds: Student t over the paired per-seed gains (each seed's run minus the "
        "baseline's run of the same seed) = training noise (initialisation + data order) on "
        "a fixed eval set.",
        "CI seeds + eval set: the same gain's interval when the eval set is a draw too: the "
        "seeds' spread plus the cross-seed covariance of the gains under "
        f"{table.attrs.get('n_boot', stats.DEFAULT_N_BOOT)} {queries} (the same resamples "
        "for every run); eval share = that covariance's part of the variance.",
        f'p adj: that one test, "differs from 0" and "lies within ±{margin} {metric}" '
        f"(TOST), in one family of the {family} non-baseline rows, "
        f"{correction.get(table.attrs.get('correction', 'holm'), '?')}; "
        f"{table.attrs.get('design', 'fixed grid')}. Verdict at {alpha}: better / worse "
        f"(differs), equivalent (within ±{margin}, not shown to differ), open; >= 2 seeds "
        "and eval ranks needed.",
    ]
    if table.attrs.get("boot_note"):
        notes.append(f"Note: {table.attrs['boot_note']}.")
    return notes
