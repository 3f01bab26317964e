"""`conaclip table` and `conaclip best`: read an ablation's MLflow runs, tabulate, choose.

Both read MLflow (never Ray's result files). Files go to ``<out>/reports/<experiment>/``:
``table.<fmt>`` and ``heatmap.png`` (both also logged to the experiment's summary run), and
``recipe.yaml`` from ``best``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from orchestrator import heatmap, selection, stats, table, table_format, tracking
from search_spaces.presets import PairSet
from trainers.errors import InputError

DEFAULT_OUT = Path("runs/ablate")


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--experiment", metavar="NAME", help="MLflow experiment (default: the newest ablation)"
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: sqlite:///<out>/mlruns.db)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"the ablation's output directory; reports go under DIR/reports (default: "
        f"{DEFAULT_OUT})",
    )
    parser.add_argument(
        "--metric", default="rsum", help="metric to compare pair sets by (default: rsum)"
    )
    parser.add_argument(
        "--correction",
        choices=stats.CORRECTIONS,
        default="holm",
        help="multiple-comparison correction across the table's rows: holm (family-wise, "
        "default) or bh (Benjamini-Hochberg, false discovery rate)",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.05, help="level of the better/worse verdict (0.05)"
    )
    parser.add_argument(
        "--n-boot",
        type=int,
        default=stats.DEFAULT_N_BOOT,
        metavar="B",
        help=f"bootstrap resamples of the eval queries (default: {stats.DEFAULT_N_BOOT})",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``table`` and ``best``; handlers return the exit code, bad input raises InputError."""
    table_parser = subparsers.add_parser(
        "table",
        help="the strategy-selection table read from MLflow",
        description="One row per pair set: the metric's mean with a 95% interval over seeds, "
        "the gain over the baseline paired by seed with intervals over seeds (training noise) "
        "and over eval queries (bootstrap), adjusted p-values and a verdict (better / worse / "
        "open). Prints the table, writes it with a heatmap PNG (learning type x strategy) "
        "under DIR/reports/<experiment>/ and logs both to MLflow.",
    )
    add_source_flags(table_parser)
    table_parser.add_argument(
        "--format", choices=table_format.FORMATS, default="md", help="output format (default: md)"
    )
    table_parser.set_defaults(handler=_table)

    best = subparsers.add_parser(
        "best",
        help="the winning pair set and the combined recipe",
        description="Print the pair set that is significantly better than the baseline (or "
        "say that none is, with the leading candidate and what would settle it) and the "
        "combined recipe (the baseline plus every single addition whose verdict is better) "
        "as YAML for `conaclip ablate --config`; also written to "
        "DIR/reports/<experiment>/recipe.yaml.",
    )
    add_source_flags(best)
    best.add_argument(
        "--verify",
        action="store_true",
        help="run the recipe with the baseline's seeds and print its paired gain",
    )
    best.set_defaults(handler=_best)


def _runs(args: argparse.Namespace) -> pd.DataFrame:
    uri = args.tracking_uri or tracking.default_tracking_uri(args.out)
    tracking.check_tracking_uri(uri, must_exist=True)
    return tracking.runs_frame(uri, args.experiment)


def _selection(args: argparse.Namespace, runs: pd.DataFrame) -> pd.DataFrame:
    """The table with the eval ranks of the runs loaded for the bootstrap; its note (why some
    bootstrap columns are NaN) goes to stderr."""
    if args.n_boot < 1:
        raise InputError(f"--n-boot {args.n_boot}: expected at least 1 resample")
    ranks = table.load_ranks(runs.attrs["tracking_uri"], runs)
    result = table.selection_table(
        runs,
        args.metric,
        ranks=ranks,
        correction=args.correction,
        alpha=args.alpha,
        n_boot=args.n_boot,
    )
    if result.attrs.get("boot_note"):
        print(result.attrs["boot_note"], file=sys.stderr)
    return result


def _report_dir(out: Path, experiment: str) -> Path:
    return out / "reports" / tracking.safe_name(experiment)


def _table(args: argparse.Namespace) -> int:
    runs = _runs(args)
    result = _selection(args, runs)
    text = table_format.format_table(result, args.format)
    sys.stdout.write(text)
    experiment = runs.attrs["experiment"]
    folder = _report_dir(args.out, experiment)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / f"table.{args.format}"]
    written[0].write_text(text)
    if result.attrs.get("baseline") is not None:
        written.append(folder / "heatmap.png")
        heatmap.heatmap(result, written[1], title=f"{experiment}: Δ {args.metric} vs baseline")
    else:
        print("no baseline run in this experiment: no heatmap", file=sys.stderr)
    for path in written:
        tracking.log_summary_artifact(runs.attrs["tracking_uri"], experiment, path)
        print(f"wrote {path} (logged to MLflow)", file=sys.stderr)
    return 0


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
        lines.append(f"  verdict: {row['verdict']} ({selection.p_text(row)})")
    return lines


def _seeds_of_baseline(result: pd.DataFrame) -> list[int]:
    """The ``params.seed`` values of the baseline's finished runs (from the table), ascending."""
    base = result[result["is_baseline"]]
    by_seed = base[f"{result.attrs['metric']}_by_seed"].iloc[0] if len(base) else {}
    seeds = sorted(int(s) for s in by_seed if s.lstrip("-").isdigit())
    if not seeds:
        raise InputError("best --verify: no finished baseline run with a seed param to repeat")
    return seeds


def _verify(
    args: argparse.Namespace, runs: pd.DataFrame, result: pd.DataFrame, recipe: PairSet, out: Path
) -> int:
    """Run the combined recipe as more trials of the same ablation (same data, teacher,
    student and budget, read back from the runs' MLflow params) with the SAME seeds as the
    baseline, so its gain is paired seed by seed; then re-read the table and print the
    recipe row's paired gain with its intervals."""
    from orchestrator.ablate_cli import summarize
    from orchestrator.ablation import AblationSpec, pair_sets_payload, run_ablation
    from orchestrator.ray_cluster import init_ray
    from trainers.run_config import DistillConfig

    def shared(name: str) -> str:
        values = set(runs.get(f"params.{name}", pd.Series(dtype=str)).dropna().astype(str))
        if len(values) != 1:
            raise InputError(f"best --verify: the runs do not share one {name} param ({values})")
        return values.pop()

    seeds = _seeds_of_baseline(result)
    run = DistillConfig(
        pairs=list(recipe.pairs),
        student=shared("student"),
        teacher=shared("teacher") or None,
        teacher_checkpoint=shared("teacher_checkpoint") or None,
        teacher_cache=shared("teacher_cache") or None,
        train_shards=shared("train_shards"),
        eval_shards=shared("eval_shards"),
        steps=int(shared("steps")),
        eval_every=int(shared("eval_every")),
        batch_size=int(shared("batch_size")),
    )
    experiment = runs.attrs["experiment"]
    spec = AblationSpec(
        name=f"{experiment}-verify",
        experiment=experiment,
        preset="verify",
        pair_sets=pair_sets_payload([recipe]),
        seeds=seeds,
        run=run,
        out_dir=str(out.resolve()),
        tracking_uri=runs.attrs["tracking_uri"],
    )
    print(f"\nverifying {recipe.key()} with the baseline's seeds {seeds}", file=sys.stderr)
    init_ray(None, log_to_driver=False)
    code = summarize(run_ablation(spec), spec)
    after = _selection(args, tracking.runs_frame(runs.attrs["tracking_uri"], experiment))
    rows = after[(after["pair_set"] == recipe.name) & (after["pairs"] == recipe.key())]
    if rows.empty or rows.iloc[0]["seeds"] == 0:
        print(f"verify: the recipe {recipe.key()} has no finished run", file=sys.stderr)
        return code or 1
    row = rows.iloc[0]
    print(
        f"\nverified {recipe.name} ({row['seeds']} seeds): gain vs baseline "
        f"{selection.gain_text(row, args.metric)}; verdict {row['verdict']}"
    )
    return code


def _others(result: pd.DataFrame) -> str:
    count = int((result["verdict"] == "better").sum()) - 1
    if count < 1:
        return ""
    return f"; {count} other row{'s are' if count > 1 else ' is'} significantly better too"


def _best(args: argparse.Namespace) -> int:
    runs = _runs(args)
    result = _selection(args, runs)
    choice = selection.choose(result, args.metric)
    if choice.winner is not None:
        print(f"best pair set by {args.metric}: {choice.winner['pair_set']}")
        print("\n".join(_numbers(choice.winner, args.metric)))
        print(
            f"  significant: both adjusted p below {result.attrs['alpha']} "
            f"({result.attrs['correction']} across the table's rows){_others(result)}"
        )
    else:
        print(f"best pair set by {args.metric}: none is significantly better than the baseline")
        print(choice.reason[0].upper() + choice.reason[1:])
        if choice.leading is not None:
            print(f"leading candidate: {choice.leading['pair_set']}")
            print("\n".join(_numbers(choice.leading, args.metric)))
    if result.attrs.get("baseline") is None:
        print("no baseline run in this experiment: no combined recipe", file=sys.stderr)
        return 0
    recipe = selection.combined_recipe(result, args.metric)
    text = selection.recipe_yaml(recipe, selection.common_settings(runs))
    folder = _report_dir(args.out, runs.attrs["experiment"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(text)
    # The recipe joins the table and heatmap on the ablation's own MLflow run.
    tracking.log_summary_artifact(runs.attrs["tracking_uri"], runs.attrs["experiment"],
                                  folder / "recipe.yaml")  # fmt: skip
    base = result.attrs["baseline"]
    if recipe.key() == base:
        print(
            f"\ncombined recipe: the baseline alone ({base}); no single addition has a "
            "significant gain"
        )
    else:
        print(
            f"\ncombined recipe (baseline + every single addition whose gain is significant):"
            f" {recipe.key()}"
        )
    print(f"# conaclip ablate --config {folder / 'recipe.yaml'}")
    sys.stdout.write(text)
    if args.verify:
        return _verify(args, runs, result, recipe, args.out)
    return 0
