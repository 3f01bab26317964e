"""open_clip_train's distillation speed on the same shards, teacher and student as a trial.

Runs inside the peer venv that ``benchmarks/openclip_peer.sh`` makes (webdataset 0.2.86, which
open_clip_train needs); it imports nothing of this project but the torchvision shim and the
model configs. The workload matches ``benchmarks/trial_throughput.py``'s "bare loop, live
teacher" row: student-s, the built-in teacher run live every step, batch 64, 2 CPU threads,
one loader worker, fp32. samples/s is open_clip_train's own "Batch (t)" average over the last
logging window, so start-up is left out as in ours.

``--runs N`` is the whole-ablation side: N trainings one after the other, each a fresh process
as a user would start them (``open_clip_train`` trains one configuration per call; its
distillation has one loss, so the N runs differ by ``--seed``), timed from spawn to exit, start-up,
teacher loading and data included; compare with ``benchmarks/ablation_scale.py run --preset
openclip_distill`` at the same student, steps, batch and seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import trainers.torchvision_compat  # noqa: E402  (before open_clip imports torchvision)

trainers.torchvision_compat.ensure_torchvision_importable()

import open_clip  # noqa: E402

open_clip.add_model_config(REPO / "trainers" / "model_configs")

from open_clip_train.main import main as openclip_train_main  # noqa: E402

from trainers.models import resolve_model_name  # noqa: E402

BATCH_LINE = re.compile(r"Batch \(t\): ([0-9.]+)")


class BatchTimes(logging.Handler):
    """Collects the per-window average batch time open_clip_train logs."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = BATCH_LINE.search(record.getMessage())
        if found:
            self.seconds.append(float(found.group(1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--student", default="conaclip-student-s")
    parser.add_argument("--seed", type=int, default=0, help="open_clip_train's --seed")
    parser.add_argument("--runs", type=int, default=1,
                        help="N > 1: N trainings in fresh processes, one after the other, "
                             "seeds --seed.. --seed+N-1, timed end to end")  # fmt: skip
    parser.add_argument(
        "--teacher",
        default="conaclip-teacher",
        help="--distill-model: a built-in config, an open_clip name or an "
        "open_clip model config .json (registered here as conaclip does)",
    )
    parser.add_argument(
        "--teacher-checkpoint", help="--distill-pretrained (default: the built-in teacher's file)"
    )
    parser.add_argument(
        "--train-shards", help="a brace pattern of train shards (default: every built-in one)"
    )
    parser.add_argument("--out", default="runs/bench/openclip_peer.json")
    args = parser.parse_args()
    if args.runs > 1:
        _sequential_runs(args)
        return

    home = Path(os.environ.get("CONACLIP_HOME", Path.home() / ".cache" / "conaclip"))
    data = sorted((home / "data").glob("shapes-n*"))
    teachers = sorted((home / "teachers").glob("conaclip-teacher-*/conaclip-teacher.pt"))
    if not args.train_shards and not data:
        sys.exit(f"{home}: no built-in data yet; run `conaclip demo` (or make demo)")
    if not args.teacher_checkpoint and not teachers:
        sys.exit(f"{home}: no built-in teacher yet; run `conaclip demo` (or make demo)")
    if args.train_shards:
        pattern = args.train_shards
    else:
        shards = sorted((data[-1] / "train").glob("*.tar"))
        pattern = f"{shards[0].parent}/{{{shards[0].stem}..{shards[-1].stem}}}.tar"
    teacher = resolve_model_name(args.teacher)
    times = BatchTimes()
    with tempfile.TemporaryDirectory() as logs:
        argv = [
            "--train-data", pattern, "--dataset-type", "webdataset",
            "--train-num-samples", str(args.steps * args.batch_size),
            "--model", args.student, "--distill-model", teacher,
            "--distill-pretrained", args.teacher_checkpoint or str(teachers[-1]),
            "--batch-size", str(args.batch_size), "--epochs", "1", "--workers", "1",
            "--lr", "1e-3", "--warmup", "10", "--precision", "fp32",
            "--log-every-n-steps", str(max(1, args.steps // 3)),
            "--logs", logs, "--name", "peer", "--save-frequency", "0", "--report-to", "",
            "--device", "cpu", "--seed", str(args.seed),
        ]  # fmt: skip
        logging.getLogger().addHandler(times)
        openclip_train_main(argv)
    if not times.seconds:
        sys.exit("open_clip_train logged no batch times")
    samples_per_s = args.batch_size / times.seconds[-1]
    print(f"open_clip_train --distill-model, {args.student}, batch {args.batch_size}: "
          f"{samples_per_s:.1f} samples/s (windows: {times.seconds})")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "samples_per_s": samples_per_s,
                                          "batch_time_s": times.seconds}, indent=2))  # fmt: skip


def _sequential_runs(args: argparse.Namespace) -> None:
    """``args.runs`` trainings as separate processes of this script, one after the other; the
    JSON at ``args.out`` holds each one's wall-clock and samples/s and their total."""
    out = Path(args.out)
    runs = []
    started = time.time()
    passed = [
        *(["--teacher-checkpoint", args.teacher_checkpoint] if args.teacher_checkpoint else []),
        *(["--train-shards", args.train_shards] if args.train_shards else []),
    ]
    for index in range(args.runs):
        seed = args.seed + index
        one = out.with_name(f"{out.stem}-seed{seed}.json")
        spawn = time.time()
        subprocess.run(
            [sys.executable, __file__, "--steps", str(args.steps), "--batch-size",
             str(args.batch_size), "--student", args.student, "--seed", str(seed), "--out",
             str(one), "--teacher", args.teacher, *passed],
            check=True,
        )  # fmt: skip
        runs.append({"seed": seed, "wall_s": time.time() - spawn,
                     "samples_per_s": json.loads(one.read_text())["samples_per_s"]})  # fmt: skip
    total = time.time() - started
    walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
    samples = args.runs * args.steps * args.batch_size
    print(f"{args.runs} open_clip_train runs one after the other: {total:.1f} s for {samples} "
          f"trained samples ({samples / total:.1f} samples/s end to end); per run "
          f"{walls} s")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": runs, "wall_s": total,
                               "samples": samples}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
