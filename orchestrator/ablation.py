"""The ablation: one Ray Tune trial per (pair set, seed), each a Ray Train run, logged to MLflow.

The search space is a Tune grid over pair-set names and seeds (or over an explicit list of
(pair set, seed) trials, which a race round needs: its trials are not always a full product);
the pair sets themselves come from a preset (``search_spaces``) or the user, validated against
``trainers.graph`` before anything starts, so an invalid pair never reaches a trial. Tune runs
as many trials at once as the cluster's free resources hold, or as many as
``max_concurrent_trials`` says (an autoscaling cluster grows for the trials that wait), so one
command fills a laptop or a large cluster. Trial errors do not stop the others: ``Tuner.fit``
returns a ResultGrid, and ``AblationOutcome.failed`` names each failed trial and where its
error is. What an ablation is (``AblationSpec`` and its storage) is ``orchestrator.ablation_spec``;
this module runs one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# The spec half, re-exported: callers read an ablation as one module (ablation.AblationSpec, ...).
from orchestrator.ablation_spec import (
    AblationSpec,
    pair_sets_by_name,
    save_spec,
    spool_dir,
    trial_key,
)
from orchestrator.ablation_spec import RaceSettings as RaceSettings
from orchestrator.ablation_spec import default_name as default_name
from orchestrator.ablation_spec import load_spec as load_spec
from orchestrator.ablation_spec import resolve_spec as resolve_spec
from orchestrator.race import FAILED, FINISHED, INTERRUPTED, check_ledger, finished_trials
from orchestrator.run_params import trial_params
from orchestrator.scoped_env import scoped_env
from orchestrator.trial import ScalingSpec, distill_trial
from search_spaces.presets import PairSet
from trainers.errors import InputError

TRIAL_DRIVER_MEMORY = 64 * 1024 * 1024  # bytes of Ray's logical memory resource
# Every Ray cluster's head node holds 1 of this resource (Ray Train pins its state actor there
# the same way). A trial actor holding a sliver of it runs on the head, and so does the Train
# controller Ray starts beside it: on a cluster whose worker nodes come and go (idle ones
# released, spot ones reclaimed) a lost worker node then takes only Train workers, which the
# controller restarts on another node (``max_failures``), never the trial itself.
HEAD_NODE_RESOURCE = "node:__internal_head__"
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY, HEAD_NODE_RESOURCE: 0.001}


def _pair_set_of(config: dict[str, Any]) -> str:
    return config["trial"].rsplit("/", 1)[0]


def _seed_of(config: dict[str, Any]) -> int:
    return int(config["trial"].rsplit("/", 1)[1])


def trial_scaling(spec: AblationSpec) -> ScalingSpec:
    """What each trial's Train run gets: ``spec.scaling``, except that under ASHA a Train run
    never restarts its worker group. When ASHA stops a trial, Tune ends the trial actor, and
    the Train controller and worker it owns die in no fixed order. A controller that outlives
    its worker by a moment takes the worker's end for a failure and starts a new group; Ray
    registers that group's placement group after its creator is gone and never frees it while
    the ablation runs (seen here: two such groups held both CPUs, and every later trial failed
    after ``start_timeout_s``). With no restarts the controller just ends. A trial that fails
    for real under ASHA is retried by ``conaclip ablate --resume``."""
    if spec.scheduler == "asha":
        return spec.scaling.model_copy(update={"max_failures": 0})
    return spec.scaling


def param_space(spec: AblationSpec) -> dict[str, Any]:
    """Tune's search space, constants beside it: a grid over pair-set names x seeds, or, when
    ``spec.trials`` is set, a grid over its ``trial_key`` values from which ``pair_set`` and
    ``seed`` are derived, so trials and the MLflow logger read the same two keys either way."""
    from ray import tune

    run = spec.run.model_dump(mode="json")
    run["torch_threads"] = run.get("torch_threads") or max(1, int(spec.scaling.cpus_per_worker))
    if spec.trials is not None:
        axes = {
            "trial": tune.grid_search([trial_key(name, seed) for name, seed in spec.trials]),
            "pair_set": tune.sample_from(_pair_set_of),
            "seed": tune.sample_from(_seed_of),
        }
    else:
        axes = {
            "pair_set": tune.grid_search(list(spec.pair_sets)),
            "seed": tune.grid_search(list(spec.seeds)),
        }
    return {
        **axes,
        "baseline": spec.baseline,
        # JSON, as the rest of a trial's config: Tune stores it and the trial validates it.
        "pair_sets": spec.model_dump(mode="json", include={"pair_sets"})["pair_sets"],
        "run": run,
        "scaling": trial_scaling(spec).model_dump(mode="json"),
        "train_storage": str(spec.train_storage),
    }


def expand_trials(spec: AblationSpec) -> list[dict[str, Any]]:
    """The trial list exactly as Tune's own variant generator expands the grid."""
    from ray.tune.search.variant_generator import generate_variants

    trials = []
    for _, variant in generate_variants(param_space(spec)):
        trials.append(
            {
                "pair_set": variant["pair_set"],
                "seed": variant["seed"],
                "pairs": spec.pair_set(variant["pair_set"]).key(),
                "steps": spec.run.steps,
            }
        )
    return trials


def trials_that_fit(free: dict[str, float], need: dict[str, float], cap: int | None = None) -> int:
    """How many trials needing ``need`` each fit in ``free`` at once (at least one, at most
    ``cap``): the scarcest resource decides. Fractions pack: four trials of GPU 0.25 share one
    GPU, as Ray's fractional resources let them. A tiny tolerance absorbs float sums
    (0.1 x 3 is not 0.3)."""
    fits = [
        math.floor(free.get(key, 0.0) / value + 1e-9) for key, value in need.items() if value > 0
    ]
    if cap:
        fits.append(cap)
    return max(1, min(fits) if fits else 1)


def max_concurrent(spec: AblationSpec) -> int:
    """Trials Tune runs at once: ``spec.max_concurrent_trials`` as given, else what the
    cluster's free resources hold now (at least one).

    A given number is not cut to the free resources: on an autoscaling cluster those are what
    the nodes up now hold (none on a cluster that starts at ``min_workers: 0``), and trials
    waiting for their placement groups are the demand that makes the autoscaler add nodes. A
    trial that gets no resources within ``start_timeout_s`` fails saying so."""
    import ray

    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    return trials_that_fit(ray.available_resources(), spec.scaling.trial_resources())


@dataclass
class TrialOutcome:
    pair_set: str
    seed: int
    status: str
    path: str
    error: str | None = None


@dataclass
class AblationOutcome:
    name: str
    trials: list[TrialOutcome] = field(default_factory=list)
    final: PairSet | None = None  # greedy: the selected set
    # Tune stopped on SIGINT (Ctrl-C) with trials neither done nor failed: they are
    # "INTERRUPTED", and what they would have decided (a table, a race round) is not decided.
    interrupted: bool = False

    @property
    def finished(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.status == FINISHED]

    @property
    def failed(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.status == FAILED]


def outcome_summary(outcome: AblationOutcome, spec: AblationSpec) -> tuple[str, list[str]]:
    """(one line: trials finished and where MLflow has them, one line per failed trial, and
    for an interrupted ablation the command that finishes it)."""
    line = (
        f"ablation {spec.name}: {len(outcome.finished)}/{len(outcome.trials)} trials finished; "
        f"MLflow: {spec.tracking_uri} (experiment {spec.experiment_name})"
    )
    failures = [f"FAILED {t.pair_set} seed {t.seed}: {t.error}" for t in outcome.failed]
    if outcome.interrupted:
        left = len(outcome.trials) - len(outcome.finished) - len(outcome.failed)
        failures.append(
            f"interrupted: {left} trial(s) did not finish; finished trials are kept in MLflow, "
            f"and `conaclip ablate --resume --out {spec.out_dir} --name {spec.experiment_name}` "
            "runs the rest"
        )
    return line, failures


# ASHA's first rung comes no earlier than this share of a trial's steps: on the built-in grid,
# early rungs stopped cells that ended on top, because a cell's early rank says little about its
# final one (benchmarks/ablation_scale.py asha-replay measures that on a recorded grid).
ASHA_FIRST_RUNG_SHARE = 1 / 3


def report_count(spec: AblationSpec) -> int:
    """Reports (``training_iteration``s) a trial that runs to the end makes: one per
    ``eval_every`` steps, the last at the final step."""
    return max(1, math.ceil(spec.run.steps / spec.run.eval_every))


def asha_grace_period(spec: AblationSpec) -> int:
    """Reports a trial gets before ASHA may stop it: ``spec.grace_period``, else the first
    report at or after both the end of warm-up and of the auto-weight measurement (before it
    every cell still trains the baseline's loss alone) and ``ASHA_FIRST_RUNG_SHARE`` of the
    steps; at most all reports."""
    reports = report_count(spec)
    if spec.grace_period is not None:
        return min(spec.grace_period, reports)
    settled = spec.run.balance_step + spec.run.balance_window
    earliest = max(settled, spec.run.steps * ASHA_FIRST_RUNG_SHARE)
    return min(reports, max(1, math.ceil(earliest / spec.run.eval_every)))


def asha_scheduler(reports: int, grace_period: int, reduction_factor: int):
    """Tune's ASHA over a trial's reports (``training_iteration``): rungs at ``grace_period x
    reduction_factor^k`` reports below ``reports``; at a rung a trial goes on only when its
    rsum is at least the (1 - 1/reduction_factor) quantile of those recorded there before it.
    Metric and mode come from the TuneConfig (``set_search_properties``)."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=reports,
        grace_period=min(grace_period, reports),
        reduction_factor=reduction_factor,
    )


def _tuner(spec: AblationSpec, resume: bool, extra_callbacks: tuple = ()):
    from ray import tune

    from orchestrator.mlflow_logger import MlflowTrialLogger

    # The trial function only drives its Train run, so it must not hold a CPU that a Train
    # worker could use; Tune refuses an empty request, and a token of memory holds nothing back.
    # On the head node (TRIAL_DRIVER_RESOURCES).
    trainable = tune.with_resources(distill_trial, dict(TRIAL_DRIVER_RESOURCES))
    path = spec.tune_dir / spec.name
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise InputError(f"--resume: no ablation state at {path}; nothing to resume")
        # Errored trials run again (an OOM kill, resources not had in time): the trial
        # re-enters its Train run, which resumes from that run's newest checkpoint.
        return tune.Tuner.restore(
            str(path),
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            restart_errored=False,
        )
    tags = {"conaclip.preset": spec.preset, "conaclip.ablation_id": spec.experiment_name}
    # Each trial's params are its run's whole config (run_params), so its setting is on record.
    params_of = {
        name: trial_params(spec.run, trial_scaling(spec), spec.pair_set(name))
        for name in spec.pair_sets
    }
    if spec.round is not None:
        tags["conaclip.round"] = str(spec.round)
    logger = MlflowTrialLogger(
        spec.tracking_uri,
        spec.experiment_name,
        tags,
        params_of,
        # One spool per experiment: a resume from the MLflow ledger (a new Tune run) finds
        # what an earlier run could not write.
        spool_dir=spool_dir(spec),
    )
    scheduler = None
    if spec.scheduler == "asha":
        scheduler = asha_scheduler(
            report_count(spec), asha_grace_period(spec), spec.reduction_factor
        )
    concurrency = max_concurrent(spec)
    callbacks: list[Any] = [logger, *extra_callbacks]
    if not spec.tune_output:
        from orchestrator.live_view import LiveView

        callbacks.append(LiveView(spec.trial_count, concurrency))
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric="rsum",
            mode="max",
            scheduler=scheduler,
            max_concurrent_trials=concurrency,
            # One trial actor serves trial after trial (its imports are paid once). Not under
            # ASHA: a stopped trial's actor is still inside its TorchTrainer.fit, so Tune
            # could not reset it and would start a new one anyway.
            reuse_actors=spec.scheduler == "fifo",
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=str(spec.tune_dir),
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=0),
            # 0: Tune's tables stay quiet and the live line is the progress.
            verbose=1 if spec.tune_output else 0,
        ),
    )


def run_ablation(
    spec: AblationSpec, resume: bool = False, callbacks: tuple = ()
) -> AblationOutcome:
    """Fit (or restore and finish) the ablation; never raises on trial errors. ``callbacks``:
    more Tune callbacks for a fresh run (benchmarks time trials with one)."""
    save_spec(spec)
    return _outcome(spec, _fit(spec, _tuner(spec, resume, callbacks)))


def _fit(spec: AblationSpec, tuner: Any) -> Any:
    """``tuner.fit()``; without ``tune_output`` under Tune's legacy output engine, which at
    verbosity 0 prints nothing: the new engine prints its configuration box and result paths
    even then, in the middle of the live view."""
    if spec.tune_output:
        return tuner.fit()
    with scoped_env("RAY_AIR_NEW_OUTPUT", "0"):
        return tuner.fit()


def resume_ablation(spec: AblationSpec, say=print) -> AblationOutcome:
    """Finish an interrupted ablation. From Tune's own state when it restores; otherwise
    (``<out>/tune/`` gone, or a state file Tune cannot read) from MLflow, the ledger: every
    (pair set, seed) of ``spec`` without a FINISHED run in its experiment runs again as a
    fresh Tune run ``<name>-resume<k>`` logging into the same experiment."""
    from ray import tune

    from orchestrator import tracking

    path = spec.tune_dir / spec.name
    if tune.Tuner.can_restore(str(path)):
        try:
            tuner = _tuner(spec, resume=True)
        except Exception as error:  # Tune raises what its reader raised: JSON, pickle, OS
            say(f"resume: Tune's state at {path} is unreadable ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
                "resuming from the MLflow runs")  # fmt: skip
        else:
            save_spec(spec)
            return _outcome(spec, _fit(spec, tuner))
    else:
        say(f"resume: no Tune state at {path}; resuming from the MLflow runs")
    runs = tracking.runs_frame(spec.tracking_uri, spec.experiment_name)
    check_ledger(runs, spec.pair_keys(), spec.run.steps)
    done = finished_trials(runs)
    missing = [trial for trial in spec.trial_list() if trial not in done]
    say(f"resume: {len(spec.trial_list()) - len(missing)} of {spec.trial_count} trials have a "
        f"FINISHED run in experiment {spec.experiment_name}; running {len(missing)}")  # fmt: skip
    save_spec(spec)  # a later --resume without flags finds the ablation again
    if not missing:
        return AblationOutcome(spec.name)
    name, attempt = f"{spec.name}-resume1", 1
    while (spec.tune_dir / name).exists() or (spec.tune_dir / f"{name}.spec.json").exists():
        attempt += 1
        name = f"{spec.name}-resume{attempt}"
    rerun = spec.model_copy(
        update={
            "name": name,
            "experiment": spec.experiment_name,
            "seeds": sorted({seed for _, seed in missing}),
            "trials": missing,
        }
    )
    return run_ablation(rerun)


def _outcome(spec: AblationSpec, results) -> AblationOutcome:
    from orchestrator.trial import error_reason

    outcome = AblationOutcome(spec.name)
    # Tune returns normally after SIGINT, holding only the trials it had created, some of them
    # neither ended nor failed; MLflow (the ledger) then says which trials did finish.
    expected = spec.trial_list()
    ended = results.num_terminated + results.num_errors
    done: set[tuple[str, int]] | None = None
    if ended < len(results) or len(results) < len(expected):
        from orchestrator import tracking

        outcome.interrupted = True
        done = finished_trials(tracking.runs_frame(spec.tracking_uri, spec.experiment_name))
    for result in results:
        config = result.config or {}
        status = FAILED if result.error else FINISHED
        if not result.error and done is not None:
            trial = (config.get("pair_set", "?"), config.get("seed", -1))
            status = FINISHED if trial in done else INTERRUPTED
        error = None
        if result.error:
            error = f"{error_reason(result.error)}; details in {result.path}/error.txt"
        outcome.trials.append(
            TrialOutcome(
                config.get("pair_set", "?"), config.get("seed", -1), status, str(result.path), error
            )
        )
    if done is not None:  # interrupted: trials Tune never started are unfinished too
        seen = {(t.pair_set, t.seed) for t in outcome.trials}
        outcome.trials += [
            TrialOutcome(name, seed, FINISHED if (name, seed) in done else INTERRUPTED, "")
            for name, seed in expected
            if (name, seed) not in seen
        ]
    return outcome


def run_greedy(spec: AblationSpec, baseline: PairSet, max_rounds: int = 20) -> AblationOutcome:
    """Forward selection: round 1 runs ``spec.pair_sets`` (the baseline and every single
    addition); each later round runs the current set plus each pair it lacks, and the best
    candidate becomes current when its gain over current beats its std. Every round is its own
    Tune run (``<name>-round<k>``) logging into the one MLflow experiment ``<name>``."""
    from orchestrator import selection, table, tracking
    from search_spaces.presets import greedy_candidates

    outcome = AblationOutcome(spec.name)
    current, pair_sets = baseline, spec.pair_sets
    for round_number in range(1, max_rounds + 1):
        round_spec = spec.model_copy(
            update={"name": f"{spec.name}-round{round_number}", "experiment": spec.name,
                    "pair_sets": pair_sets, "round": round_number}
        )  # fmt: skip
        round_outcome = run_ablation(round_spec)
        outcome.trials += round_outcome.trials
        if round_outcome.interrupted:  # a round cut short decides nothing
            outcome.interrupted = True
            return outcome
        runs = tracking.runs_frame(spec.tracking_uri, spec.name)
        chosen = selection.greedy_next(table.selection_table(runs), current)
        if chosen is None:
            break
        current = chosen
        candidates = greedy_candidates(current)
        if not candidates:
            break
        pair_sets = pair_sets_by_name(candidates)
    outcome.final = current
    return outcome
