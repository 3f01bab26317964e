"""The selection table's single additions as a learning type x strategy heatmap: the grid
(``heatmap_grid``, values and labels) and its PNG (``heatmap``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from search_spaces.presets import PairSet
from trainers.errors import InputError
from trainers.graph import LEARNING_TYPES, STRATEGIES, is_valid


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
