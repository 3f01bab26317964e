"""A trial's MLflow params are its run config's own fields and read back to the same config."""

from __future__ import annotations

import pandas as pd
import pytest
from pydantic import ValidationError

from orchestrator.run_params import (
    recipe_settings,
    run_from_params,
    scaling_from_params,
    setting_values,
    trial_params,
)
from orchestrator.trial import ScalingSpec
from search_spaces.presets import PairSet
from trainers.run_config import LOCATION_FIELDS, DistillConfig


def _run() -> DistillConfig:
    return DistillConfig(
        student="conaclip-student-xs", teacher_checkpoint="/t/teacher.pt", train_shards="/d/train",
        eval_shards="/d/eval", teacher_cache="/c", steps=40, eval_every=10, batch_size=16,
        lr=3e-4, amp=True, grad_clip=None, balance_after=7,
    )  # fmt: skip


def test_params_are_every_field_as_text_and_read_back_to_the_same_config():
    pair_set = PairSet.parse("intra_ts:infonce,inter_ss:kl*0.5@0.05", name="mine")
    scaling = ScalingSpec(num_workers=2, cpus_per_worker=1.5)
    params = trial_params(_run(), scaling, pair_set)
    assert set(params) == {*DistillConfig.model_fields, *ScalingSpec.model_fields, "pair_set"}
    assert all(isinstance(value, str) for value in params.values())
    # The names the table, the race ledger and the export read.
    assert params["pair_set"] == "mine" and params["pairs"] == pair_set.key()
    assert (params["steps"], params["batch_size"], params["student"]) == (
        "40", "16", "conaclip-student-xs"
    )  # fmt: skip
    assert params["teacher"] == "conaclip-teacher" and params["grad_clip"] == ""
    back = run_from_params(params, list(pair_set.pairs))
    assert back == _run().model_copy(update={"pairs": list(pair_set.pairs)})
    assert run_from_params(params).pairs == DistillConfig().pairs
    assert scaling_from_params(params) == scaling


def test_runs_logged_with_the_older_short_param_list_stay_readable():
    old = {"pairs": "intra_ts:infonce", "pair_set": "baseline", "seed": "1", "student": "s-xs",
           "teacher": "", "teacher_checkpoint": "", "steps": "6", "eval_every": "3",
           "batch_size": "8", "num_workers": "1"}  # fmt: skip
    with pytest.raises(ValidationError, match="need a teacher"):
        run_from_params(old)  # teacher "" is None, and intra_ts:infonce reads one
    run = run_from_params({**old, "teacher": "conaclip-teacher"})
    assert (run.student, run.steps, run.eval_every, run.batch_size) == ("s-xs", 6, 3, 8)
    assert run.lr == DistillConfig().lr and run.teacher_checkpoint is None


def test_setting_values_skip_per_trial_params_and_runs_without_the_param():
    runs = pd.DataFrame({
        "run_id": ["a", "b", "parent"], "params.pair_set": ["x", "y", None],
        "params.pairs": ["intra_ts:infonce", "intra_ts:sd", None], "params.seed": ["0", "1", None],
        "params.steps": ["6", "6", None], "params.student": ["s", "t", None],
    })  # fmt: skip
    assert setting_values(runs) == {"steps": {"6"}, "student": {"s", "t"}}


def test_a_recipe_carries_the_setting_but_no_files_of_the_machine_that_ran():
    params = trial_params(_run(), ScalingSpec(), PairSet.parse("intra_ts:infonce"))
    settings = recipe_settings(params)
    assert not LOCATION_FIELDS & set(settings) and "seed" not in settings
    assert "pairs" not in settings and "num_workers" not in settings
    assert settings["steps"] == 40 and settings["lr"] == 3e-4 and settings["amp"] is True
    assert "grad_clip" not in settings  # None: left to the default
    assert DistillConfig.model_validate(settings).batch_size == 16


@pytest.mark.parametrize(
    ("fold", "decay", "fold_text", "decay_text"),
    [(None, 0.999, "", "0.999"), (5000, None, "5000", ""), (1000, 0.5, "1000", "0.5")],
)
def test_eval_folds_and_the_ema_decay_read_back_as_logged(fold, decay, fold_text, decay_text):
    run = _run().model_copy(update={"eval_fold_size": fold, "ema_decay": decay})
    params = trial_params(run, ScalingSpec(), PairSet.parse("intra_ts:infonce"))
    assert (params["eval_fold_size"], params["ema_decay"]) == (fold_text, decay_text)
    back = run_from_params(params)
    assert (back.eval_fold_size, back.ema_decay) == (fold, decay)
    # A recipe carries a set fold size and decay; None stays with the default.
    settings = recipe_settings(params)
    assert settings.get("eval_fold_size") == fold and settings.get("ema_decay") == decay
