"""A grid recorded compactly, so its table and verdict can be re-derived anywhere without
training: ``conaclip table --from DIR`` and ``conaclip best --from DIR``.

A record is a folder of three files:

- ``runs.csv``: one row per trial run in ``tracking.runs_frame``'s layout, with the columns the
  table reads (pair set, pairs, seed, status, baseline tag, the recalls, the added pair's
  weight and temperature, steps) and the run's config hash (its ``params.*`` digest);
- ``ranks.npz``: every finished run's per-query ranks (``eval_ranks.npz`` arrays), compressed.
  Ranks are kept up to 10, the largest K a recall is taken at: a query ranked at 10 or below
  hits at no K <= 10, so beyond that its exact rank changes nothing the table computes;
- ``grid.json``: the experiment's name, its conaclip tags (a race's design and margin), and
  where the record came from.

``read_record`` gives back the runs frame and ranks that ``orchestrator.table.selection_table``
takes, so a recorded grid gives the same table as its MLflow store (checked by the tests).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainers.errors import InputError

RUNS_FILE, RANKS_FILE, META_FILE = "runs.csv", "ranks.npz", "grid.json"
RANK_CAP = 10  # ranks at or beyond the largest recall K all mean "no hit"
KEPT_METRICS = ("t2i_R1", "t2i_R5", "t2i_R10", "i2t_R1", "i2t_R5", "i2t_R10", "rsum",
                "mean_recall", "step")  # fmt: skip
KEPT_COLUMNS = ("run_id", "run_name", "status", "start_time", "end_time")
KEPT_TAGS = ("conaclip.status", "conaclip.baseline", "conaclip.round", "conaclip.preset")


def _config_hash(row: pd.Series) -> str:
    params = {k: row[k] for k in sorted(row.index) if k.startswith("params.") and pd.notna(row[k])}
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def write_record(
    runs: pd.DataFrame, ranks: dict[str, dict[str, np.ndarray]], folder: str | Path
) -> Path:
    """Write ``runs`` (``runs_frame`` output of one experiment) and their ``ranks``
    (``table.load_ranks``) to ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keep = [c for c in KEPT_COLUMNS if c in runs]
    keep += [c for c in runs if c.startswith("params.")]
    keep += [f"tags.{t}" for t in KEPT_TAGS if f"tags.{t}" in runs]
    keep += [c for c in runs if c.startswith("metrics.") and (
        c.removeprefix("metrics.") in KEPT_METRICS
        or c.startswith(("metrics.weight_", "metrics.temperature_")))]  # fmt: skip
    frame = runs[keep].copy()
    frame["config_hash"] = [_config_hash(row) for _, row in runs.iterrows()]
    frame.to_csv(folder / RUNS_FILE, index=False)
    arrays: dict[str, np.ndarray] = {}
    for run_id, run_ranks in ranks.items():
        for name, values in run_ranks.items():
            values = np.asarray(values)
            if name in ("t2i_rank", "i2t_rank"):
                values = np.minimum(values, RANK_CAP).astype(np.uint8)
            elif name == "text_to_image":
                values = values.astype(np.int32)
            else:
                values = np.minimum(values, np.iinfo(np.uint16).max).astype(np.uint16)
            arrays[f"{run_id}/{name}"] = values
    np.savez_compressed(folder / RANKS_FILE, **arrays)
    tags = runs.attrs.get("experiment_tags", {})
    meta = {"experiment": runs.attrs.get("experiment"), "experiment_tags": tags,
            "source": runs.attrs.get("tracking_uri")}  # fmt: skip
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def read_record(folder: str | Path) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """The runs frame (``attrs``: experiment, its tags, ``tracking_uri`` None) and ranks of a
    record. InputError naming the file when one is missing or not a record."""
    folder = Path(folder)
    for name in (RUNS_FILE, RANKS_FILE, META_FILE):
        if not (folder / name).is_file():
            raise InputError(f"{folder}: no {name}; expected a grid record (conaclip table "
                             "--record DIR writes one)")  # fmt: skip
    try:
        runs = pd.read_csv(folder / RUNS_FILE, dtype=str, keep_default_na=False)
        meta = json.loads((folder / META_FILE).read_text())
        packed = np.load(folder / RANKS_FILE)
    except (ValueError, OSError) as error:
        raise InputError(f"{folder}: unreadable grid record ({error})") from None
    runs = runs.replace("", np.nan)
    for column in runs:
        if column.startswith("metrics."):
            runs[column] = pd.to_numeric(runs[column])
    for column in ("start_time", "end_time"):
        if column in runs:
            runs[column] = pd.to_datetime(runs[column], utc=True, format="mixed")
    ranks: dict[str, dict[str, np.ndarray]] = {}
    for key in packed.files:
        run_id, name = key.split("/", 1)
        ranks.setdefault(run_id, {})[name] = packed[key].astype(np.int64)
    runs.attrs.update(experiment=meta.get("experiment"), tracking_uri=None,
                      experiment_tags=meta.get("experiment_tags", {}))  # fmt: skip
    return runs, ranks


def record_summary(folder: str | Path) -> dict[str, Any]:
    """Sizes and counts of a record, for its provenance."""
    folder = Path(folder)
    runs, ranks = read_record(folder)
    return {"runs": len(runs), "runs_with_ranks": len(ranks),
            "bytes": {f.name: f.stat().st_size for f in sorted(folder.iterdir())}}  # fmt: skip
