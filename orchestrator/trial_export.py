"""One ablation trial's student exported: the MLflow run names the trial, the trial's Ray Train
run directory under the ablation's ``--out`` holds its checkpoint, ``trainers.export`` does the
rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator import tracking
from trainers.errors import InputError


def latest_checkpoint(train_run_dir: Path) -> Path:
    """Newest ``checkpoint.pt`` of a Ray Train run directory (or a bare run's checkpoints)."""
    found = sorted(train_run_dir.glob("**/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(f"{train_run_dir}: no checkpoint.pt in this run")
    return found[-1]


def export_trial(
    run_id: str, tracking_uri: str, ablation_out: Path, out_dir: Path, name: str | None = None
) -> dict[str, Any]:
    """Export the student of MLflow run ``run_id`` and measure it against its teacher
    (``trainers.export.export_checkpoint``'s report). ``name`` defaults to
    ``<student>-<pair set>`` with ":" and "+" made file-name safe. ``InputError`` for an
    unknown run, a run that is not a conaclip trial, or a trial without a checkpoint."""
    # torch and open_clip load here, not when the CLI starts.
    from trainers.export import export_checkpoint

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
    name = name or f"{params['student']}-{params['pair_set']}".replace(":", "_").replace("+", "_")
    return export_checkpoint(
        checkpoint,
        out_dir,
        name,
        student=params["student"],
        metrics=metrics,
        pairs=params.get("pairs"),
        run_id=run_id,
        teacher=params.get("teacher"),
        teacher_checkpoint=params.get("teacher_checkpoint"),
    )
