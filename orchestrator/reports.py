"""An ablation's reports, read from its MLflow runs: the table (with its heatmap), the best
pair set with the combined recipe, and the recipe's verification run.

Each function takes where the runs are (``ReportSource``) and how to compare them
(``TableOptions``), writes its files under ``<out>/reports/<experiment>/`` (also logged to the
experiment's own MLflow run) and returns what to show as text, so `conaclip table` / `best`
and `conaclip demo` print the same thing. Bad input raises ``InputError``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator import (
    grid_record,
    heatmap,
    run_params,
    selection,
    stats,
    table,
    table_format,
    tracking,
)
from orchestrator.ablation import AblationOutcome
from orchestrator.ablation_spec import AblationSpec, pair_sets_by_name
from orchestrator.cli_flags import DEFAULT_ABLATION_OUT
from orchestrator.sequential import Design
from orchestrator.verdicts import DEFAULT_MARGIN
from search_spaces.presets import PairSet
from trainers.errors import InputError


@dataclass(frozen=True)
class ReportSource:
    """Which ablation's runs: ``experiment`` (None: the newest ablation) in the store at
    ``tracking_uri`` (None: the sqlite store under ``out``), or a grid ``record`` folder
    (``orchestrator.grid_record``) instead of a store; reports go under ``out``."""

    out: Path = DEFAULT_ABLATION_OUT
    experiment: str | None = None
    tracking_uri: str | None = None
    record: Path | None = None


@dataclass(frozen=True)
class TableOptions:
    """How pair sets are compared: by ``metric``, with ``correction`` across the table's rows
    at level ``alpha``, ``n_boot`` bootstrap resamples of the eval queries and the
    equivalence ``margin`` (None: the margin a race recorded on the experiment, else
    ``verdicts.DEFAULT_MARGIN``)."""

    metric: str = "rsum"
    correction: str = "holm"
    alpha: float = 0.05
    n_boot: int = stats.DEFAULT_N_BOOT
    margin: float | None = None


@dataclass(frozen=True)
class Selection:
    """The runs of one experiment and their selection table."""

    runs: pd.DataFrame
    table: pd.DataFrame
    notes: tuple[str, ...] = ()  # for stderr: why some bootstrap columns are NaN

    @property
    def experiment(self) -> str:
        return str(self.runs.attrs["experiment"])

    @property
    def tracking_uri(self) -> str | None:
        """The store the runs came from; None for a grid record (nothing is logged back)."""
        uri = self.runs.attrs.get("tracking_uri")
        return None if uri is None else str(uri)


@dataclass(frozen=True)
class TableReport:
    text: str  # the table in the requested format, as written to table.<format>
    written: tuple[Path, ...]  # files written and logged to MLflow
    notes: tuple[str, ...] = ()  # for stderr


@dataclass(frozen=True)
class BestReport:
    text: str  # the winner (or why none), then the combined recipe as YAML
    selection: Selection
    recipe: PairSet | None = None  # None when the experiment has no baseline run
    notes: tuple[str, ...] = ()  # for stderr


@dataclass(frozen=True)
class Verification:
    spec: AblationSpec  # the ablation that ran the recipe
    outcome: AblationOutcome
    text: str | None  # the recipe's paired gain; None when no run of it finished
    notes: tuple[str, ...] = ()


def report_dir(out: Path, experiment: str) -> Path:
    """``<out>/reports/<experiment>/``, the experiment made file-name safe."""
    return out / "reports" / tracking.safe_name(experiment)


def source_runs(source: ReportSource) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """``(runs, ranks)`` of ``source``: a grid record's runs and their eval ranks, or a store's
    ``runs_frame`` (its ``attrs["tracking_uri"]`` says where) and None, the ranks being in the
    store. InputError for a store or record that is not there."""
    if source.record is not None:
        return grid_record.read_record(source.record)
    uri = source.tracking_uri or tracking.default_tracking_uri(source.out)
    tracking.check_tracking_uri(uri, must_exist=True)
    return tracking.runs_frame(uri, source.experiment), None


def read_selection(source: ReportSource, options: TableOptions) -> Selection:
    """The runs of ``source`` and their selection table, the eval ranks of the runs loaded for
    the bootstrap. InputError for a store that is not there or bad options."""
    if options.n_boot < 1:
        raise InputError(f"--n-boot {options.n_boot}: expected at least 1 resample")
    runs, ranks = source_runs(source)
    return _selection_of(runs, options, ranks)


def record_grid(source: ReportSource, folder: Path) -> Path:
    """Write the runs of ``source`` and their eval ranks as a grid record in ``folder``."""
    uri = source.tracking_uri or tracking.default_tracking_uri(source.out)
    tracking.check_tracking_uri(uri, must_exist=True)
    runs = tracking.runs_frame(uri, source.experiment)
    return grid_record.write_record(runs, table.load_ranks(uri, runs), folder)


def _selection_of(
    runs: pd.DataFrame, options: TableOptions, ranks: dict[str, Any] | None = None
) -> Selection:
    """The table of ``runs``; for a race's experiment, under the race's design (its looks,
    first seed and margin), so the table gives the verdicts the race took. ``ranks``: the
    runs' eval ranks (None: read from the runs' store)."""
    if ranks is None:
        ranks = table.load_ranks(runs.attrs["tracking_uri"], runs)
    race = tracking.race_of(runs)
    notes: list[str] = []
    design, first_seed, margin = None, 0, options.margin
    if race is not None:
        design = Design.race(race["start_seeds"], race["max_seeds"], race["spending"])
        first_seed = int(race["first_seed"])
        if margin is None:
            margin = float(race["margin"])
        elif margin != float(race["margin"]):
            notes.append(
                f"the race decided its cells at margin ±{race['margin']:g}; this table uses "
                f"±{margin:g}, so its equivalent verdicts are not the race's"
            )
    result = table.selection_table(
        runs,
        options.metric,
        ranks=ranks,
        correction=options.correction,
        alpha=options.alpha,
        n_boot=options.n_boot,
        margin=DEFAULT_MARGIN if margin is None else margin,
        design=design,
        first_seed=first_seed,
    )
    note = result.attrs.get("boot_note")
    return Selection(runs, result, (*notes, *((note,) if note else ())))


def table_report(source: ReportSource, options: TableOptions, fmt: str = "md") -> TableReport:
    """The table as ``fmt`` text, written to ``table.<fmt>`` with the heatmap (when there is a
    baseline) and both logged to the experiment's MLflow run."""
    chosen = read_selection(source, options)
    result, experiment = chosen.table, chosen.experiment
    text = table_format.format_table(result, fmt)
    folder = report_dir(source.out, experiment)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / f"table.{fmt}"]
    written[0].write_text(text)
    notes = list(chosen.notes)
    if result.attrs.get("baseline") is not None:
        written.append(folder / "heatmap.png")
        heatmap.heatmap(result, written[1], title=f"{experiment}: Δ {options.metric} vs baseline")
    else:
        notes.append("no baseline run in this experiment: no heatmap")
    for path in written:
        if chosen.tracking_uri is None:
            notes.append(f"wrote {path}")
            continue
        tracking.log_summary_artifact(chosen.tracking_uri, experiment, path)
        notes.append(f"wrote {path} (logged to MLflow)")
    if chosen.tracking_uri is not None:
        tracking.record_margin(chosen.tracking_uri, experiment, result.attrs["margin"])
    return TableReport(text, tuple(written), tuple(notes))


def _interval(row: pd.Series, low: str, high: str) -> str:
    if pd.isna(row[low]) or pd.isna(row[high]):
        return "n/a"
    return f"[{row[low]:.2f}, {row[high]:.2f}]"


def _numbers(row: pd.Series, metric: str) -> list[str]:
    """The row's numbers: recalls as mean [95% CI over seeds], the metric, its paired gain."""

    def mean_ci(name: str) -> str:
        return table_format.mean_cell(row, name).replace("—", "n/a")

    lines = [
        f"  pairs: {row['pairs']}",
        f"  seeds: {row['seeds']}  steps: {row['steps']}  status: {row['status']}",
    ]
    used = [
        f"{label} {row[column]:.3g}"
        for label, column in (("weight", "used_weight"), ("temperature", "used_temperature"))
        if pd.notna(row.get(column))
    ]
    if used:
        lines.append(f"  the added pair ran with {', '.join(used)}")
    boot = f"(eval-query bootstrap {_interval(row, 'boot_low', 'boot_high')})"
    lines += [
        "  t2i R@1/5/10: " + " / ".join(mean_ci(f"t2i_R{k}") for k in (1, 5, 10)),
        "  i2t R@1/5/10: " + " / ".join(mean_ci(f"i2t_R{k}") for k in (1, 5, 10)),
        f"  rsum: {mean_ci('rsum')}" + (f"  {boot}" if metric == "rsum" else ""),
    ]
    if metric != "rsum":
        lines.append(f"  {metric}: {mean_ci(metric)}  {boot}")
    if not row["is_baseline"]:
        lines.append(f"  gain vs baseline (paired by seed): {selection.gain_text(row, metric)}")
        note = f"; {row['verdict_note']}" if row.get("verdict_note") else ""
        lines.append(f"  verdict: {row['verdict']} ({selection.p_text(row)}{note})")
    return lines


def _choice_lines(result: pd.DataFrame, metric: str) -> list[str]:
    choice = selection.choose(result, metric)
    if choice.winner is not None:
        return [
            f"best pair set by {metric}: {choice.winner['pair_set']}",
            *_numbers(choice.winner, metric),
            f"  why: {choice.reason}",
        ]
    headline = (
        "none stands out among the better rows"
        if choice.rivals
        else "none is significantly better than the baseline"
    )
    lines = [
        f"best pair set by {metric}: {headline}",
        choice.reason[0].upper() + choice.reason[1:],
    ]
    if choice.leading is not None:
        lines += [f"leading candidate: {choice.leading['pair_set']}"]
        lines += _numbers(choice.leading, metric)
    return lines


def best_report(source: ReportSource, options: TableOptions) -> BestReport:
    """The winning pair set (or why none wins, with the leading candidate) and the combined
    recipe, which is written to ``recipe.yaml`` and logged to the experiment's MLflow run."""
    chosen = read_selection(source, options)
    result, runs = chosen.table, chosen.runs
    lines = _choice_lines(result, options.metric)
    if result.attrs.get("baseline") is None:
        note = "no baseline run in this experiment: no combined recipe"
        return BestReport("\n".join(lines) + "\n", chosen, None, (*chosen.notes, note))
    opened = selection.open_rows_text(result)
    if opened:
        lines += ["", *opened]
    recipe = selection.combined_recipe(result, options.metric)
    text = selection.recipe_yaml(recipe, selection.common_settings(runs, list(recipe.pairs)))
    folder = report_dir(source.out, chosen.experiment)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(text)
    # The recipe joins the table and heatmap on the ablation's own MLflow run.
    if chosen.tracking_uri is not None:
        tracking.log_summary_artifact(
            chosen.tracking_uri, chosen.experiment, folder / "recipe.yaml"
        )
    base = result.attrs["baseline"]
    if recipe.key() == base:
        lines.append(
            f"\ncombined recipe: the baseline alone ({base}); no single addition has a "
            "significant gain"
        )
    else:
        lines.append(
            f"\ncombined recipe (baseline + every single addition whose gain is significant):"
            f" {recipe.key()}"
        )
    lines.append(f"# conaclip ablate --config {folder / 'recipe.yaml'}")
    return BestReport("\n".join(lines) + "\n" + text, chosen, recipe, chosen.notes)


def seeds_of_baseline(result: pd.DataFrame) -> list[int]:
    """The ``params.seed`` values of the baseline's finished runs (from the table), ascending."""
    base = result[result["is_baseline"]]
    by_seed = base[f"{result.attrs['metric']}_by_seed"].iloc[0] if len(base) else {}
    seeds = sorted(int(s) for s in by_seed if s.lstrip("-").isdigit())
    if not seeds:
        raise InputError("best --verify: no finished baseline run with a seed param to repeat")
    return seeds


def verification_spec(chosen: Selection, recipe: PairSet, out: Path) -> AblationSpec:
    """The recipe as more trials of the same ablation: the setting every run shares, read back
    from their MLflow params (same data, teacher, student and budget), with the SAME seeds as
    the baseline so that its gain is paired seed by seed. InputError when the runs differ in
    a setting."""
    shared: dict[str, str] = {}
    for name, values in run_params.setting_values(chosen.runs).items():
        if len(values) > 1:
            raise InputError(f"best --verify: the runs do not share one {name} param ({values})")
        if values:
            shared[name] = values.pop()
    experiment = chosen.experiment
    return AblationSpec(
        name=f"{experiment}-verify",
        experiment=experiment,
        preset="verify",
        pair_sets=pair_sets_by_name([recipe]),
        seeds=seeds_of_baseline(chosen.table),
        run=run_params.run_from_params(shared, list(recipe.pairs)),
        scaling=run_params.scaling_from_params(shared),
        out_dir=str(out.resolve()),
        tracking_uri=chosen.tracking_uri,
    )


def verify_recipe(
    best: BestReport,
    source: ReportSource,
    options: TableOptions,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Verification:
    """Run ``best``'s recipe (``verification_spec``) on a local Ray cluster, then re-read the
    table and give the recipe row's paired gain with its intervals."""
    from orchestrator.ablation import run_ablation
    from orchestrator.ray_cluster import init_ray

    if best.recipe is None:
        raise InputError("best --verify: the experiment has no baseline run, so no recipe")
    recipe = best.recipe
    spec = verification_spec(best.selection, recipe, source.out)
    say(f"\nverifying {recipe.key()} with the baseline's seeds {spec.seeds}")
    init_ray(None, log_to_driver=False)
    outcome = run_ablation(spec)
    after = _selection_of(tracking.runs_frame(spec.tracking_uri, spec.experiment_name), options)
    rows = after.table[
        (after.table["pair_set"] == recipe.name) & (after.table["pairs"] == recipe.key())
    ]
    if rows.empty or rows.iloc[0]["seeds"] == 0:
        note = f"verify: the recipe {recipe.key()} has no finished run"
        return Verification(spec, outcome, None, (*after.notes, note))
    row = rows.iloc[0]
    text = (
        f"\nverified {recipe.name} ({row['seeds']} seeds): gain vs baseline "
        f"{selection.gain_text(row, options.metric)}; verdict {row['verdict']}"
    )
    return Verification(spec, outcome, text, after.notes)
