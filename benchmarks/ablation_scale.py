"""Ablation-scale benchmarks: one ablation end to end, timed phase by phase, and the
comparisons built from several such runs (their arithmetic: ``orchestrator.asha_replay``,
``orchestrator.run_timing``).

    # the strategy-selection table (20 pair sets, seed 0) with a fresh teacher cache
    python benchmarks/ablation_scale.py run --preset single_additions --seeds 0 --fresh-cache \\
        --out runs/bench/ablation/grid-s0.json
    # the same with ASHA; two more seeds; the demo grid on 1 node x 1 CPU and 2 nodes x 1 CPU
    python benchmarks/ablation_scale.py run --preset single_additions --seeds 0 \\
        --scheduler asha --out runs/bench/ablation/asha-s0.json
    python benchmarks/ablation_scale.py run --seeds 1 --out runs/bench/ablation/grid-s1.json
    python benchmarks/ablation_scale.py run --preset demo --nodes 1 --out .../nodes1.json
    python benchmarks/ablation_scale.py run --preset demo --nodes 2 --out .../nodes2.json
    # tables: ASHA runs seed by seed against the same seeds of one fifo grid that reported as
    # often; ASHA replayed on that grid's reports for every grace period and reduction factor
    python benchmarks/ablation_scale.py asha .../grid-s012-e30.json .../asha-s2-default.json ...
    python benchmarks/ablation_scale.py asha-replay .../grid-s012-e30.json
    python benchmarks/ablation_scale.py stability .../grid-s0.json .../grid-s1.json .../grid-s2.json
    python benchmarks/ablation_scale.py scaling .../grid-s0.json .../nodes1.json .../nodes2.json

Every trial runs as the product runs it (`conaclip ablate`: a Tune trial launching a
TorchTrainer, MLflow logging in the driver). Per trial the loop reports where its time went
(setup_s, train_s, eval_s, checkpoint_s since the worker started); Tune's time_total_s minus
those is Ray's share: the trial actor, the Train controller, the worker group's start and the
report plumbing. Settings default to the demo's (student-xs, batch 32, 150 steps) with an eval
every 30 steps so that ASHA has five rungs to cut at.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trainers  # noqa: F401  (torchvision compat first)
from orchestrator.asha_replay import (
    asha_replay_rows,
    asha_rungs,
    asha_vs_grid,
    halving_step_share,
    kendall_tau,
    report_ranks,
)
from orchestrator.ray_cluster import end_started, free_port
from orchestrator.run_timing import seed_prefix_walls

PHASES = ("setup_s", "train_s", "eval_s", "checkpoint_s")


# ---------------------------------------------------------------------------- the cluster


def _ports() -> list[str]:
    # Every port of its own, so that another Ray cluster on this machine cannot clash.
    flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
             "--object-manager-port")  # fmt: skip
    return [item for flag in flags for item in (flag, str(free_port()))]


def auth_token_env(workdir: Path) -> None:
    """Token authentication with a token of our own, for the `ray start` nodes and for this
    process. Must run before this process first imports ray, which reads it only then."""
    token = workdir / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))


@contextlib.contextmanager
def ray_nodes(count: int, cpus_per_node: int, workdir: Path) -> Iterator[str]:
    """``count`` Ray nodes on loopback (a head + ``count - 1`` workers joined with
    ``ray start --address``), each with ``cpus_per_node`` CPUs; yields the head's address.
    Token authentication stays on (``auth_token_env`` first). Ended by PID, never ``ray stop``."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    port, dashboard = free_port(), free_port()
    # The state API (Ray Train's placement-group cleaner uses it) must find this head's
    # dashboard, not a cluster an earlier `ray start` recorded (see orchestrator.ray_cluster).
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    address = f"127.0.0.1:{port}"
    common = ["--block", "--num-cpus", str(cpus_per_node), "--disable-usage-stats"]
    head = [ray_bin, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard)]  # fmt: skip
    worker = [ray_bin, "start", "--address", address, "--node-ip-address", "127.0.0.1"]
    processes: list[subprocess.Popen] = []
    try:
        for index in range(count):
            # Each node its own ports, drawn just before it starts: nodes on one machine
            # must not share them, and a port drawn early may be taken by then.
            worker_ports = ["--min-worker-port", str(20000 + 2000 * index),
                            "--max-worker-port", str(21999 + 2000 * index)]  # fmt: skip
            command = [*(head if index == 0 else worker), *common, *_ports(), *worker_ports]
            log = (workdir / f"node{index}.log").open("w")
            processes.append(
                subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
            _wait_for_nodes(address, index + 1, timeout_s=120)
        yield address
    finally:
        end_started(processes)


def _wait_for_nodes(address: str, count: int, timeout_s: float) -> None:
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = subprocess.run(
            [sys.executable, "-c", probe, address], capture_output=True, text=True, timeout=120
        )
        if found.returncode == 0 and int(found.stdout.strip().splitlines()[-1]) >= count:
            return
        time.sleep(2)
    raise RuntimeError(f"Ray cluster at {address}: {count} node(s) not up in {timeout_s} s")


# ------------------------------------------------------------------------------- one run
def _trial_rows(tune_path: Path) -> list[dict[str, Any]]:
    from ray.tune import ExperimentAnalysis

    rows = []
    analysis = ExperimentAnalysis(str(tune_path))
    frames = analysis.trial_dataframes
    for trial in analysis.trials:
        last = trial.last_result or {}
        frame = frames.get(trial.trial_id)
        curve = (
            [[int(step), float(rsum)] for step, rsum in frame[["step", "rsum"]].dropna().values]
            if frame is not None and {"step", "rsum"} <= set(frame.columns)
            else []
        )
        row = {
            "trial_id": trial.trial_id,
            "curve": curve,  # [step, rsum] at every report: what an ASHA replay reads
            "pair_set": trial.config["pair_set"],
            "seed": trial.config["seed"],
            "status": trial.status,
            "step": last.get("step"),
            "rsum": last.get("rsum"),
            "time_total_s": last.get("time_total_s"),
            "ended_at": last.get("timestamp"),  # Unix seconds of the trial's last result
            **{phase: last.get(phase) for phase in PHASES},
        }
        if row["time_total_s"] is not None and None not in (row[p] for p in PHASES):
            row["ray_s"] = row["time_total_s"] - sum(row[p] for p in PHASES)
        rows.append(row)
    return rows


def _run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="conaclip-bench-"))
    if args.nodes:
        auth_token_env(work)
    import ray

    from orchestrator import table, tracking
    from orchestrator.ablate_cli import add_ablation_flags, build_spec
    from orchestrator.ablation import asha_grace_period, run_ablation
    from orchestrator.assets import resolve_run
    from orchestrator.cli_flags import workspace_of
    from orchestrator.ray_cluster import start_local_cluster
    from trainers.teacher_cache import build_teacher_cache

    seeds = [int(s) for s in args.seeds.split(",")]
    parser = argparse.ArgumentParser()
    add_ablation_flags(parser)
    name = f"{Path(args.out).stem}-{time.strftime('%H%M%S')}"
    flags = ["--preset", args.preset, "--name", name, "--out", str(work / "ablate"),
             "--student", args.student, "--steps", str(args.steps),
             "--eval-every", str(args.eval_every), "--batch-size", str(args.batch_size),
             "--scheduler", args.scheduler]  # fmt: skip
    if args.grace_period is not None:
        flags += ["--grace-period", str(args.grace_period)]
    if args.reduction_factor is not None:
        flags += ["--reduction-factor", str(args.reduction_factor)]
    spec, use_cache = build_spec(parser.parse_args(flags))
    spec = spec.model_copy(update={"seeds": seeds})
    started = time.time()
    timings: dict[str, float] = {"started_at": started}  # Unix s; the rest are durations
    with contextlib.ExitStack() as stack:
        if args.nodes:
            address = stack.enter_context(ray_nodes(args.nodes, args.cpus_per_node, work))
            ray.init(address=address, log_to_driver=False)
        else:
            start_local_cluster(num_cpus=args.cpus_per_node, log_to_driver=False)
        stack.callback(ray.shutdown)
        timings["cluster_start_s"] = time.time() - started
        # Data and the teacher are one-time assets (real users bring their own teacher).
        workspace = workspace_of(argparse.Namespace(home=None))
        run = resolve_run(spec.run, workspace, False, needs_teacher=spec.needs_teacher)
        phase = time.time()
        if args.fresh_cache:
            cache = work / "teacher-cache"
            build_teacher_cache(run.teacher, run.teacher_checkpoint, run.train_shards, cache)
            run = run.model_copy(update={"teacher_cache": str(cache)})
        else:
            run = resolve_run(run, workspace, use_cache, needs_teacher=spec.needs_teacher)
        timings["teacher_cache_s"] = time.time() - phase
        spec = spec.model_copy(update={"run": run})
        tracking.get_or_create_experiment(spec.tracking_uri, spec.experiment_name)
        phase = time.time()
        outcome = run_ablation(spec)
        timings["trials_s"] = time.time() - phase
        timings["wall_s"] = time.time() - started
        cluster = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "memory")}
        nodes = sum(1 for node in ray.nodes() if node["Alive"])
    trials = _trial_rows(spec.tune_dir / spec.name)
    selection = table.selection_table(tracking.runs_frame(spec.tracking_uri, spec.name))
    keep = ["pair_set", "pairs", "seeds", "rsum_mean", "rsum_std", "delta_rsum", "steps"]
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "handler"},
        "ablation": spec.name,
        "nodes": nodes,
        "cluster": cluster,
        "trials": trials,
        "failed": [t.pair_set for t in outcome.failed],
        "grace_period": asha_grace_period(spec) if args.scheduler == "asha" else None,
        "reduction_factor": spec.reduction_factor if args.scheduler == "asha" else None,
        "timings": timings,
        "table": json.loads(selection[keep].to_json(orient="records")),
        "best": str(selection.loc[selection["rsum_mean"].idxmax(), "pair_set"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    _print_split(result)
    print(f"\nwrote {args.out}; run outputs kept in {work}")


def _print_split(result: dict[str, Any]) -> None:
    trials = result["trials"]
    timings = result["timings"]
    total = {key: sum(t.get(key) or 0.0 for t in trials) for key in (*PHASES, "ray_s")}
    busy = sum(t.get("time_total_s") or 0.0 for t in trials)
    steps = sum(t.get("step") or 0 for t in trials)
    print(f"\n{len(trials)} trials on {result['nodes']} node(s) {result['cluster']}: "
          f"{timings['wall_s']:.0f} s wall, {steps} trial-steps, "
          f"{60 * len(trials) / timings['trials_s']:.2f} trials/min")  # fmt: skip
    print("\n| phase | seconds | share of trial time |\n|---|---:|---:|")
    print(f"| cluster start | {timings['cluster_start_s']:.0f} | |")
    print(f"| teacher cache build | {timings['teacher_cache_s']:.0f} | |")
    labels = {"ray_s": "Ray start-up + plumbing", "setup_s": "loop setup (models, eval set)",
              "train_s": "training steps", "eval_s": "evaluation",
              "checkpoint_s": "checkpoints + reports"}  # fmt: skip
    for key, label in labels.items():
        print(f"| {label} (sum over trials) | {total[key]:.0f} | {100 * total[key] / busy:.0f}% |")
    print(f"| trials, wall-clock | {timings['trials_s']:.0f} | "
          f"concurrency {busy / timings['trials_s']:.2f} |")  # fmt: skip
    print(f"| whole benchmark | {timings['wall_s']:.0f} | |")
    for seeds, seconds in seed_prefix_walls(result).items():
        print(
            f"the trials of the first {seeds} seed(s) had all finished {seconds:.0f} s after "
            "the benchmark started (cluster start and teacher cache included)"
        )
    per_trial = [t["ray_s"] + t["setup_s"] for t in trials if t.get("ray_s") is not None]
    if per_trial:
        print(f"\nper-trial start-up (Ray + loop setup): median {statistics.median(per_trial):.1f}"
              f" s, max {max(per_trial):.1f} s")  # fmt: skip


# --------------------------------------------------------------------------- comparisons
def _load(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _asha(args: argparse.Namespace) -> None:
    grid = _load(args.grid)
    rows = [row for path in args.asha for row in asha_vs_grid(grid, _load(path))]
    print("| seed | grace (reports) | ASHA trial-steps | share of the grid's | ran to the end "
          "| grid top-1 (rsum) | ASHA top-1 (rsum) | its grid rank, gap | grid top-1 stopped "
          "at step |\n|---:|---:|---:|---:|---:|---|---|---|---:|")  # fmt: skip
    for r in rows:
        pick = (
            f"`{r['asha_top']}` ({r['asha_top_rsum']:.2f}) | {r['asha_top_grid_rank']}, "
            f"{r['gap']:+.2f}"
            if r["asha_top"]
            else "none ran to the end | -"
        )
        print(
            f"| {r['seed']} | {r['grace_period']} | {r['asha_steps']} | {100 * r['share']:.0f}% "
            f"| {r['ran_to_end']} | `{r['grid_top']}` ({r['grid_top_rsum']:.2f}) | {pick} "
            f"| {r['grid_top_stopped_at']} |"
        )
    same = sum(r["same_top"] for r in rows)
    diffs = [r["max_rsum_diff"] for r in rows if r["max_rsum_diff"] is not None]
    print(f"\nsame top-1 in {same} of {len(rows)} seed(s) (goal: the grid's winner with <= 50% "
          f"of its trial-steps); trials run to the end differ from the grid's by at most "
          f"{max(diffs, default=float('nan')):.4f} rsum")  # fmt: skip
    reports = max(t["step"] or 0 for t in grid["trials"]) // args.eval_every
    print(f"\nsynchronous halving (reduction 2) over {reports} reports, by grace period:")
    for grace in range(1, reports + 1):
        rungs = ", ".join(str(r * args.eval_every) for r in asha_rungs(reports, grace))
        share = halving_step_share(reports, grace)
        print(f"  grace {grace} (rungs at steps {rungs}): {100 * share:.1f}% of the trial-steps")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


def _asha_replay(args: argparse.Namespace) -> None:
    grid = _load(args.grid)
    if any(not t.get("curve") for t in grid["trials"]):
        raise SystemExit(f"{args.grid}: trials without 'curve' (run it at this code, fifo)")
    print(
        "How early the end shows (each seed's cells at a report against the same cells at the "
        "end):\n\n| step | Kendall tau with the end, per seed | the final top-1's rank then, "
        "per seed |\n|---:|---|---|"
    )
    ranks = report_ranks(grid)
    for step in sorted({r["step"] for r in ranks}):
        at = [r for r in ranks if r["step"] == step]
        taus = ", ".join(f"{r['tau']:.2f}" for r in at)
        tops = ", ".join(f"{r['top_rank']}/{r['cells']}" for r in at)
        print(f"| {step} | {taus} | {tops} |")
    graces = list(range(1, max(len(t["curve"]) for t in grid["trials"]) + 1))
    timing = {"concurrency": args.concurrency, "startup_steps": args.startup_steps}
    rows = asha_replay_rows(grid, graces, args.reduction_factors, **timing)
    print(
        "\nASHA replayed (Tune's scheduler, the grid's own reports), by grace period (reports) "
        "and reduction factor:\n\n| grace | rf | trial-steps, share of the grid's, per seed "
        "| same top-1 | ASHA's pick: grid rank (rsum gap), per seed |\n|---:|---:|---|---:|---|"
    )
    for grace in graces:
        for factor in args.reduction_factors:
            at = [r for r in rows if (r["grace_period"], r["reduction_factor"]) == (grace, factor)]
            shares = ", ".join(f"{100 * r['share']:.0f}%" for r in at)
            # "+ 0.0" turns a gap of 0 into +0.00, not -0.00.
            picks = ", ".join(
                f"{r['asha_top_grid_rank']} ({-r['gap'] + 0.0:+.2f})" if r["asha_top"] else "none"
                for r in at
            )
            same = sum(r["same_top"] for r in at)
            print(f"| {grace} | {factor} | {shares} | {same} of {len(at)} | {picks} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"ranks": ranks, "replays": rows}, indent=2))


def _stability(args: argparse.Namespace) -> None:
    runs = [_load(path) for path in args.runs]
    per_seed: dict[int, dict[str, float]] = {}
    for r in runs:
        for t in r["trials"]:
            per_seed.setdefault(t["seed"], {})[t["pair_set"]] = t["rsum"]
    seeds = sorted(per_seed)
    names = sorted(set.intersection(*(set(v) for v in per_seed.values())))
    # Gain over the baseline of the same seed, so that a seed's overall luck cancels.
    gains = {n: [per_seed[s][n] - per_seed[s]["baseline"] for s in seeds] for n in names}
    rows = []
    for name in names:
        values = [per_seed[s][name] for s in seeds]
        g = gains[name]
        rows.append({"pair_set": name, "rsum": values, "mean": statistics.mean(values),
                     "std": statistics.stdev(values), "gain_mean": statistics.mean(g),
                     "gain_std": statistics.stdev(g)})  # fmt: skip
    rows.sort(key=lambda row: -row["mean"])
    print("| pair set | " + " | ".join(f"rsum seed {s}" for s in seeds) +
          " | mean ± std | gain vs baseline (same seed), mean ± std | gain > std |")  # fmt: skip
    print("|---|" + "---:|" * len(seeds) + "---:|---:|:-:|")
    for row in rows:
        clear = row["pair_set"] != "baseline" and row["gain_mean"] > row["gain_std"]
        cells = " | ".join(f"{v:.2f}" for v in row["rsum"])
        print(
            f"| {row['pair_set']} | {cells} | {row['mean']:.2f} ± {row['std']:.2f} | "
            f"{row['gain_mean']:+.2f} ± {row['gain_std']:.2f} | {'yes' if clear else ''} |"
        )
    taus = {}
    for i, s in enumerate(seeds):
        for t in seeds[i + 1 :]:
            taus[f"{s}-{t}"] = kendall_tau([per_seed[s][n] for n in names],
                                           [per_seed[t][n] for n in names])  # fmt: skip
    print("\nKendall tau of the rsum ranking between seeds: " +
          ", ".join(f"seeds {k}: {v:.2f}" for k, v in taus.items()))  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "kendall_tau": taus}, indent=2))


def _scaling(args: argparse.Namespace) -> None:
    print("| cluster | trials | trial wall s | trials/min | mean trial s | Ray share s (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    out = []
    for path in args.runs:
        r = _load(path)
        trials, wall = r["trials"], r["timings"]["trials_s"]
        ray_s = [t["ray_s"] for t in trials if t.get("ray_s") is not None]
        row = {"run": path, "nodes": r["nodes"], "cpus": r["cluster"].get("CPU"),
               "trials": len(trials), "trials_s": wall, "trials_per_min": 60 * len(trials) / wall,
               "mean_trial_s": statistics.mean(t["time_total_s"] for t in trials),
               "ray_s_median": statistics.median(ray_s) if ray_s else None}  # fmt: skip
        out.append(row)
        print(
            f"| {row['nodes']} node(s), {row['cpus']:.0f} CPU(s) | {row['trials']} | "
            f"{wall:.0f} | {row['trials_per_min']:.2f} | {row['mean_trial_s']:.0f} | "
            f"{row['ray_s_median']:.1f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one ablation and record where its time went")
    run.add_argument("--preset", default="single_additions")
    run.add_argument("--seeds", default="0", help="comma-separated seeds")
    run.add_argument("--scheduler", choices=("fifo", "asha"), default="fifo")
    run.add_argument("--student", default="conaclip-student-xs")
    run.add_argument("--steps", type=int, default=150)
    run.add_argument("--eval-every", type=int, default=30)
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--grace-period", type=int, default=None,
                     help="reports before ASHA may stop a trial (default: conaclip's)")  # fmt: skip
    run.add_argument("--reduction-factor", type=int, default=None,
                     help="ASHA's reduction factor (default: conaclip's, 2)")  # fmt: skip
    run.add_argument(
        "--fresh-cache",
        action="store_true",
        help="build (and time) a new teacher cache instead of reusing the home's",
    )
    run.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="0: an in-process local cluster; N: `ray start` N nodes on loopback",
    )
    run.add_argument("--cpus-per-node", type=int, default=2)
    run.add_argument("--out", required=True)
    run.set_defaults(handler=_run)
    asha = sub.add_parser("asha", help="ASHA vs the full grid: trial-steps and the winner")
    asha.add_argument("grid")
    asha.add_argument("asha", nargs="+", help="ASHA runs' JSONs (each of seeds in the grid)")
    asha.add_argument("--eval-every", type=int, default=30, help="the ASHA runs' (steps)")
    asha.add_argument("--out", default="runs/bench/ablation/asha_vs_grid.json")
    asha.set_defaults(handler=_asha)
    replay = sub.add_parser(
        "asha-replay", help="ASHA replayed on a fifo grid's reports, every grace and factor"
    )
    replay.add_argument("grid", help="a fifo run's JSON at this code (trials carry 'curve')")
    replay.add_argument("--reduction-factors", type=int, nargs="+", default=[2, 3, 4])
    replay.add_argument("--concurrency", type=int, default=2, help="trials at once")
    replay.add_argument(
        "--startup-steps", type=int, default=40, help="Ray's start-up per trial in step-times"
    )
    replay.add_argument("--out", default="runs/bench/ablation/asha_replay.json")
    replay.set_defaults(handler=_asha_replay)
    stability = sub.add_parser("stability", help="one grid over several seeds: ranking spread")
    stability.add_argument("runs", nargs="+")
    stability.add_argument("--out", default="runs/bench/ablation/stability.json")
    stability.set_defaults(handler=_stability)
    scaling = sub.add_parser("scaling", help="trials/minute of runs on different clusters")
    scaling.add_argument("runs", nargs="+")
    scaling.add_argument("--out", default="runs/bench/ablation/scaling.json")
    scaling.set_defaults(handler=_scaling)
    args = parser.parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
