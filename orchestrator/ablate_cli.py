"""`conaclip ablate` (a preset or the user's pair sets as Tune trials) and `conaclip demo`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.ablation import (
    AblationOutcome,
    AblationSpec,
    default_name,
    expand_trials,
    load_spec,
    pair_sets_payload,
    run_ablation,
    run_greedy,
)
from orchestrator.assets import resolve_run
from orchestrator.config import build_settings, read_yaml
from orchestrator.ray_cluster import init_ray
from orchestrator.train_cli import add_shared_flags, run_flags, workspace_of

DEFAULT_OUT = Path("runs/ablate")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _pair_sets(args: argparse.Namespace, file_values: dict[str, Any]):
    """(preset, pair sets, baseline name, preset settings) from --pairs, --config or --preset."""
    from search_spaces.presets import load_preset, pair_sets_from_text, pair_sets_from_yaml

    if args.pairs:
        return "custom", pair_sets_from_text(args.pairs), None, {}
    if "pair_sets" in file_values or "pairs" in file_values:
        sets = pair_sets_from_yaml(args.config)
        return file_values.get("preset", "custom"), sets, file_values.get("baseline"), {}
    preset = load_preset(args.preset or file_values.get("preset", "smoke"))
    baseline = preset.baseline.name if preset.baseline is not None else None
    return preset.name, list(preset.pair_sets), baseline, dict(preset.settings)


def build_spec(args: argparse.Namespace) -> tuple[AblationSpec, bool]:
    """The ablation described by the flags/config, and whether trials read the teacher cache."""
    file_values = read_yaml(args.config) if args.config else {}
    preset, pair_sets, baseline, preset_settings = _pair_sets(args, file_values)
    for key in ("pair_sets", "pairs", "preset", "baseline", "seeds", "scheduler"):
        file_values.pop(key, None)
    flags = {
        **run_flags(args),
        "cpus_per_worker": args.cpus_per_worker,
        "gpus_per_worker": args.gpus_per_worker,
        "use_gpu": True if args.gpus_per_worker else None,
    }
    settings = build_settings(
        {**preset_settings, **file_values}, flags, source=args.config or "command line"
    )
    out = Path(args.out or DEFAULT_OUT).resolve()
    uri = args.tracking_uri or tracking.default_tracking_uri(out)
    return AblationSpec(
        name=args.name or default_name(preset),
        preset=preset,
        pair_sets=pair_sets_payload(pair_sets),
        baseline=baseline,
        seeds=list(range(args.seeds)),
        run=settings.run.model_copy(update={"pairs": _template_pairs(pair_sets)}),
        scaling=settings.scaling,
        scheduler=args.scheduler,
        out_dir=str(out),
        tracking_uri=uri,
        max_concurrent_trials=args.max_concurrent_trials,
    ), settings.use_teacher_cache


def _template_pairs(pair_sets):
    """Pairs of the run template: a set that needs the teacher when any does, so the teacher
    and its cache are prepared once in the driver for every trial."""
    from trainers.run_config import DistillConfig

    for pair_set in pair_sets:
        if DistillConfig(pairs=list(pair_set.pairs)).needs_teacher:
            return list(pair_set.pairs)
    return list(pair_sets[0].pairs)


def print_trials(spec: AblationSpec) -> None:
    trials = expand_trials(spec)
    width = max(len(t["pair_set"]) for t in trials)
    print(f"{len(trials)} trials ({len(spec.pair_sets)} pair sets x {len(spec.seeds)} seeds), "
          f"{spec.run.steps} steps each = {len(trials) * spec.run.steps} trial-steps "
          f"(batch {spec.run.batch_size} x {spec.scaling.num_workers} worker(s))")  # fmt: skip
    for index, trial in enumerate(trials, 1):
        print(f"{index:3d}  {trial['pair_set']:<{width}}  seed {trial['seed']}  {trial['pairs']}")


def summarize(outcome: AblationOutcome, spec: AblationSpec) -> int:
    finished = len(outcome.trials) - len(outcome.failed)
    print(f"ablation {spec.name}: {finished}/{len(outcome.trials)} trials finished; "
          f"MLflow: {spec.tracking_uri} (experiment {spec.name})")  # fmt: skip
    for trial in outcome.failed:
        print(f"FAILED {trial.pair_set} seed {trial.seed}: {trial.error}", file=sys.stderr)
    return 1 if outcome.failed else 0


def _ablate(args: argparse.Namespace) -> int:
    if args.resume:
        spec = load_spec(args.out or DEFAULT_OUT, args.name)
        use_cache = True
    else:
        spec, use_cache = build_spec(args)
    if args.dry_run:
        print_trials(spec)
        return 0
    tracking.check_tracking_uri(spec.tracking_uri)
    # Create (and migrate) the store now, in this one process, before anyone else reads it.
    tracking.get_or_create_experiment(spec.tracking_uri, spec.experiment_name)
    # Tune's status table is the progress; per-worker logs would drown it.
    init_ray(args.address, log_to_driver=False)
    if not args.resume:
        resolved = resolve_run(spec.run, workspace_of(args), use_cache)
        spec = spec.model_copy(update={"run": resolved})
    if spec.preset == "greedy" and not args.resume:
        from search_spaces.presets import baseline_pair_set

        _say(f"greedy ablation {spec.name}: round 1 has {spec.trial_count} trials")
        outcome = run_greedy(spec, baseline_pair_set())
        code = summarize(outcome, spec)
        print(f"greedy selection: {outcome.final.key() if outcome.final else '-'}")
        return code
    _say(f"ablation {spec.name}: {spec.trial_count} trials -> {spec.out_dir}")
    outcome = run_ablation(spec, resume=args.resume)
    return summarize(outcome, spec)


def add_ablation_flags(parser: argparse.ArgumentParser) -> None:
    add_shared_flags(parser)
    group = parser.add_argument_group("ablation")
    group.add_argument("--preset", help="search-space preset (see search_spaces/; default smoke)")
    group.add_argument("--pairs", help="your own pair sets: 'a:b,c:d;e:f' (';' between sets)")
    group.add_argument("--seeds", type=int, default=1, help="repeat each pair set with K seeds")
    group.add_argument(
        "--scheduler",
        choices=("fifo", "asha"),
        default="fifo",
        help="asha stops weak trials early on rsum (default: run all to the end)",
    )
    group.add_argument("--name", help="ablation id: Tune run and MLflow experiment name")
    group.add_argument("--tracking-uri", help="MLflow URI (default sqlite:///<out>/mlruns.db)")
    group.add_argument("--steps", type=int)
    group.add_argument("--eval-every", type=int)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--workers", type=int, help="Ray Train workers per trial")
    group.add_argument("--cpus-per-worker", type=float)
    group.add_argument("--gpus-per-worker", type=float, help="> 0 trains on GPUs (nccl)")
    group.add_argument(
        "--max-concurrent-trials",
        type=int,
        help="cap on trials at once (default: what free resources hold)",
    )
    group.add_argument(
        "--no-teacher-cache",
        action="store_true",
        help="run the teacher live in every trial instead of reading the cache",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    ablate = subparsers.add_parser(
        "ablate",
        help="run an ablation preset as Ray Tune trials tracked in MLflow",
        description="One Ray Tune trial per (pair set, seed); each trial is a Ray Train run. "
        "Every trial is an MLflow run. Ends non-zero naming failed trials. --resume finishes "
        "an interrupted ablation; --dry-run prints the trial list and runs nothing.",
    )
    add_ablation_flags(ablate)
    ablate.add_argument("--dry-run", action="store_true", help="print the trials, run nothing")
    ablate.add_argument(
        "--resume",
        action="store_true",
        help="finish the newest (or --name) interrupted ablation under --out",
    )
    ablate.set_defaults(handler=_ablate)

    demo = subparsers.add_parser(
        "demo",
        help="the whole chain on the built-in data with small settings",
        description="Built-in data -> teacher (trained once, cached) -> teacher cache -> the "
        "demo preset -> table + heatmap + best. Prints where everything is.",
    )
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--home", help="where built-in data and teachers are kept")
    demo.add_argument("--preset", default="demo")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from orchestrator import report_cli

    started = time.time()
    parser = argparse.ArgumentParser()
    add_ablation_flags(parser)
    ablate_args = parser.parse_args(
        ["--preset", args.preset, "--out", args.out, "--name", default_name(args.preset)]
        + (["--home", args.home] if args.home else [])
    )
    ablate_args.dry_run = ablate_args.resume = False
    ablate_args.address = None
    spec, use_cache = build_spec(ablate_args)
    init_ray(None, log_to_driver=False)
    resolved = resolve_run(spec.run, workspace_of(ablate_args), use_cache)
    spec = spec.model_copy(update={"run": resolved})
    _say(f"demo: {spec.trial_count} trials of preset {spec.preset}")
    code = summarize(run_ablation(spec), spec)
    out = Path(args.out)
    common = {"experiment": spec.name, "tracking_uri": spec.tracking_uri, "out": out,
              "metric": "rsum"}  # fmt: skip
    report_cli._table(argparse.Namespace(**common, format="md"))
    report_cli._best(argparse.Namespace(**common, verify=False))
    reports = out / "reports" / spec.name
    print(f"\ndemo finished in {time.time() - started:.0f} s")
    print(f"table:   {reports / 'table.md'}")
    print(f"heatmap: {reports / 'heatmap.png'}")
    print(f"MLflow:  {spec.tracking_uri}")
    print(f"open the MLflow UI: conaclip ui --out {out}")
    return code
