"""`conaclip ablate` (a preset or the user's pair sets as Tune trials, or raced seed by seed
with ``--race``) and `conaclip demo`."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator import reports, tracking
from orchestrator.ablation import (
    AblationOutcome,
    expand_trials,
    outcome_summary,
    resume_ablation,
    run_ablation,
    run_greedy,
)
from orchestrator.ablation_spec import (
    AblationSpec,
    RaceSettings,
    default_name,
    load_spec,
    pair_sets_by_name,
    resolve_spec,
)
from orchestrator.assets import teacher_provenance
from orchestrator.cli import EXIT_INTERRUPTED
from orchestrator.cli_flags import (
    AMP_HELP,
    DEFAULT_ABLATION_OUT,
    add_shared_flags,
    run_flags,
    workspace_of,
)
from orchestrator.config import Workspace, build_settings, read_yaml
from orchestrator.ray_cluster import init_ray
from orchestrator.run_lock import exclusive_ablation
from orchestrator.sequential import DEFAULT_SPENDING, SPENDING
from orchestrator.verdicts import DEFAULT_MARGIN
from trainers.errors import InputError

RACE_START_SEEDS = 2  # --seeds under --race: the fewest that give a t interval
RACE_MAX_SEEDS = 5
# The demo races its cells within a laptop's budget: ten minutes from an empty home.
DEMO_START_SEEDS = 2
DEMO_MAX_SEEDS = 6
DEMO_BUDGET_S = 600  # the demo's promise: ten minutes from an empty home on a 2-core laptop
DEMO_REPORT_S = 30  # what the table, heatmap and best take after the last round


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _pair_sets(args: argparse.Namespace, file_values: dict[str, Any]):
    """(preset, pair sets, baseline name, preset settings, kind, margin) from --pairs,
    --config or --preset. A user's own sets get the MoTIS baseline as reference when one of
    them is it."""
    from search_spaces.presets import (
        custom_preset,
        load_preset,
        pair_sets_from_text,
        pair_sets_from_yaml,
    )

    if args.pairs:
        preset = custom_preset(pair_sets_from_text(args.pairs))
        baseline = preset.baseline.name if preset.baseline is not None else None
        return "custom", list(preset.pair_sets), baseline, {}, "grid", None
    if "pair_sets" in file_values or "pairs" in file_values:
        sets = pair_sets_from_yaml(args.config)
        baseline = file_values.get("baseline")
        if baseline is None:
            found = custom_preset(sets).baseline
            baseline = found.name if found is not None else None
        return file_values.get("preset", "custom"), sets, baseline, {}, "grid", None
    preset = load_preset(args.preset or file_values.get("preset", "smoke"))
    baseline = preset.baseline.name if preset.baseline is not None else None
    return (preset.name, list(preset.pair_sets), baseline, dict(preset.settings), preset.kind,
            preset.margin)  # fmt: skip


def build_spec(args: argparse.Namespace) -> tuple[AblationSpec, bool]:
    """The ablation described by the flags/config, and whether trials read the teacher cache."""
    file_values = read_yaml(args.config) if args.config else {}
    preset, pair_sets, baseline, preset_settings, kind, margin = _pair_sets(args, file_values)
    margin = _margin(args, file_values, margin, args.config or "command line")
    for key in ("pair_sets", "pairs", "preset", "baseline", "seeds", "scheduler", "margin"):
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
    out = Path(args.out or DEFAULT_ABLATION_OUT).resolve()
    uri = args.tracking_uri or tracking.default_tracking_uri(out)
    race = _race_settings(args, preset, baseline, margin)
    seeds = race.start_seeds if race else (args.seeds if args.seeds is not None else 1)
    first = _first_seed(args)
    return AblationSpec(
        name=args.name or default_name(preset),
        preset=preset,
        kind=kind,
        pair_sets=pair_sets_by_name(pair_sets),
        baseline=baseline,
        seeds=list(range(first, first + seeds)),
        run=settings.run,
        scaling=settings.scaling,
        scheduler=args.scheduler,
        grace_period=_grace_period(args),
        reduction_factor=_reduction_factor(args),
        out_dir=str(out),
        tracking_uri=uri,
        max_concurrent_trials=args.max_concurrent_trials,
        tune_output=getattr(args, "tune_output", False),
        race=race,
    ), settings.use_teacher_cache


def _grace_period(args: argparse.Namespace) -> int | None:
    grace = getattr(args, "grace_period", None)
    if grace is None:
        return None
    if args.scheduler != "asha":
        raise InputError("--grace-period: only with --scheduler asha (fifo runs every trial)")
    if grace < 1:
        raise InputError(f"--grace-period {grace}: at least 1 report")
    return grace


def _reduction_factor(args: argparse.Namespace) -> int:
    factor = getattr(args, "reduction_factor", None)
    if factor is None:
        return AblationSpec.model_fields["reduction_factor"].default
    if args.scheduler != "asha":
        raise InputError("--reduction-factor: only with --scheduler asha (fifo stops no trial)")
    if factor < 2:
        raise InputError(f"--reduction-factor {factor}: at least 2 (1 would stop no trial)")
    return factor


def _first_seed(args: argparse.Namespace) -> int:
    first = getattr(args, "first_seed", None)
    if first is None:
        return 0
    if first < 0:
        raise InputError(f"--first-seed {first}: seeds are 0 or more")
    return first


def _margin(
    args: argparse.Namespace, file_values: dict[str, Any], preset_margin: float | None, source
) -> float:
    """--margin, else the config file's ``margin:``, else the preset's, else the default."""
    value = getattr(args, "margin", None)
    if value is None:
        value = file_values.get("margin", preset_margin)
    if value is None:
        return DEFAULT_MARGIN
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        where = "--margin" if getattr(args, "margin", None) is not None else f"{source}: margin"
        raise InputError(f"{where}: expected a positive gain in rsum, got {value!r}")
    return float(value)


def _race_settings(
    args: argparse.Namespace, preset: str, baseline: str | None, margin: float = 6.0
) -> RaceSettings | None:
    """``--race`` / ``--seeds`` / ``--max-seeds`` as RaceSettings (None without --race); a
    one-line InputError for a combination that cannot race."""
    race = getattr(args, "race", False)
    max_seeds = getattr(args, "max_seeds", None)
    if not race:
        if max_seeds is not None:
            raise InputError("--max-seeds: only with --race (a plain ablation runs --seeds)")
        if getattr(args, "spending", None) is not None:
            raise InputError("--spending: only with --race (a plain ablation has one look)")
        return None
    if baseline is None:
        raise InputError(
            f"--race: the pair sets of {preset} have no baseline; racing pairs every cell with "
            "the same-seed baseline (use a preset with one, or baseline: NAME in --config)"
        )
    if preset == "greedy":
        raise InputError("--race: the greedy preset runs its own rounds; race another preset")
    if args.scheduler != "fifo":
        raise InputError("--race: every trial must run to the end; drop --scheduler asha")
    start = args.seeds if args.seeds is not None else RACE_START_SEEDS
    if start < 1:
        raise InputError(f"--seeds {start}: a race starts with at least one seed per cell")
    maximum = max_seeds if max_seeds is not None else RACE_MAX_SEEDS
    if maximum < start:
        raise InputError(
            f"--max-seeds {maximum} is below --seeds {start}: every cell starts with --seeds"
        )
    return RaceSettings(
        start_seeds=start, max_seeds=maximum, first_seed=_first_seed(args), metric="rsum",
        margin=margin, spending=getattr(args, "spending", None) or DEFAULT_SPENDING,
    )  # fmt: skip


def print_trials(spec: AblationSpec) -> None:
    """The trials exactly as Tune expands them, with their trial-steps; for a race, round 1."""
    if spec.race is not None and spec.trials is None:
        print_race_plan(spec)
        return
    trials = expand_trials(spec)
    width = max(len(t["pair_set"]) for t in trials)
    if spec.trials is not None:
        shape = f"{len(spec.pair_sets)} pair sets, explicit trial list"
    else:
        shape = f"{len(spec.pair_sets)} pair sets x {len(spec.seeds)} seeds"
    print(f"{len(trials)} trials ({shape}), "
          f"{spec.run.steps} steps each = {len(trials) * spec.run.steps} trial-steps "
          f"(batch {spec.run.batch_size} x {spec.scaling.num_workers} worker(s))")  # fmt: skip
    for index, trial in enumerate(trials, 1):
        print(f"{index:3d}  {trial['pair_set']:<{width}}  seed {trial['seed']}  {trial['pairs']}")


def print_race_plan(spec: AblationSpec) -> None:
    """A race's first round (what a fresh race launches first) and its bounds."""
    from orchestrator.race import round_plan

    assert spec.race is not None and spec.baseline is not None
    cells = [name for name in spec.pair_sets if name != spec.baseline]
    race = spec.race
    first = round_plan(spec.baseline, cells, race.start_seeds, race.first_seed)
    full = len(spec.pair_sets) * race.max_seeds
    last = race.first_seed + race.start_seeds - 1
    print(f"race: round 1 runs every pair set at seeds {race.first_seed}..{last}; each "
          f"later round adds one seed to the cells still open and the baseline, up to "
          f"{race.max_seeds} seeds (at most {full} trials = {full * spec.run.steps} "
          f"trial-steps); trials already FINISHED in MLflow are not run again")  # fmt: skip
    print_trials(spec.model_copy(update={"name": f"{spec.name}-round1", "trials": first}))


def summarize(outcome: AblationOutcome, spec: AblationSpec) -> int:
    """Print the outcome (failed trials to stderr); 130 when interrupted (as a shell reports
    Ctrl-C), 1 when a trial failed, else 0."""
    summary, failures = outcome_summary(outcome, spec)
    print(summary)
    for line in failures:
        print(line, file=sys.stderr)
    if outcome.interrupted:
        return EXIT_INTERRUPTED
    return 1 if outcome.failed else 0


def _resume_spec(args: argparse.Namespace) -> tuple[AblationSpec, bool, bool]:
    """(spec, use teacher cache, already resolved) for --resume: the spec saved under
    <out>/tune/, else (that folder gone) the one the flags describe, which --name must name."""
    try:
        spec = load_spec(args.out or DEFAULT_ABLATION_OUT, args.name)
    except InputError as missing:
        if args.name is None:
            raise InputError(
                f"{missing}; to resume from the MLflow runs alone, repeat the ablation's own "
                "flags with --resume and its --name"
            ) from None
        spec, use_cache = build_spec(args)
        # Only an ablation MLflow knows can be resumed from it: a mistyped --name must not
        # quietly start a new, full ablation.
        database = tracking.sqlite_path(spec.tracking_uri)
        try:
            if database is not None and not database.is_file():
                raise InputError(f"no MLflow store at {database}")
            tracking.find_experiment(spec.tracking_uri, spec.experiment_name)
        except InputError as unknown:
            raise InputError(f"{missing}, and {unknown}: nothing to resume") from None
        return spec, use_cache, False
    if spec.race is not None and spec.round is not None:
        # The newest spec was one of a race's rounds: resume the race, not that round.
        spec = load_spec(args.out or DEFAULT_ABLATION_OUT, spec.experiment_name)
    if spec.round is None and re.fullmatch(r".+-resume\d+", spec.name):
        # The newest spec was an earlier resume's re-run: resume the ablation it belongs to.
        spec = load_spec(args.out or DEFAULT_ABLATION_OUT, spec.experiment_name)
    return spec, True, True


def _ablate(args: argparse.Namespace) -> int:
    if args.resume:
        spec, use_cache, resolved = _resume_spec(args)
    else:
        (spec, use_cache), resolved = build_spec(args), False
    if args.dry_run:
        print_trials(spec)
        return 0
    # Before the lock, whose file is the first thing an ablation writes.
    tracking.check_tracking_uri(spec.tracking_uri)
    with exclusive_ablation(spec.out_dir, spec.experiment_name):
        return _run(args, spec, use_cache, resolved)


def _run(args: argparse.Namespace, spec: AblationSpec, use_cache: bool, resolved: bool) -> int:
    """The ablation behind `conaclip ablate`, with its lock held."""
    # Create (and migrate) the store now, in this one process, before anyone else reads it.
    tracking.get_or_create_experiment(
        spec.tracking_uri,
        spec.experiment_name,
        description=describe(spec, getattr(args, "argv", None) or sys.argv[1:]),
    )
    if not resolved:
        spec = _resolve_around_ray(spec, workspace_of(args), use_cache, args.address)
        _name_teacher(spec)
    else:
        # Tune's status table is the progress; per-worker logs would drown it.
        init_ray(args.address, log_to_driver=False)
    if spec.race is not None:
        budget = getattr(args, "budget_minutes", None)
        return _race(spec, None if budget is None else time.time() + 60 * budget)
    if getattr(args, "budget_minutes", None) is not None:
        raise InputError("--budget-minutes: only with --race (a grid runs every trial)")
    if spec.kind == "greedy" and not args.resume:
        from search_spaces.presets import baseline_pair_set

        start = baseline_pair_set()
        if spec.baseline is not None:  # a greedy preset file starts from its own baseline
            start = spec.pair_set(spec.baseline)
        _say(f"greedy ablation {spec.name}: round 1 has {spec.trial_count} trials")
        outcome = run_greedy(spec, start)
        code = summarize(outcome, spec)
        if not outcome.interrupted:
            print(f"greedy selection: {outcome.final.key() if outcome.final else '-'}")
        return code
    _say(f"ablation {spec.name}: {spec.trial_count} trials -> {spec.out_dir}")
    outcome = resume_ablation(spec, _say) if args.resume else run_ablation(spec)
    return summarize(outcome, spec)


def _argv(args: argparse.Namespace) -> list[str]:
    return list(getattr(args, "argv", None) or sys.argv[1:])


def describe(spec: AblationSpec, argv: list[str]) -> str:
    """The experiment's description in MLflow: what ran and the command that ran it."""
    seeds = ", ".join(str(s) for s in spec.seeds)
    return (
        f"conaclip ablation {spec.experiment_name}: preset {spec.preset}, "
        f"{len(spec.pair_sets)} pair sets x seeds {seeds}, student {spec.run.student}, "
        f"{spec.run.steps} steps x {spec.run.batch_size}.\n\n"
        f"Command: `{shlex.join(['conaclip', *argv])}`"
    )


def _race(spec: AblationSpec, deadline: float | None = None) -> int:
    from orchestrator.race import run_race, verdict_lines

    assert spec.race is not None
    _say(f"race {spec.name}: {len(spec.pair_sets)} pair sets from {spec.race.start_seeds} to at "
         f"most {spec.race.max_seeds} seeds -> {spec.out_dir}")  # fmt: skip
    result = run_race(spec, deadline=deadline)
    outcome = AblationOutcome(spec.name, trials=result.trials, interrupted=result.interrupted)
    code = summarize(outcome, spec)
    if not result.interrupted:
        for line in verdict_lines(result):
            print(line)
        folder = reports.report_dir(Path(spec.out_dir), spec.experiment_name)
        folder.mkdir(parents=True, exist_ok=True)
        record = folder / "race.json"
        record.write_text(json.dumps(result.as_dict(), indent=1) + "\n")
        tracking.log_summary_artifact(spec.tracking_uri, spec.experiment_name, record)
        _say(f"wrote {record} (logged to MLflow)")
    return code


def add_ablation_flags(parser: argparse.ArgumentParser) -> None:
    add_shared_flags(parser)
    group = parser.add_argument_group("ablation")
    group.add_argument("--preset", help="search-space preset (see search_spaces/; default smoke)")
    group.add_argument("--pairs", help="your own pair sets: 'a:b,c:d;e:f' (';' between sets)")
    group.add_argument(
        "--seeds",
        type=int,
        help="repeat each pair set with K seeds (default 1); with --race, the seeds every cell "
        f"starts with (default {RACE_START_SEEDS})",
    )
    group.add_argument(
        "--first-seed",
        type=int,
        metavar="S",
        help="number the seeds from S (default 0): --seeds K runs seeds S..S+K-1, a race "
        "counts up from S; a second draw of seeds for the same grid, under another --name",
    )
    group.add_argument(
        "--race",
        action="store_true",
        help="seed racing (needs a baseline): round 1 runs every pair set at --seeds seeds; "
        "after each round a cell leaves the race once it is decided, better or worse than "
        "the baseline or equivalent to it (its gain's interval inside +-margin), by one test "
        "that carries both training and eval-set noise. Every round is a look the error rate "
        "is spent over (group-sequential boundaries), so early decisions keep the stated "
        "rate. Open cells and the baseline get one more seed, until all are decided or "
        "--max-seeds; a cell open then is reported open. Each round is a Tune run "
        "<name>-round<k> in the one MLflow experiment <name>; trials already FINISHED there "
        "are skipped, so re-running or --resume finishes an interrupted race",
    )
    group.add_argument(
        "--max-seeds",
        type=int,
        help=f"--race: no cell runs more seeds than M (default {RACE_MAX_SEEDS}; at least "
        "--seeds); the race's looks are planned from --seeds to M and cannot change once it "
        "has run; it reports its trial-steps against the full grid at M seeds",
    )
    group.add_argument(
        "--margin",
        type=float,
        metavar="D",
        help="equivalence margin in rsum: a cell whose gain lies within +-D is 'equivalent' "
        f"(no practical difference; default: the preset's, else {DEFAULT_MARGIN:g}, one "
        "point of mean recall); recorded on the experiment",
    )
    group.add_argument(
        "--budget-minutes",
        type=float,
        metavar="MIN",
        help="--race: start no round that would end more than MIN minutes after the race "
        "began (judged at the last round's pace); cells still open then are reported open, "
        "with the seeds they would need",
    )
    group.add_argument(
        "--spending",
        choices=SPENDING,
        help=f"--race: how the error rate is spent over the looks (default "
        f"{DEFAULT_SPENDING}: O'Brien-Fleming type, little early; pocock: evenly)",
    )
    group.add_argument(
        "--scheduler",
        choices=("fifo", "asha"),
        default="fifo",
        help="asha stops weak trials early on rsum (default: run all to the end)",
    )
    group.add_argument(
        "--grace-period",
        type=int,
        help="--scheduler asha: reports every trial gets before ASHA may stop it (default: "
        "the first report after warm-up, the auto-weight measurement and a third of --steps)",
    )
    group.add_argument(
        "--reduction-factor",
        type=int,
        help="--scheduler asha: at each rung only the best 1/RF of the trials go on (default "
        "2); rungs at grace x RF^k reports. A larger RF prunes harder from a later first rung",
    )
    group.add_argument("--name", help="ablation id: Tune run and MLflow experiment name")
    group.add_argument("--tracking-uri", help="MLflow URI (default sqlite:///<out>/mlruns.db)")
    group.add_argument("--steps", type=int)
    group.add_argument("--eval-every", type=int)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--workers", type=int, help="Ray Train workers per trial")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, help=AMP_HELP)
    group.add_argument("--cpus-per-worker", type=float)
    group.add_argument("--gpus-per-worker", type=float, help="> 0 trains on GPUs (nccl)")
    group.add_argument(
        "--max-concurrent-trials",
        type=int,
        help="trials at once, as given even beyond what is free now (on an autoscaling "
        "cluster the waiting ones make it grow; each waits at most start_timeout_s); "
        "default: what free resources hold",
    )
    group.add_argument(
        "--tune-output",
        action="store_true",
        help="show Ray Tune's own per-trial tables instead of conaclip's one live line",
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
        "an interrupted ablation; --dry-run prints the trial list and runs nothing. --race "
        "spends seeds only where the verdict against the baseline is still open (seeds "
        "--seeds to --max-seeds) and prints one line per round and the verdict.",
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
        "demo preset raced seed by seed until every cell is better, worse or equivalent, "
        "--max-seeds or the time budget -> table + heatmap + best, with the seeds each open "
        "cell would need. Running it again goes on with the same race (trials already in "
        "MLflow are not run again). Prints where everything is.",
    )
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--home", help="where built-in data and teachers are kept")
    demo.add_argument("--preset", default="demo")
    demo.add_argument(
        "--max-seeds",
        type=int,
        default=DEMO_MAX_SEEDS,
        help=f"the race's most seeds per cell (default {DEMO_MAX_SEEDS})",
    )
    demo.add_argument(
        "--budget-minutes",
        type=float,
        default=DEMO_BUDGET_S / 60,
        metavar="MIN",
        help=f"start no race round that would end the demo after MIN minutes (default "
        f"{DEMO_BUDGET_S / 60:g}); run the demo again to let the same race go on",
    )
    demo.add_argument(
        "--name",
        default="demo",
        help="the demo's race (MLflow experiment) under --out; the same name goes on where "
        "the last demo stopped (default demo)",
    )
    demo.set_defaults(handler=_demo)


def _resolve_around_ray(
    spec: AblationSpec, workspace: Workspace, use_cache: bool, address: str | None
) -> AblationSpec:
    """``spec`` resolved with Ray started after the teacher and before its cache
    (``orchestrator.assets.resolve_run_around_ray``)."""
    # Tune's status table is the progress; per-worker logs would drown it.
    return resolve_spec(
        spec, workspace, use_cache, start_ray=lambda: init_ray(address, log_to_driver=False)
    )


def _name_teacher(spec: AblationSpec) -> None:
    """Say which teacher a resolved ablation distils from, and on what it was trained, on the
    console and on the ablation's MLflow run (whose experiment exists by now)."""
    if spec.needs_teacher:
        teacher, trained_on = teacher_provenance(spec.run)
        _say(f"teacher: {teacher}, trained on {trained_on}")
        tracking.record_teacher(spec.tracking_uri, spec.experiment_name, teacher, trained_on)


def _demo(args: argparse.Namespace) -> int:
    started = time.time()
    parser = argparse.ArgumentParser()
    add_ablation_flags(parser)
    ablate_args = parser.parse_args(
        ["--preset", args.preset, "--out", args.out, "--name", args.name,
         "--race", "--seeds", str(DEMO_START_SEEDS), "--max-seeds", str(args.max_seeds)]
        + (["--home", args.home] if args.home else [])
    )  # fmt: skip
    ablate_args.dry_run = ablate_args.resume = False
    ablate_args.address = None
    spec, use_cache = build_spec(ablate_args)
    tracking.check_tracking_uri(spec.tracking_uri)
    with exclusive_ablation(spec.out_dir, spec.experiment_name):
        return _demo_locked(args, ablate_args, spec, use_cache, started)


def _demo_locked(
    args: argparse.Namespace,
    ablate_args: argparse.Namespace,
    spec: AblationSpec,
    use_cache: bool,
    started: float,
) -> int:
    tracking.get_or_create_experiment(
        spec.tracking_uri,
        spec.name,
        description=describe(spec, getattr(args, "argv", None) or ["demo"]),
    )
    spec = _resolve_around_ray(spec, workspace_of(ablate_args), use_cache, None)
    _name_teacher(spec)
    _say(f"demo: preset {spec.preset} raced from {DEMO_START_SEEDS} to {args.max_seeds} seeds")
    # Rounds fit the demo's budget: the last one starts only if it ends in time for the
    # reports; what is still open is reported with the seeds it would need.
    code = _race(spec, started + 60 * args.budget_minutes - DEMO_REPORT_S)
    if code == EXIT_INTERRUPTED:  # no verdict from trials that did not run
        return code
    out = Path(args.out)
    source = reports.ReportSource(out, spec.name, spec.tracking_uri)
    options = reports.TableOptions()
    for make_report in (reports.table_report, reports.best_report):
        report = make_report(source, options)
        print()
        sys.stdout.write(report.text)
        for note in report.notes:
            _say(note)
    folder = reports.report_dir(out, spec.name)
    conaclip = command_prefix()
    in_repo = Path("Makefile").is_file() and Path(args.out) == Path("runs/demo")
    ui = "make ui" if in_repo else f"{conaclip} ui --out {out}"
    print(f"\ndemo finished in {time.time() - started:.0f} s")
    print(f"table:   {folder / 'table.md'}")
    print(f"heatmap: {folder / 'heatmap.png'}")
    print(f"MLflow:  {spec.tracking_uri}")
    print("next:")
    print(f"  {ui:<58} # the MLflow UI on these runs, http://127.0.0.1:5000")
    full = f"{conaclip} ablate --preset single_additions --race --out {out}-full"
    print(f"  {full:<58} # the paper's whole table, raced")
    return code


def command_prefix() -> str:
    """How to run conaclip from this shell: ``conaclip`` when that is what PATH finds, else the
    path of the running executable (``.venv/bin/conaclip`` after ``make demo``)."""
    running = Path(sys.argv[0])
    if running.name != "conaclip":
        return f"{sys.executable} -m orchestrator.cli"
    found = shutil.which("conaclip")
    if found and Path(found).resolve() == running.resolve():
        return "conaclip"
    try:
        return str(running.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(running)
