"""Flags and defaults that several subcommands share, so each means the same everywhere."""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.config import Workspace

# Where `conaclip ablate` writes an ablation and where `table`, `best`, `export` and `ui` look
# for one unless told otherwise.
DEFAULT_ABLATION_OUT = Path("runs/ablate")


def add_ablation_source_flags(parser: argparse.ArgumentParser) -> None:
    """``--experiment``, ``--tracking-uri``, ``--out`` and ``--from``: which finished ablation
    (an MLflow store) or grid record a reading subcommand reads."""
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
        default=DEFAULT_ABLATION_OUT,
        metavar="DIR",
        help=f"the ablation's output directory (default: {DEFAULT_ABLATION_OUT})",
    )
    parser.add_argument(
        "--from",
        dest="record",
        type=Path,
        metavar="DIR",
        help="read a grid record (runs.csv, ranks.npz, grid.json: `conaclip table --record`) "
        "instead of an MLflow store: the table and verdict re-derived without training",
    )


def add_shared_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that mean the same in every subcommand."""
    group = parser.add_argument_group("data and models")
    group.add_argument(
        "--train-shards",
        help="train shards: dir, glob, brace pattern or URL "
        "(default: the built-in data set, generated on first use)",
    )
    group.add_argument(
        "--eval-shards",
        help="eval shards with several captions per image (default: the built-in eval set)",
    )
    group.add_argument(
        "--teacher",
        help="teacher: built-in config, open_clip name, or the path of an open_clip model "
        "config NAME.json for an architecture of your own (default: conaclip-teacher, trained "
        "on first use)",
    )
    group.add_argument(
        "--teacher-checkpoint",
        help="local teacher weights (needed for open_clip names and .json configs; nothing is "
        "downloaded)",
    )
    group.add_argument("--student", help="student model name (default: conaclip-student-s)")
    group.add_argument("--config", help="YAML file of settings; flags override it")
    group.add_argument("--out", help="output directory (default: runs/<command>)")
    group.add_argument(
        "--home",
        help="where built-in data and teachers are kept "
        "(default: $CONACLIP_HOME or ~/.cache/conaclip)",
    )
    group.add_argument(
        "--address", help="Ray cluster to join (auto, ray://host:port); default: start a local one"
    )


AMP_HELP = (
    "bfloat16 autocast (default: off; --config can set amp). Pays on a GPU and on CPUs with "
    "AVX-512 BF16 or AMX for student-s and larger (about 1.5x the steps/s), not for student-xs"
)


def run_flags(args: argparse.Namespace) -> dict[str, object]:
    """Settings that `train` and `ablate` take from the same flags (None = not given)."""
    return {
        "student": args.student,
        "teacher": args.teacher,
        "teacher_checkpoint": args.teacher_checkpoint,
        "train_shards": args.train_shards,
        "eval_shards": args.eval_shards,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "amp": args.amp,
        "use_teacher_cache": False if args.no_teacher_cache else None,
    }


def workspace_of(args: argparse.Namespace) -> Workspace:
    """The workspace ``--home`` names, else the default one."""
    return Workspace(home=Path(args.home)) if args.home else Workspace()
