"""A trial's MLflow params: its run config and scaling as their own ``model_dump`` writes them,
as text, and read back with ``model_validate``.

Every field of ``DistillConfig`` and ``ScalingSpec`` is one param under the field's own name,
so a run records its whole setting and the names that the table, the race ledger and the
export read (``pairs``, ``seed``, ``steps``, ``student``, ``teacher``, ``teacher_checkpoint``,
``batch_size``, ...) are the config's field names. ``pairs`` holds the pair set's canonical
key (``PairSet.key()``, which ``parse_pairs`` reads back) and ``pair_set`` its name. None is
written as the empty string, as runs logged before every field was a param have it.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

import pandas as pd
from pydantic import BaseModel

from orchestrator.trial import ScalingSpec
from search_spaces.presets import PairSet
from trainers.run_config import LOCATION_FIELDS, DistillConfig, PairConfig

PAIR_SET_PARAM = "pair_set"
# What differs between the trials of one ablation; every other param is its shared setting.
PER_TRIAL_PARAMS = frozenset((PAIR_SET_PARAM, "pairs", "seed"))


def trial_params(run: DistillConfig, scaling: ScalingSpec, pair_set: PairSet) -> dict[str, str]:
    """The params of a trial of ``pair_set`` run from the template ``run`` with ``scaling``
    (its ``seed`` is the template's; the MLflow logger writes each trial's own)."""
    values = {**scaling.model_dump(mode="json"), **run.model_dump(mode="json")}
    values.update({"pairs": pair_set.key(), PAIR_SET_PARAM: pair_set.name})
    return {name: "" if value is None else str(value) for name, value in values.items()}


def setting_values(runs: pd.DataFrame) -> dict[str, set[str]]:
    """Param name -> the values the runs of ``runs_frame`` output logged for it, for every
    param but the per-trial ones; runs without the param (the ablation's own run, runs logged
    before it existed) do not count."""
    return {
        column.removeprefix("params."): set(runs[column].dropna().astype(str))
        for column in runs.columns
        if column.startswith("params.") and column.removeprefix("params.") not in PER_TRIAL_PARAMS
    }


def run_from_params(
    params: Mapping[str, str], pairs: list[PairConfig] | None = None
) -> DistillConfig:
    """The ``DistillConfig`` of ``pairs`` (None: the config's default pairs) with the settings
    ``params`` names (as text); fields it lacks keep their defaults. ValidationError on a
    value the config refuses."""
    values = _typed_input(DistillConfig, params)
    values.pop("pairs", None)
    return DistillConfig.model_validate(values if pairs is None else {**values, "pairs": pairs})


def scaling_from_params(params: Mapping[str, str]) -> ScalingSpec:
    """The ``ScalingSpec`` that ``params`` names; fields it lacks keep their defaults."""
    return ScalingSpec.model_validate(_typed_input(ScalingSpec, params))


def recipe_settings(
    params: Mapping[str, str], pairs: list[PairConfig] | None = None
) -> dict[str, Any]:
    """The run settings of ``params`` (typed, ints as int) that a recipe for another run
    carries: neither the per-trial params nor files of the machine that ran
    (``LOCATION_FIELDS``) nor values that are None (the default stands in for them)."""
    given = set(_typed_input(DistillConfig, params)) - PER_TRIAL_PARAMS - LOCATION_FIELDS
    run = run_from_params({k: v for k, v in params.items() if k in given}, pairs)
    return {k: v for k, v in run.model_dump(mode="json", include=given).items() if v is not None}


def _typed_input(model: type[BaseModel], params: Mapping[str, str]) -> dict[str, Any]:
    """``params`` restricted to ``model``'s fields, the empty string (and the "None" that
    MLflow writes for a None) as None where the field allows None."""
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name not in params:
            continue
        text = params[name]
        optional = type(None) in typing.get_args(field.annotation)
        values[name] = None if optional and text in ("", "None") else text
    return values
