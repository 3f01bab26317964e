"""`conaclip export` (a trial's student as open_clip weights + the industry table) and
`conaclip ui` (the MLflow UI on 127.0.0.1): flags in, one call, the result printed."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from orchestrator import mlflow_ui, tracking
from orchestrator.cli_flags import DEFAULT_ABLATION_OUT
from orchestrator.trial_export import export_trial
from trainers.errors import InputError


def _export(args: argparse.Namespace) -> int:
    # trainers.export (torch, open_clip) is imported here, not when the CLI starts.
    from trainers.export import industry_table

    ablation_out = Path(args.ablation_out)
    uri = args.tracking_uri or tracking.default_tracking_uri(ablation_out)
    tracking.check_tracking_uri(uri, must_exist=True)
    out = Path(args.out)
    report = export_trial(args.run, uri, ablation_out, out, args.name)
    print(industry_table(report))
    print(f"weights: {report['weights']}\nconfig:  {report['config']}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    uri = args.tracking_uri or tracking.default_tracking_uri(Path(args.out))
    tracking.check_tracking_uri(uri, must_exist=uri.startswith("sqlite:"))
    command = mlflow_ui.server_command(uri, args.host, args.port)
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {base} (Ctrl-C to stop)", flush=True)
    with contextlib.suppress(InputError):  # a store with no ablation yet: the home page
        experiment = tracking.find_experiment(uri)
        tracking.set_runs_view(uri, experiment.experiment_id)  # ablations made before it
        print(
            f"runs of {experiment.name}: {mlflow_ui.runs_page_url(base, experiment.experiment_id)}"
        )
    return mlflow_ui.serve_until_signalled(command)


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a trained student as open_clip weights with a size/speed report",
        description="Write the student of one ablation trial (an MLflow run id) as open_clip "
        "weights + JSON config (width head dropped) and the industry table: recall, params, "
        "size on disk, images/s and texts/s against the teacher on this machine.",
    )
    export.add_argument("--run", required=True, help="MLflow run id of the trial")
    export.add_argument("--out", required=True, help="directory for weights, config, report")
    export.add_argument("--name", help="model name to export as (default: student-pairset)")
    export.add_argument(
        "--ablation-out",
        default=str(DEFAULT_ABLATION_OUT),
        help=f"the ablation's --out (default {DEFAULT_ABLATION_OUT})",
    )
    export.add_argument("--tracking-uri", help="MLflow URI (default: the ablation's sqlite)")
    export.set_defaults(handler=_export)

    ui = subparsers.add_parser(
        "ui",
        help="open the MLflow UI on 127.0.0.1",
        description="Run `mlflow server` on the ablation's tracking store, bound to loopback.",
    )
    ui.add_argument("--out", default=str(DEFAULT_ABLATION_OUT), help="the ablation's --out")
    ui.add_argument("--tracking-uri", help="MLflow URI (default: sqlite under --out)")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(handler=_ui)
