"""What an ablation is: its spec, built from a preset and flags, and stored for ``--resume``.

``AblationSpec`` holds everything an ablation needs (pair sets, seeds or an explicit trial
list, the run template every trial shares, scaling, scheduler, where its state and MLflow
live, and race settings); its validators apply a preset's rules to pair sets built in code or
read back from JSON, so an invalid set never reaches Tune. ``save_spec`` / ``load_spec`` keep
it beside Tune's state under ``<out>/tune/<name>.spec.json``. Nothing here imports Ray: running
a spec is ``orchestrator.ablation``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.config import Workspace
from orchestrator.sequential import DEFAULT_SPENDING, Design
from orchestrator.trial import ScalingSpec
from orchestrator.verdicts import DEFAULT_MARGIN
from search_spaces.presets import PairSet, check_unique_sets
from trainers.errors import InputError
from trainers.run_config import DistillConfig, PairConfig

Scheduler = Literal["fifo", "asha"]


class RaceSettings(BaseModel):
    """How ``--race`` spends seeds; stored with the spec so ``--resume`` races on alike."""

    model_config = ConfigDict(extra="forbid")

    start_seeds: int = Field(default=2, ge=1, description="seeds every cell starts with (K0)")
    max_seeds: int = Field(default=5, ge=1, description="no cell runs more seeds than this (M)")
    first_seed: int = Field(default=0, ge=0, description="the race's seeds count up from this")
    metric: str = "rsum"
    margin: float = Field(
        default=DEFAULT_MARGIN, gt=0, description="equivalence margin D in the metric's units"
    )
    spending: Literal["obf", "pocock"] = Field(
        default=DEFAULT_SPENDING, description="how the error rate is spent over the looks"
    )

    def design(self) -> Design:
        """The looks this race plans (``Design.race``)."""
        return Design.race(self.start_seeds, self.max_seeds, self.spending)

    @model_validator(mode="after")
    def _max_covers_start(self) -> RaceSettings:
        if self.max_seeds < self.start_seeds:
            raise ValueError(
                f"--max-seeds {self.max_seeds} is below --seeds {self.start_seeds}: "
                "every cell starts with --seeds seeds"
            )
        return self


class AblationSpec(BaseModel):
    """Everything an ablation needs; stored beside Tune's state for ``--resume``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="ablation id: Tune run name (and MLflow experiment)")
    experiment: str | None = Field(
        default=None, description="MLflow experiment when it differs from name (greedy rounds)"
    )
    preset: str
    kind: Literal["grid", "greedy"] = Field(
        default="grid", description="greedy: forward-selection rounds from the preset's sets"
    )
    pair_sets: dict[str, tuple[PairConfig, ...]] = Field(
        description="name -> the pairs of that set, in sweep order (see pair_sets_by_name)"
    )
    baseline: str | None = None
    seeds: list[int] = Field(default_factory=lambda: [0])
    run: DistillConfig = Field(
        description="what every trial shares; each trial trains its own pair set's pairs"
    )
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    scheduler: Scheduler = "fifo"
    grace_period: int | None = Field(
        default=None, ge=1, description="ASHA: reports before a trial may be stopped"
    )
    reduction_factor: int = Field(
        default=2, ge=2, description="ASHA: 1/rf of the trials at a rung go on to the next"
    )
    out_dir: str
    tracking_uri: str
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    round: int | None = None  # greedy and race rounds
    tune_output: bool = Field(
        default=False, description="Tune's own per-trial tables instead of the live line"
    )
    trials: list[tuple[str, int]] | None = Field(
        default=None,
        description="explicit (pair set, seed) trials in run order; None = pair_sets x seeds",
    )
    race: RaceSettings | None = Field(
        default=None, description="--race settings; on its rounds too, so --resume finds the race"
    )

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name

    @property
    def tune_dir(self) -> Path:
        return Path(self.out_dir).resolve() / "tune"

    @property
    def train_storage(self) -> Path:
        return Path(self.out_dir).resolve() / "train_runs"

    @field_validator("pair_sets")
    @classmethod
    def _valid_pair_sets(
        cls, value: dict[str, tuple[PairConfig, ...]]
    ) -> dict[str, tuple[PairConfig, ...]]:
        # The same rules as a preset's sets, so a spec built in code (verify, greedy rounds)
        # or read back from its JSON file holds only what a preset could hold.
        return pair_sets_by_name([PairSet(name, pairs) for name, pairs in value.items()])

    @model_validator(mode="after")
    def _trials_name_pair_sets(self) -> AblationSpec:
        unknown = sorted({name for name, _ in self.trials or () if name not in self.pair_sets})
        if unknown:
            raise ValueError(f"trials name pair sets the spec lacks: {', '.join(unknown)}")
        return self

    def pair_set(self, name: str) -> PairSet:
        return PairSet(name, self.pair_sets[name])

    def pair_keys(self) -> dict[str, str]:
        """Pair-set name -> ``PairSet.key()``: what a FINISHED run of that name must have
        been trained with to count as done in the MLflow ledger."""
        return {name: self.pair_set(name).key() for name in self.pair_sets}

    @property
    def needs_teacher(self) -> bool:
        """Whether any pair set reads the teacher: then the driver prepares the teacher and
        its cache once, before the trials."""
        return any(pair.needs_teacher for pairs in self.pair_sets.values() for pair in pairs)

    @property
    def trial_count(self) -> int:
        if self.trials is not None:
            return len(self.trials)
        return len(self.pair_sets) * len(self.seeds)

    def trial_list(self) -> list[tuple[str, int]]:
        """Every (pair set, seed) this spec runs, in Tune's order."""
        if self.trials is not None:
            return [(name, seed) for name, seed in self.trials]
        return [(name, seed) for seed in self.seeds for name in self.pair_sets]


def default_name(preset: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '_', preset)}-{time.strftime('%Y%m%d-%H%M%S')}"


def pair_sets_by_name(pair_sets: list[PairSet]) -> dict[str, tuple[PairConfig, ...]]:
    """``AblationSpec.pair_sets`` of ``pair_sets``, in their order; InputError when two share
    a name or their pairs (``check_unique_sets``)."""
    check_unique_sets(pair_sets, "pair sets")
    return {pair_set.name: pair_set.pairs for pair_set in pair_sets}


def resolve_spec(
    spec: AblationSpec,
    workspace: Workspace,
    use_teacher_cache: bool,
    start_ray: Callable[[], object] | None = None,
) -> AblationSpec:
    """``spec`` with the built-in data, the teacher and its cache filled into its run where
    it names none (``orchestrator.assets.resolve_run``); the teacher only when a pair set
    needs it. With ``start_ray``, Ray starts after the teacher and before its cache
    (``orchestrator.assets.resolve_run_around_ray``)."""
    from orchestrator.assets import resolve_run, resolve_run_around_ray

    needs = spec.needs_teacher
    if start_ray is None:
        run = resolve_run(spec.run, workspace, use_teacher_cache, needs_teacher=needs)
    else:
        run = resolve_run_around_ray(spec.run, workspace, use_teacher_cache, start_ray, needs)
    return spec.model_copy(update={"run": run})


def trial_key(pair_set: str, seed: int) -> str:
    """``"<pair set>/<seed>"``: one grid value naming a trial (split at the last '/')."""
    return f"{pair_set}/{seed}"


def spool_dir(spec: AblationSpec) -> Path:
    """Where the MLflow logger keeps queued artifacts and writes it could not make."""
    return spec.tune_dir / f"{spec.experiment_name}.mlflow-spool"


def save_spec(spec: AblationSpec) -> Path:
    path = spec.tune_dir / f"{spec.name}.spec.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.model_dump_json(indent=2))
    return path


def load_spec(out_dir: str | Path, name: str | None) -> AblationSpec:
    """The spec of ablation ``name`` under ``out_dir`` (newest when None), for --resume."""
    tune_dir = Path(out_dir).resolve() / "tune"
    specs = sorted(tune_dir.glob("*.spec.json"), key=lambda p: p.stat().st_mtime)
    if name is not None:
        specs = [p for p in specs if p.name == f"{name}.spec.json"]
    if not specs:
        raise InputError(f"--resume: no ablation{f' named {name}' if name else ''} in {tune_dir}")
    return AblationSpec.model_validate_json(specs[-1].read_text())
