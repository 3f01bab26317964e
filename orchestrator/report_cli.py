"""`conaclip table` and `conaclip best`: flags in, one call to ``orchestrator.reports``, the
result printed.

Both read MLflow (never Ray's result files). Files go to ``<out>/reports/<experiment>/``:
``table.<fmt>`` and ``heatmap.png`` (both also logged to the experiment's summary run), and
``recipe.yaml`` from ``best``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator import reports, stats, table_format
from orchestrator.ablation import outcome_summary
from orchestrator.cli_flags import add_ablation_source_flags
from orchestrator.verdicts import DEFAULT_MARGIN
from trainers.errors import InputError


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of ``reports.ReportSource`` and ``reports.TableOptions``, with their defaults."""
    defaults = reports.TableOptions()
    add_ablation_source_flags(parser)
    parser.add_argument(
        "--metric",
        default=defaults.metric,
        help=f"metric to compare pair sets by (default: {defaults.metric})",
    )
    parser.add_argument(
        "--correction",
        choices=stats.CORRECTIONS,
        default=defaults.correction,
        help="multiple-comparison correction across the table's rows: holm (family-wise, "
        "default) or bh (Benjamini-Hochberg, false discovery rate)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=defaults.alpha,
        help=f"level of the better/worse verdict ({defaults.alpha})",
    )
    parser.add_argument(
        "--margin",
        type=float,
        metavar="D",
        help="equivalence margin in the metric's units: a cell whose gain's 95%% interval "
        f"lies inside +-D is 'equivalent' (default: the race's own margin, else "
        f"{DEFAULT_MARGIN:g} rsum, one point of mean recall)",
    )
    parser.add_argument(
        "--n-boot",
        type=int,
        default=defaults.n_boot,
        metavar="B",
        help=f"bootstrap resamples of the eval queries (default: {defaults.n_boot})",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``table`` and ``best``; handlers return the exit code, bad input raises InputError."""
    table_parser = subparsers.add_parser(
        "table",
        help="the strategy-selection table read from MLflow",
        description="One row per pair set: the metric's mean with a 95% interval over seeds, "
        "the gain over the baseline paired by seed with its interval over seeds (training "
        "noise) and over seeds and eval set together (one test for both noises), p-values "
        "for 'differs' and 'within +-margin' adjusted in one family, and a verdict: better, "
        "worse, equivalent or open. A race's experiment is read with the race's own looks. "
        "Prints the table, writes it with a heatmap PNG (learning type x strategy) under "
        "DIR/reports/<experiment>/ and logs both to MLflow with the margin.",
    )
    add_source_flags(table_parser)
    table_parser.add_argument(
        "--format", choices=table_format.FORMATS, default="md", help="output format (default: md)"
    )
    table_parser.add_argument(
        "--record",
        dest="write_record",
        type=Path,
        metavar="DIR",
        help="also write the experiment as a grid record to DIR, which `--from DIR` reads "
        "back on any machine (ranks kept up to 10, all a recall at K <= 10 reads)",
    )
    table_parser.set_defaults(handler=_table)

    best = subparsers.add_parser(
        "best",
        help="the winning pair set and the combined recipe",
        description="Print the pair set that is better than the baseline and ahead of every "
        "other better pair set by the same test (or say that none is, naming the cells it "
        "cannot separate or the leading candidate and what would settle it) and the "
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


def _source(args: argparse.Namespace) -> reports.ReportSource:
    return reports.ReportSource(args.out, args.experiment, args.tracking_uri, args.record)


def _options(args: argparse.Namespace) -> reports.TableOptions:
    return reports.TableOptions(
        args.metric, args.correction, args.alpha, args.n_boot, getattr(args, "margin", None)
    )


def _notes(notes: tuple[str, ...]) -> None:
    for note in notes:
        print(note, file=sys.stderr)


def _table(args: argparse.Namespace) -> int:
    source = _source(args)
    report = reports.table_report(source, _options(args), args.format)
    sys.stdout.write(report.text)
    _notes(report.notes)
    if args.write_record is not None:
        if source.record is not None:
            raise InputError("--record: the table was read from a record already (--from)")
        folder = reports.record_grid(source, args.write_record)
        _notes((f"wrote the grid record {folder} (conaclip table --from {folder})",))
    return 0


def _best(args: argparse.Namespace) -> int:
    source, options = _source(args), _options(args)
    best = reports.best_report(source, options)
    sys.stdout.write(best.text)
    _notes(best.notes)
    if not args.verify or best.recipe is None:
        return 0
    if source.record is not None:
        raise InputError("--verify: a grid record has no store to add the recipe's runs to")
    verified = reports.verify_recipe(best, source, options)
    summary, failures = outcome_summary(verified.outcome, verified.spec)
    print(summary)
    _notes((*failures, *verified.notes))
    code = 1 if failures else 0
    if verified.text is None:
        return code or 1
    print(verified.text)
    return code
