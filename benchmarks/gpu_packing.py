"""GPU packing: one trial alone on a GPU against four trials packed onto it (0.25 GPU each).

Runs the ablation as `conaclip ablate` runs it (Tune trials, each a TorchTrainer whose worker
holds ``--gpus-per-worker 0.25``, MLflow in a scratch store) on a local Ray cluster over this
machine's first GPU: once with one trial, once with four at a time. Per setting it records
each trial's own samples/s (the loop's figure for its last report window, so start-up is
left out) and the setting's throughput over its whole wall-clock (all trials' samples over
the first trial's start to the last one's end, start-up included). The four packed trials
must overlap (every one started before any ended), or no figure is written.

Data: a shapes-world set synthesized into a scratch folder (``--train-samples``); teacher:
the built-in teacher architecture at its initial weights (``conaclip-teacher`` without a
checkpoint), since throughput does not depend on the weights' values and training one first
would spend most of the budget. No teacher cache: each trial runs the teacher's forward, as
an ablation without one does. Sized to take minutes on one device:

    python benchmarks/gpu_packing.py --out docs/results/gpu_packing.json

Without a CUDA device it refuses (exit status 2) and writes nothing. A failed trial ends it
with exit status 1, again writing nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trainers  # noqa: F401  (torchvision compat first)

PACKED = 4
GPU_SHARE = 1 / PACKED
REPO = Path(__file__).resolve().parents[1]


def cuda_device() -> str | None:
    """The name of the first CUDA device, which alone is left visible to Ray and its workers
    (``CUDA_VISIBLE_DEVICES``: Ray counts every device it sees, and four trials of 0.25 could
    then land on four GPUs); None when torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    os.environ["CUDA_VISIBLE_DEVICES"] = visible or "0"
    return torch.cuda.get_device_name(0)


def provenance(argv: list[str], device: str) -> dict[str, Any]:
    import ray
    import torch

    def cpu() -> str:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
        return platform.processor()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout

    # Tracked files changed since the commit: the figures are then not that commit's.
    changed = git("status", "--porcelain", "--untracked-files=no").strip()
    return {"command": " ".join(["python", "benchmarks/gpu_packing.py", *argv]),
            "commit": git("rev-parse", "HEAD").strip(), "tree_changed": bool(changed),
            "date": time.strftime("%Y-%m-%d"), "cpu": cpu(),
            "cores": multiprocessing.cpu_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "ray": ray.__version__, "device": device}  # fmt: skip


def setting_flags(args: argparse.Namespace, data: Path, work: Path, trials: int) -> list[str]:
    """`conaclip ablate` flags for ``trials`` trials (seeds) at once, each 0.25 of a GPU."""
    return ["--pairs", args.pairs, "--name", f"packing-{trials}", "--out", str(work / str(trials)),
            "--student", args.student, "--teacher", "conaclip-teacher",
            "--train-shards", str(data / "train"), "--eval-shards", str(data / "eval"),
            "--steps", str(args.steps), "--eval-every", str(max(1, args.steps // 3)),
            "--batch-size", str(args.batch_size), "--seeds", str(trials),
            "--gpus-per-worker", str(GPU_SHARE), "--cpus-per-worker", str(args.cpus_per_worker),
            "--max-concurrent-trials", str(trials), "--no-teacher-cache"]  # fmt: skip


def run_setting(flags: list[str]) -> dict[str, Any]:
    """Run one ablation; its trials' figures from MLflow. SystemExit(1) if a trial failed."""
    from orchestrator import tracking
    from orchestrator.ablate_cli import add_ablation_flags, build_spec
    from orchestrator.ablation import run_ablation

    cli = argparse.ArgumentParser()
    add_ablation_flags(cli)
    spec, _ = build_spec(cli.parse_args(flags))
    tracking.get_or_create_experiment(spec.tracking_uri, spec.experiment_name)
    outcome = run_ablation(spec)
    if outcome.failed or len(outcome.finished) != spec.trial_count:
        lines = [f"{t.pair_set} seed {t.seed}: {t.status} {t.error or ''}" for t in outcome.trials]
        raise SystemExit(
            "gpu_packing: a trial did not finish; nothing written\n" + "\n".join(lines)
        )
    runs = tracking.runs_frame(spec.tracking_uri, spec.experiment_name)
    starts, ends = runs["start_time"], runs["end_time"]
    wall_s = (ends.max() - starts.min()).total_seconds()
    samples = float(runs["metrics.samples_seen"].sum())
    trial_rates = [float(v) for v in runs["metrics.samples_per_s"]]
    return {
        "trials": len(runs),
        "gpu_per_trial": GPU_SHARE,
        "trial_samples_per_s": trial_rates,
        "sum_of_trial_samples_per_s": sum(trial_rates),
        "wall_s": wall_s,
        "samples": samples,
        "samples_per_s_over_wall": samples / wall_s,
        "all_overlapped": bool(starts.max() < ends.min()),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="three report windows")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--student", default="conaclip-student-s")
    parser.add_argument("--pairs", default="intra_ts:infonce")
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=max(1, multiprocessing.cpu_count() // PACKED),
        help="CPUs each trial's worker holds (default: the cores over 4)",
    )
    parser.add_argument("--out", default="docs/results/gpu_packing.json")
    args = parser.parse_args(argv)

    device = cuda_device()
    if device is None:
        print("gpu_packing: no CUDA device (torch.cuda.is_available() is False): this "
              "benchmark measures trials sharing a real GPU and refuses to run without one; "
              "nothing measured, nothing written", file=sys.stderr)  # fmt: skip
        return 2

    import ray

    from orchestrator.ray_cluster import start_local_cluster
    from trainers.synth_shards import synthesize

    work = Path(tempfile.mkdtemp(prefix="conaclip-gpu-packing-"))
    synthesize(work / "data", train_samples=args.train_samples, eval_images=500, progress=False)
    start_local_cluster(log_to_driver=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus != 1:
            print(f"gpu_packing: Ray sees {gpus:g} GPUs, not the one CUDA device left "
                  "visible; nothing measured, nothing written", file=sys.stderr)  # fmt: skip
            return 2
        settings = {
            "alone": run_setting(setting_flags(args, work / "data", work, 1)),
            "packed": run_setting(setting_flags(args, work / "data", work, PACKED)),
        }
    finally:
        ray.shutdown()
    alone, packed = settings["alone"], settings["packed"]
    if not packed["all_overlapped"]:
        print(f"gpu_packing: the {PACKED} packed trials did not all run at once; nothing "
              "written", file=sys.stderr)  # fmt: skip
        return 1
    result = {
        **provenance(argv, device),
        "what": f"one trial alone against {PACKED} trials packed onto one GPU "
        f"({GPU_SHARE} GPU each), {args.student}, pairs {args.pairs}, {args.steps} steps of "
        f"batch {args.batch_size}, live teacher (built-in architecture, initial weights), "
        f"{args.cpus_per_worker:g} CPUs per trial; trial_samples_per_s: the loop's figure for "
        "its last report window; samples_per_s_over_wall: all trials' samples over the first "
        "start to the last end, start-up included",
        "settings": settings,
        "packed_over_alone": {
            "sum_of_trial_samples_per_s": packed["sum_of_trial_samples_per_s"]
            / alone["sum_of_trial_samples_per_s"],
            "samples_per_s_over_wall": packed["samples_per_s_over_wall"]
            / alone["samples_per_s_over_wall"],
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for name, row in settings.items():
        rates = ", ".join(f"{v:.0f}" for v in row["trial_samples_per_s"])
        overall = f"{row['samples_per_s_over_wall']:.0f} samples/s over {row['wall_s']:.1f} s"
        print(f"{name}: {row['trials']} trial(s), trial samples/s {rates}; {overall}")
    print(f"wrote {out}; run outputs in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
