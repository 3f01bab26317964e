"""`conaclip table` and `conaclip best`: read an ablation's MLflow runs, tabulate, choose.

Both read MLflow (never Ray's result files). Files go to ``<out>/reports/<experiment>/``:
``table.<fmt>`` and ``heatmap.png`` (both also logged to the experiment's summary run), and
``recipe.yaml`` from ``best``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from orchestrator import select, table, tracking
from trainers.errors import InputError

DEFAULT_OUT = Path("runs/ablate")


def _add_source_flags(parser: argparse.ArgumentParser) -> None:
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``table`` and ``best``; handlers return the exit code, bad input raises InputError."""
    table_parser = subparsers.add_parser(
        "table",
        help="the strategy-selection table read from MLflow",
        description="One row per pair set: recalls as mean ± std over seeds, delta vs the "
        "baseline, steps, status. Prints the table, writes it with a heatmap PNG (learning "
        "type x strategy) under DIR/reports/<experiment>/ and logs both to MLflow.",
    )
    _add_source_flags(table_parser)
    table_parser.add_argument(
        "--format", choices=table.FORMATS, default="md", help="output format (default: md)"
    )
    table_parser.set_defaults(handler=_table)

    best = subparsers.add_parser(
        "best",
        help="the winning pair set and the combined recipe",
        description="Print the best pair set with its numbers and the combined recipe (the "
        "baseline plus every pair whose mean gain beats its std) as YAML for "
        "`conaclip ablate --config`; also written to DIR/reports/<experiment>/recipe.yaml.",
    )
    _add_source_flags(best)
    best.add_argument("--verify", action="store_true", help="run the recipe as one more trial")
    best.set_defaults(handler=_best)


def _runs(args: argparse.Namespace) -> pd.DataFrame:
    uri = args.tracking_uri or tracking.default_tracking_uri(args.out)
    tracking.check_tracking_uri(uri, must_exist=True)
    return tracking.runs_frame(uri, args.experiment)


def _report_dir(out: Path, experiment: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("_") or "experiment"
    return out / "reports" / safe


def _table(args: argparse.Namespace) -> int:
    runs = _runs(args)
    result = table.selection_table(runs, args.metric)
    text = table.format_table(result, args.format)
    sys.stdout.write(text)
    experiment = runs.attrs["experiment"]
    folder = _report_dir(args.out, experiment)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / f"table.{args.format}"]
    written[0].write_text(text)
    if result.attrs.get("baseline") is not None:
        written.append(folder / "heatmap.png")
        table.heatmap(result, written[1], title=f"{experiment}: Δ {args.metric} vs baseline")
    else:
        print("no baseline run in this experiment: no heatmap", file=sys.stderr)
    for path in written:
        tracking.log_summary_artifact(runs.attrs["tracking_uri"], experiment, path)
        print(f"wrote {path} (logged to MLflow)", file=sys.stderr)
    return 0


def _numbers(row: pd.Series, metric: str) -> list[str]:
    def pm(name: str) -> str:
        return f"{row[f'{name}_mean']:.2f} ± {row[f'{name}_std']:.2f}"

    lines = [
        f"  pairs: {row['pairs']}",
        f"  seeds: {row['seeds']}  steps: {row['steps']}  status: {row['status']}",
        "  t2i R@1/5/10: " + " / ".join(pm(f"t2i_R{k}") for k in (1, 5, 10)),
        "  i2t R@1/5/10: " + " / ".join(pm(f"i2t_R{k}") for k in (1, 5, 10)),
        f"  rsum: {pm('rsum')}",
    ]
    if metric != "rsum":
        lines.append(f"  {metric}: {pm(metric)}")
    delta = row[f"delta_{metric}"]
    if not pd.isna(delta):
        lines.append(f"  Δ {metric} vs baseline: {delta:+.2f}")
    return lines


def _verify(runs: pd.DataFrame, recipe, out: Path) -> int:
    """Run the combined recipe as one more trial of the same ablation (same data, teacher,
    student and budget, read back from the runs' MLflow params); it joins the table as a row."""
    from orchestrator.ablate_cli import summarize
    from orchestrator.ablation import AblationSpec, pair_sets_payload, run_ablation
    from orchestrator.ray_cluster import init_ray
    from trainers.run_config import DistillConfig

    def shared(name: str) -> str:
        values = set(runs.get(f"params.{name}", pd.Series(dtype=str)).dropna().astype(str))
        if len(values) != 1:
            raise InputError(f"best --verify: the runs do not share one {name} param ({values})")
        return values.pop()

    run = DistillConfig(
        pairs=list(recipe.pairs), student=shared("student"), teacher=shared("teacher") or None,
        teacher_checkpoint=shared("teacher_checkpoint") or None,
        teacher_cache=shared("teacher_cache") or None, train_shards=shared("train_shards"),
        eval_shards=shared("eval_shards"), steps=int(shared("steps")),
        eval_every=int(shared("eval_every")), batch_size=int(shared("batch_size")),
    )  # fmt: skip
    experiment = runs.attrs["experiment"]
    spec = AblationSpec(
        name=f"{experiment}-verify", experiment=experiment, preset="verify",
        pair_sets=pair_sets_payload([recipe]), run=run, out_dir=str(out.resolve()),
        tracking_uri=runs.attrs["tracking_uri"],
    )  # fmt: skip
    init_ray(None, log_to_driver=False)
    return summarize(run_ablation(spec), spec)


def _best(args: argparse.Namespace) -> int:
    runs = _runs(args)
    result = table.selection_table(runs, args.metric)
    winner = select.best_pair_set(result, args.metric)
    print(f"best pair set by {args.metric}: {winner['pair_set']}")
    print("\n".join(_numbers(winner, args.metric)))
    if result.attrs.get("baseline") is None:
        print("no baseline run in this experiment: no combined recipe", file=sys.stderr)
        return 0
    recipe = select.combined_recipe(result, args.metric)
    text = select.recipe_yaml(recipe, select.common_settings(runs))
    folder = _report_dir(args.out, runs.attrs["experiment"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(text)
    print(f"\ncombined recipe (baseline + every pair whose mean gain beats its std): "
          f"{recipe.key()}")  # fmt: skip
    print(f"# conaclip ablate --config {folder / 'recipe.yaml'}")
    sys.stdout.write(text)
    if args.verify:
        return _verify(runs, recipe, args.out)
    return 0
