"""`conaclip export` (a trial's student as open_clip weights + the industry table) and
`conaclip ui` (the MLflow UI on 127.0.0.1)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator import tracking
from trainers.errors import InputError

DEFAULT_ABLATION_OUT = Path("runs/ablate")


def latest_checkpoint(train_run_dir: Path) -> Path:
    """Newest ``checkpoint.pt`` of a Ray Train run directory (or a bare run's checkpoints)."""
    found = sorted(train_run_dir.glob("**/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(f"{train_run_dir}: no checkpoint.pt in this run")
    return found[-1]


def export_trial(
    run_id: str, tracking_uri: str, ablation_out: Path, out_dir: Path, name: str | None = None
) -> dict[str, Any]:
    """Export the student of MLflow run ``run_id`` and measure it against its teacher."""
    import torch

    from trainers.models import build_student, export_student, load_model, model_report

    client = tracking.client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as error:  # MLflow raises MlflowException subclasses for unknown ids
        raise InputError(
            f"--run {run_id}: no such MLflow run at {tracking_uri} ({error})"
        ) from None
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    trial_id = tags.get("conaclip.trial_id")
    if not trial_id:
        raise InputError(f"--run {run_id}: not a conaclip trial (no conaclip.trial_id tag)")
    checkpoint = latest_checkpoint(ablation_out.resolve() / "train_runs" / f"trial-{trial_id}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    student_state = state["student"]
    head = student_state.get("teacher_head.weight")
    student, _ = build_student(
        params["student"], teacher_embed_dim=None if head is None else int(head.shape[0])
    )
    student.load_state_dict(student_state)
    student.eval()
    name = name or f"{params['student']}-{params['pair_set']}".replace(":", "_").replace("+", "_")
    weights = export_student(student, out_dir, name)
    report: dict[str, Any] = {
        "run_id": run_id,
        "pairs": params.get("pairs"),
        "weights": str(weights),
        "config": str(out_dir / f"{name}.json"),
        "recall": {
            k: metrics[k] for k in sorted(metrics) if k.startswith(("t2i_", "i2t_", "rsum"))
        },
        "student": model_report(student.clip),
    }
    if params.get("teacher") and params.get("teacher_checkpoint"):
        teacher = load_model(params["teacher"], params["teacher_checkpoint"])
        teacher.model.eval()
        report["teacher"] = model_report(teacher.model)
    (out_dir / f"{name}.report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / f"{name}.report.md").write_text(industry_table(report))
    return report


def industry_table(report: dict[str, Any]) -> str:
    """The paper's industry table: recall, parameters, size on disk, speed vs the teacher."""
    rows = [("student", report["student"])]
    if "teacher" in report:
        rows.insert(0, ("teacher", report["teacher"]))
    teacher = report.get("teacher")
    lines = [
        "| model | params (M) | excl. token emb. (M) | fp32 MB | fp16 MB | images/s | texts/s "
        "| speed-up (img / txt) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        speed = "1.00x / 1.00x"
        if teacher and label == "student":
            speed = (f"{r['images_per_s'] / teacher['images_per_s']:.2f}x / "
                     f"{r['texts_per_s'] / teacher['texts_per_s']:.2f}x")  # fmt: skip
        lines.append(
            f"| {label} | {r['params_total'] / 1e6:.2f} | "
            f"{r['params_total_excl_token_embedding'] / 1e6:.2f} | "
            f"{r['size_fp32_bytes'] / 1e6:.1f} | {r['size_fp16_bytes'] / 1e6:.1f} | "
            f"{r['images_per_s']:.0f} | {r['texts_per_s']:.0f} | {speed} |"
        )
    recall = report["recall"]
    keys = [k for k in ("t2i_R1", "t2i_R5", "t2i_R10", "i2t_R1", "i2t_R5", "i2t_R10", "rsum")
            if k in recall]  # fmt: skip
    lines += ["", "| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys),
              "| " + " | ".join(f"{recall[k]:.2f}" for k in keys) + " |"]  # fmt: skip
    return f"pairs: {report['pairs']}\n\n" + "\n".join(lines) + "\n"


def _export(args: argparse.Namespace) -> int:
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
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
        "--host", args.host, "--port", str(args.port), "--workers", "1",
    ]  # fmt: skip
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {base} (Ctrl-C to stop)", flush=True)
    with contextlib.suppress(InputError):  # a store with no ablation yet: the home page
        experiment = tracking.find_experiment(uri)
        print(f"runs of {experiment.name}: {runs_page_url(base, experiment.experiment_id)}")
    return serve_until_signalled(command)


def runs_page_url(base: str, experiment_id: str) -> str:
    """The UI page listing an experiment's runs. MLflow 3's UI opens every experiment in its
    GenAI view (traces) unless told ``workflowType=machine_learning``, and remembers the
    choice in the browser; the experiment's kind tag alone does not switch it."""
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def serve_until_signalled(command: list[str], grace_s: float = 10.0) -> int:
    """Run a server ``command`` until it exits or this process gets SIGINT/SIGTERM, then end
    it with everything it started. The server gets a process group of its own, so its workers
    (mlflow server forks several) are ended with it instead of outliving the command."""
    process = subprocess.Popen(command, env=os.environ.copy(), start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _end_group(process.pid, grace_s)
    # A server ended by our forwarded signal finished as asked.
    return 0 if code in (-signal.SIGINT, -signal.SIGTERM) else code


def _end_group(pgid: int, grace_s: float) -> None:
    """SIGTERM whatever is left of the process group ``pgid``, SIGKILL it after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # raises ProcessLookupError once the group is empty
            time.sleep(0.1)
        os.killpg(pgid, signal.SIGKILL)


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
        help="the ablation's --out (default runs/ablate)",
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
