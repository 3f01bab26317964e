"""How much noise one trial carries, and what cuts the seeds a cell needs: the demo's trial on
the built-in data, measured with the training loop itself (no Ray, so the figures are the
loop's; a Ray trial adds its start-up, measured separately).

Three stages, each rerunnable (finished work is kept and skipped):

    python benchmarks/noise_budget.py train --variant base --seeds 0-7
    python benchmarks/noise_budget.py train --variant ema --seeds 0-7 --set ema_decay=0.9
    python benchmarks/noise_budget.py train --variant long --seeds 0-7 --set steps=300
    python benchmarks/noise_budget.py evaluate
    python benchmarks/noise_budget.py analyze --out docs/results/noise_budget.json

``train`` runs the demo's pair sets (baseline and its four single additions, fair cells) at
each seed, two at a time with one thread each, and keeps every run's final student (and its
EMA, when on) under ``runs/bench/noise_budget/<variant>/``. ``evaluate`` scores every kept
student on the built-in eval set grown to 5,000 images (its first 1,000 are the usual set):
once on those 1,000 alone (the protocol before) and once as five folds of 1,000 (COCO's 1k
protocol), keeping the per-query ranks. ``analyze`` computes, per variant and protocol, each
cell's paired gains over seeds, their spread, the eval set's share of the variance of the mean
gain (``orchestrator.gain_test``), the seeds a cell of gain +5 rsum needs at Holm's first step
over the 19 cells of ``single_additions`` and over the demo's 4, and the cost in trial-seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import trainers  # noqa: F401  (torchvision compat first)

ROOT = Path("runs/bench/noise_budget")
DEMO = {"student": "conaclip-student-xs", "steps": 150, "batch_size": 32, "eval_every": 150}
CELLS = {
    "baseline": "intra_ts:infonce",
    "+intra_ts:sym_sd": "intra_ts:infonce,intra_ts:sym_sd*auto",
    "+intra_ss:sd": "intra_ts:infonce,intra_ss:sd*auto",
    "+inter_ts:sym_kl": "intra_ts:infonce,inter_ts:sym_kl*auto",
    "+inter_ss:kl": "intra_ts:infonce,inter_ss:kl*auto",
}
EVAL_IMAGES = 5000
FOLD = 1000


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def _seeds(text: str) -> list[int]:
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def _train_one(config: dict[str, Any], target: str, ranks_target: str | None = None) -> dict:
    """One bare run of ``config``: its final checkpoint copied to ``target`` (and its eval
    ranks to ``ranks_target``), and its rsum and phase seconds."""
    import torch

    from trainers.distill import CHECKPOINT_FILE, RANKS_FILE, train_loop_per_worker

    torch.set_num_threads(1)
    kept: dict[str, Any] = {}

    def report(metrics: dict[str, Any], directory: str | None) -> None:
        kept.update(metrics)
        if directory:
            shutil.copy(Path(directory) / CHECKPOINT_FILE, target + ".partial")
            if ranks_target:
                shutil.copy(Path(directory) / RANKS_FILE, ranks_target)

    started = time.time()
    with tempfile.TemporaryDirectory() as out:
        train_loop_per_worker({**config, "out_dir": out, "torch_threads": 1}, report)
    Path(target + ".partial").rename(target)
    wall = time.time() - started
    return {"rsum_1k": kept.get("rsum"), "wall_s": wall, "train_s": kept.get("train_s"),
            "eval_s": kept.get("eval_s"), "setup_s": kept.get("setup_s")}  # fmt: skip


def train(args: argparse.Namespace) -> None:
    from orchestrator.assets import resolve_run
    from orchestrator.config import Workspace
    from orchestrator.ray_cluster import start_local_cluster
    from trainers.run_config import DistillConfig

    settings = {**DEMO, **{k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}}
    folder = ROOT / args.variant
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "variant.json"
    if meta.is_file() and json.loads(meta.read_text())["settings"] != settings:
        raise SystemExit(f"{meta}: variant {args.variant} was trained with other settings")
    template = DistillConfig(pairs=CELLS["baseline"], **settings)
    start_local_cluster(num_cpus=2, log_to_driver=False)  # a missing teacher cache builds on Ray
    template = resolve_run(template, Workspace(), use_teacher_cache=True)
    import ray

    ray.shutdown()  # an idle cluster's daemons would take CPU from the runs
    meta.write_text(json.dumps({"settings": settings, "config": template.model_dump()}, indent=1))
    rows_file = folder / "runs.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else {}
    jobs = []
    for seed in _seeds(args.seeds):
        for cell, pairs in CELLS.items():
            name = f"{cell}__s{seed}"
            if name in rows and (folder / f"{name}.pt").is_file():
                continue
            config = template.model_copy(update={"seed": seed}).model_dump()
            config["pairs"] = pairs
            jobs.append((name, config, str(folder / f"{name}.pt")))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.parallel, mp_context=context) as pool:
        futures = {pool.submit(_train_one, c, t): n for n, c, t in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            name = futures[future]
            rows[name] = future.result()
            rows_file.write_text(json.dumps(rows, indent=1, sort_keys=True))
            print(f"[{done}/{len(jobs)}] {args.variant} {name}: {rows[name]}", flush=True)


def _eval_set():
    from orchestrator.assets import ensure_builtin_data
    from orchestrator.config import Workspace
    from trainers.eval_cache import load_eval_set_cached
    from trainers.models import build_student

    workspace = Workspace()
    shards = ensure_builtin_data(workspace, eval_images=EVAL_IMAGES)
    _, loaded = build_student(DEMO["student"], teacher_embed_dim=None)
    return load_eval_set_cached(shards.eval, loaded.preprocess_eval, loaded.tokenizer,
                                workspace.eval_cache_dir)  # fmt: skip


def _score(model, eval_set) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Ranks on the first fold alone and on every fold, and the seconds each took (encoding
    included: what a trial's eval would cost)."""
    import torch

    from trainers.evaluate import encode_batches, retrieval_ranks

    out, seconds = {}, {}
    ids = eval_set.text_to_image.long()
    with torch.no_grad():
        for protocol, n_images in (("1k", FOLD), ("5x1k", EVAL_IMAGES)):
            started = time.perf_counter()
            captions = ids < n_images
            image = encode_batches(lambda x: model.clip.encode_image(x, normalize=True),
                                   eval_set.images[:n_images], 256, "cpu")  # fmt: skip
            text = encode_batches(lambda t: model.clip.encode_text(t, normalize=True),
                                  eval_set.tokens[captions], 256, "cpu")  # fmt: skip
            ranks = retrieval_ranks(image, text, ids[captions], fold_size=FOLD)
            seconds[protocol] = time.perf_counter() - started
            out[protocol] = {**ranks.arrays(), "text_to_image": ids[captions].numpy()}
    return out, seconds


def _evaluate_file(path: str) -> tuple[str, dict[str, float]]:
    import numpy as np
    import torch

    from trainers.models import build_student

    torch.set_num_threads(1)
    state = torch.load(path, map_location="cpu", weights_only=True)
    eval_set = _eval_set()
    timing: dict[str, float] = {}
    for weights in ("raw", "ema"):
        key = "student" if weights == "raw" else "ema_student"
        if key not in state:
            continue
        head = state[key].get("teacher_head.weight")
        model, _ = build_student(DEMO["student"], teacher_embed_dim=int(head.shape[0]))
        model.load_state_dict(state[key])
        model.eval()
        scored, seconds = _score(model, eval_set)
        for protocol, arrays in scored.items():
            np.savez(path.replace(".pt", f".{weights}.{protocol}.npz"), **arrays)
            timing[f"{weights}.{protocol}"] = seconds[protocol]
    return path, timing


def evaluate(args: argparse.Namespace) -> None:
    _eval_set()  # decoded once into the eval cache before the pool reads it
    files = sorted(str(p) for p in ROOT.glob("*/*.pt"))
    todo = [f for f in files if not Path(f.replace(".pt", ".raw.5x1k.npz")).is_file()]
    timing_file = ROOT / "eval_seconds.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.parallel, mp_context=context) as pool:
        for done, future in enumerate(as_completed([pool.submit(_evaluate_file, f)
                                                    for f in todo]), 1):  # fmt: skip
            path, seconds = future.result()
            timing[path] = seconds
            timing_file.write_text(json.dumps(timing, indent=1))
            print(f"[{done}/{len(todo)}] {path}: {seconds}", flush=True)


def _provenance(argv: list[str]) -> dict[str, Any]:
    import platform
    import subprocess

    import ray
    import torch

    def cpu() -> str:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
        return platform.processor()

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    # The driver that called this, so each benchmark's record names its own command.
    script = os.path.relpath(sys.argv[0]) if sys.argv[0] else "benchmarks/noise_budget.py"
    return {"command": " ".join(["python", script, *argv]),
            "commit": commit.strip(), "date": time.strftime("%Y-%m-%d"), "cpu": cpu(),
            "cores": multiprocessing.cpu_count(), "torch": torch.__version__,
            "ray": ray.__version__, "device": "cpu"}  # fmt: skip


def _summary(configs: list[dict[str, Any]], before: str, after: str) -> dict[str, Any]:
    """The protocol before and the one kept (``variant:weights:protocol``): both sds, the
    seeds a +5 cell needs and what they cost."""

    def pick(key: str) -> dict[str, Any]:
        variant, weights, protocol = key.split(":")
        for c in configs:
            if (c["variant"], c["weights"], c["protocol"]) == (variant, weights, protocol):
                return c
        raise SystemExit(f"no measured config {key}")

    out: dict[str, Any] = {}
    for label, key in (("before", before), ("after", after)):
        c = pick(key)
        out[label] = {"config": key, "seed_sd": round(c["median_seed_sd"], 3),
                      "eval_se": round(c["median_eval_se"], 3),
                      "trial_s": round(c["train_s_per_trial"] + c["eval_s_per_trial"], 2),
                      "seeds_for_gain_5": c["seeds_for_gain_5"]}  # fmt: skip
    b, a = (out[k]["seeds_for_gain_5"]["family_19"]["seeds"] for k in ("before", "after"))
    out["seeds_ratio_family_19"] = None if not (a and b) else round(a / b, 3)
    return out


def analyze(args: argparse.Namespace) -> None:
    import numpy as np

    from orchestrator import stats
    from orchestrator.gain_test import paired_gain_test
    from orchestrator.verdicts import DEFAULT_MARGIN, seeds_to_decide

    timing = json.loads((ROOT / "eval_seconds.json").read_text())
    draws: dict[int, Any] = {}
    configs = []
    for folder in sorted(p for p in ROOT.iterdir() if (p / "runs.json").is_file()):
        runs = json.loads((folder / "runs.json").read_text())
        settings = json.loads((folder / "variant.json").read_text())["settings"]
        seeds = sorted({int(n.rsplit("__s", 1)[1]) for n in runs})
        for weights in ("raw", "ema"):
            for protocol in ("1k", "5x1k"):
                files = {n: folder / f"{n}.{weights}.{protocol}.npz" for n in runs}
                if not all(f.is_file() for f in files.values()):
                    continue
                ranks = {n: dict(np.load(f)) for n, f in files.items()}
                n_images = int(ranks[next(iter(ranks))]["i2t_rank"].size)
                draw = draws.setdefault(n_images, stats.QueryBootstrap(
                    stats.bootstrap_indices(n_images, stats.DEFAULT_N_BOOT, 0)))  # fmt: skip
                rsum = {n: stats.recalls_from_ranks(r)["rsum"] for n, r in ranks.items()}
                boot = {n: draw.metric(r, "rsum") for n, r in ranks.items()}
                cells = {}
                for cell in CELLS:
                    if cell == "baseline":
                        continue
                    names = [(f"{cell}__s{s}", f"baseline__s{s}") for s in seeds]
                    gains = [rsum[a] - rsum[b] for a, b in names]
                    test = paired_gain_test(gains, np.vstack([boot[a] - boot[b] for a, b in names]))
                    cells[cell] = {"gain_mean": test.mean, "seed_sd": float(np.std(gains, ddof=1)),
                                   "eval_se": float(np.sqrt(test.eval_var)),
                                   "gains": [round(g, 3) for g in gains]}  # fmt: skip
                seed_sd = float(np.median([c["seed_sd"] for c in cells.values()]))
                eval_var = float(np.median([c["eval_se"] ** 2 for c in cells.values()]))
                wall = [r["wall_s"] for n, r in runs.items()]
                evals = [t[f"{weights}.{protocol}"] for f, t in timing.items()
                         if Path(f).parent == folder and f"{weights}.{protocol}" in t]  # fmt: skip
                train_s = float(np.median([r["train_s"] for r in runs.values()]))
                trial_s = train_s + float(np.median(evals))
                need = {}
                for family in (19, 4):
                    found = seeds_to_decide(5.0, seed_sd, eval_var, 0.05 / family,
                                            DEFAULT_MARGIN, 60)  # fmt: skip
                    need[f"family_{family}"] = {"seeds": found.seeds,
                                                "eval_bound": found.eval_bound,
                                                "trial_s": None if found.seeds is None
                                                else round(found.seeds * trial_s, 1)}  # fmt: skip
                configs.append({
                    "variant": folder.name, "settings": settings, "weights": weights,
                    "protocol": protocol, "eval_images": n_images, "seeds": len(seeds),
                    "cells": cells, "median_seed_sd": seed_sd,
                    "median_eval_se": float(np.sqrt(eval_var)),
                    "train_s_per_trial": round(train_s, 2),
                    "eval_s_per_trial": round(float(np.median(evals)), 2),
                    "bare_wall_s_per_trial_2_parallel": round(float(np.median(wall)), 2),
                    "seeds_for_gain_5": need,
                })  # fmt: skip
    result = {
        **_provenance(args.argv),
        "what": "the demo's trial (student-xs, fair cells, batch 32) on the built-in data: per "
        "cell the paired gains over seeds (cell - baseline, same seed), their sd (training "
        "noise plus per-seed eval noise), the eval set's shared SE (sqrt of the cross-seed "
        "covariance of the bootstrap gains, 2000 resamples of images), and the seeds a cell "
        "of gain +5 rsum would need at Holm's first step over 19 and over 4 cells with the "
        "median sd and SE of the 4 cells (orchestrator.verdicts.seeds_to_decide, margin "
        f"{DEFAULT_MARGIN:g}); times are one-thread seconds, two runs at a time, no Ray",
        "configs": configs,
        "summary": _summary(configs, args.before, args.after),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for c in configs:
        print(c["variant"], c["weights"], c["protocol"], "sd", round(c["median_seed_sd"], 2),
              "eval se", round(c["median_eval_se"], 2), c["seeds_for_gain_5"],
              c["train_s_per_trial"], c["eval_s_per_trial"])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    t = sub.add_parser("train")
    t.add_argument("--variant", required=True)
    t.add_argument("--seeds", default="0-7")
    t.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    t.add_argument("--parallel", type=int, default=2)
    t.set_defaults(handler=train)
    e = sub.add_parser("evaluate")
    e.add_argument("--parallel", type=int, default=2)
    e.set_defaults(handler=evaluate)
    a = sub.add_parser("analyze")
    a.add_argument("--out", default="docs/results/noise_budget.json")
    a.add_argument("--before", default="base:raw:1k", help="variant:weights:protocol")
    a.add_argument("--after", default="base:raw:5x1k", help="variant:weights:protocol")
    a.set_defaults(handler=analyze)
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    args.handler(args)


if __name__ == "__main__":
    main()
