"""The distillation loop on whatever device this machine has (CUDA when present): one bare run
on freshly generated built-in data with a live teacher, reporting samples/s and recall.

This is the GPU path check: DistillationRun picks cuda, optional bf16 autocast (--amp), the
teacher forward and retrieval eval on the device.

    python benchmarks/loop_device.py --steps 60 --amp --out runs/bench/loop_device.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import trainers  # noqa: F401  (torchvision compat first)
from trainers.distill import train_loop_per_worker
from trainers.synth_shards import synthesize
from trainers.teacher import teacher_config, train_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-steps", type=int, default=60)
    parser.add_argument("--student", default="conaclip-student-s")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--out", default="runs/bench/loop_device.json")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as root:
        data = synthesize(Path(root) / "data", train_samples=4000, eval_images=200,
                          progress=False)  # fmt: skip
        train, evals = str(data.out_dir / "train"), str(data.out_dir / "eval")
        started = time.time()
        teacher = train_teacher(
            teacher_config(
                train, evals, steps=args.teacher_steps, batch_size=args.batch_size, amp=args.amp
            ),
            Path(root) / "teachers",
        )
        rows.append({"run": "teacher (CLIP loss)", "wall_s": time.time() - started,
                     **teacher.metrics})  # fmt: skip
        for pairs in ("inter_ss:infonce", "intra_ts:infonce,inter_ss:kl,intra_ss:sym_kl"):
            reports: list[dict] = []
            config = {
                "pairs": pairs, "student": args.student, "teacher": teacher.name,
                "teacher_checkpoint": str(teacher.checkpoint), "train_shards": train,
                "eval_shards": evals, "steps": args.steps, "eval_every": args.steps,
                "batch_size": args.batch_size, "amp": args.amp,
                "out_dir": str(Path(root) / pairs.replace(":", "_").replace(",", "+")),
            }  # fmt: skip
            started = time.time()
            train_loop_per_worker(config, lambda m, d, sink=reports: sink.append(m))
            rows.append({"run": pairs, "wall_s": time.time() - started, **reports[-1]})
    print(f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'})")
    print("| run | samples/s | rsum | t2i_R1 | i2t_R1 | wall s |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['samples_per_s']:.0f} | {r['rsum']:.1f} | {r['t2i_R1']:.1f} | "
              f"{r['i2t_R1']:.1f} | {r['wall_s']:.0f} |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "args": vars(args), "rows": rows},
                                         indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
