"""Malformed YAML configs always give one line naming the field, exit 2, never a traceback."""

from __future__ import annotations

import os
import uuid

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main

GOOD = {"steps": 10, "batch_size": 8, "student": "conaclip-student-xs", "workers": 1}


def _not_a_number(text: str) -> bool:
    """Text pydantic would not read as a number: "1" or " 1 " is a valid step count."""
    try:
        float(text.replace("_", ""))
    except ValueError:
        return True
    return False


wrong_values = st.one_of(
    st.tuples(st.sampled_from(["steps", "batch_size", "eval_every"]),
              st.one_of(st.integers(max_value=0),
                        st.text(min_size=1, max_size=8).filter(_not_a_number),
                        st.lists(st.integers(), max_size=2))),
    st.tuples(st.sampled_from(["lr", "weight_decay"]), st.floats(max_value=-1e-9)),
    st.tuples(st.sampled_from(["pairs"]),
              st.sampled_from(["intra_ss:infonce", "inter_ss:sym_kl", "intra_xx:sd",
                               "intra_ts:mse", "intra_ts", "intra_ts:sd,intra_ts:sd"])),
    st.tuples(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12)
              .filter(lambda k: k not in _KNOWN), st.integers()),
    st.tuples(st.sampled_from(["workers"]), st.integers(max_value=0)),
)  # fmt: skip


def _known() -> set[str]:
    from orchestrator.trial import ScalingSpec
    from trainers.run_config import DistillConfig

    return set(DistillConfig.model_fields) | set(ScalingSpec.model_fields) | {
        "workers", "use_teacher_cache", "preset", "baseline", "seeds", "scheduler"
    }  # fmt: skip


_KNOWN = _known()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(wrong=wrong_values)
def test_malformed_config_is_one_line_exit_2(wrong, tmp_path, capsys):
    field, value = wrong
    path = tmp_path / f"{uuid.uuid4().hex}.yaml"
    path.write_text(yaml.safe_dump({**GOOD, field: value}))
    code = main(["ablate", "--config", str(path), "--dry-run"])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert str(path) in lines[0]
    named = field if field != "workers" else "num_workers"
    assert named in lines[0] or field in lines[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("steps: [1, 2\n", "line 2"),  # unclosed flow sequence
        ("- just\n- a list\n", "expected a mapping"),
        ("steps: 10\n  bad: indent\n", "not valid YAML"),
    ],
)
def test_broken_yaml_names_the_file(text, expected, tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    assert main(["ablate", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(path) in err and expected in err


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def _spec(argv):
    from orchestrator.ablate_cli import build_spec
    from orchestrator.cli import build_parser

    return build_spec(build_parser().parse_args(["ablate", *argv]))[0]


def test_own_pair_sets_find_the_motis_baseline():
    spec = _spec(["--pairs", "intra_ts:infonce,intra_ss:sd;intra_ts:infonce", "--dry-run"])
    assert spec.baseline == "intra_ts:infonce"
    assert _spec(["--pairs", "intra_ts:infonce,intra_ss:sd", "--dry-run"]).baseline is None


def test_greedy_follows_the_preset_kind_not_its_name():
    assert _spec(["--preset", "greedy"]).kind == "greedy"
    assert _spec(["--preset", "single_additions"]).kind == "grid"


def test_a_validation_error_from_flags_is_one_line(monkeypatch, capsys):
    import orchestrator.ablate_cli as ablate_cli
    from orchestrator.cli import main
    from trainers.run_config import DistillConfig

    def build(args):
        DistillConfig(steps=-1)  # a real pydantic error, as a handler building a model raises

    monkeypatch.setattr(ablate_cli, "build_spec", build)
    assert main(["ablate", "--preset", "smoke"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "conaclip: error: arguments: steps: Input should be greater than 0"


def test_one_teacher_budget_per_precision():
    from trainers.precision import bf16_autocast_pays
    from trainers.teacher import teacher_config

    assert teacher_config("train", "eval", amp=False).steps == 400
    assert teacher_config("train", "eval", amp=True).steps == 600
    assert teacher_config("train", "eval").amp is bf16_autocast_pays()
    assert teacher_config("train", "eval", amp=True, steps=7).steps == 7


def test_asha_grace_period_defaults_to_the_first_report_after_warm_up():
    from orchestrator.ablation import asha_grace_period

    # demo settings (150 steps, warm-up 20, auto weights measured over steps 20-24) with an
    # eval every 10 steps: the weights are fixed after step 25, but the first rung waits for a
    # third of the steps, step 50, the 5th report of 15.
    spec = _spec(["--preset", "demo", "--scheduler", "asha", "--eval-every", "10"])
    assert (spec.run.balance_step, spec.run.balance_window, spec.run.steps) == (20, 5, 150)
    assert asha_grace_period(spec) == 5
    # every 30 steps: step 50 falls between reports, so the 2nd (step 60).
    assert asha_grace_period(_spec(["--preset", "demo", "--scheduler", "asha",
                                    "--eval-every", "30"])) == 2  # fmt: skip
    # 60 steps: a third is step 20, before the weights are fixed at 25: the report at 30.
    short = _spec(["--preset", "demo", "--scheduler", "asha", "--eval-every", "10",
                   "--steps", "60"])  # fmt: skip
    assert (short.run.balance_step, asha_grace_period(short)) == (20, 3)
    # every 150 steps: one report, and the grace period never exceeds the reports.
    assert asha_grace_period(_spec(["--preset", "demo", "--scheduler", "asha"])) == 1
    given = _spec(["--preset", "demo", "--scheduler", "asha", "--eval-every", "10",
                   "--grace-period", "7"])  # fmt: skip
    assert asha_grace_period(given) == 7


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--grace-period", "2"], "--grace-period: only with --scheduler asha"),
        (["--scheduler", "asha", "--grace-period", "0"], "--grace-period 0: at least 1 report"),
        (["--reduction-factor", "4"], "--reduction-factor: only with --scheduler asha"),
        (["--scheduler", "asha", "--reduction-factor", "1"], "--reduction-factor 1: at least 2"),
    ],
)
def test_grace_period_errors(argv, expected):
    from trainers.errors import InputError

    with pytest.raises(InputError, match=expected):
        _spec(["--preset", "demo", *argv])


def test_asha_trials_never_restart_their_worker_group():
    from orchestrator.ablation import param_space

    # Under ASHA a stopped trial's controller could restart its worker group as it dies and
    # leave a placement group behind (trial_scaling); fifo keeps the restart from checkpoints.
    assert param_space(_spec(["--preset", "demo"]))["scaling"]["max_failures"] == 1
    asha = _spec(["--preset", "demo", "--scheduler", "asha"])
    assert asha.scaling.max_failures == 1
    assert param_space(asha)["scaling"]["max_failures"] == 0


def test_reduction_factor_reaches_the_spec():
    assert _spec(["--preset", "demo", "--scheduler", "asha"]).reduction_factor == 2
    given = _spec(["--preset", "demo", "--scheduler", "asha", "--reduction-factor", "4"])
    assert given.reduction_factor == 4


def _asha_decisions(scheduler, rsums: list[float], report: int) -> list[str]:
    """Feed Tune's scheduler one result per trial at ``report`` (trials in order), as Tune
    does; return each trial's decision."""
    from types import SimpleNamespace

    scheduler.set_search_properties("rsum", "max")
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(len(rsums))]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    return [
        scheduler.on_trial_result(None, trial, {"training_iteration": report, "rsum": rsum})
        for trial, rsum in zip(trials, rsums, strict=True)
    ]


def test_asha_scheduler_stops_below_the_rungs_quantile():
    from orchestrator.ablation import asha_scheduler

    # 5 reports, grace 1, reduction 4: rungs at reports 1 and 4. At report 1 each trial is held
    # against the 75th percentile (numpy's linear) of the rsums recorded there before it:
    # t0 10 (none yet: on), t1 20 (>= 10: on), t2 12 (pct of [10, 20] = 17.5: stop),
    # t3 30 (pct of [10, 20, 12] = 16: on), t4 18 (pct of [10, 20, 12, 30] = 22.5: stop).
    decisions = _asha_decisions(asha_scheduler(5, 1, 4), [10, 20, 12, 30, 18], report=1)
    assert decisions == ["CONTINUE", "CONTINUE", "STOP", "CONTINUE", "STOP"]
    # Reduction 2 holds each against the median instead: t2 12 < 15 stops, t4 18 >= 16 goes on.
    decisions = _asha_decisions(asha_scheduler(5, 1, 2), [10, 20, 12, 30, 18], report=1)
    assert decisions == ["CONTINUE", "CONTINUE", "STOP", "CONTINUE", "CONTINUE"]
    # Before the grace period no trial is judged, however low.
    assert _asha_decisions(asha_scheduler(5, 2, 2), [10, 20, 1], report=1) == ["CONTINUE"] * 3


def test_fractional_gpus_pack_trials_on_one_gpu():
    from orchestrator.ablation import trials_that_fit

    spec = _spec(["--preset", "demo", "--gpus-per-worker", "0.25", "--cpus-per-worker", "2"])
    need = spec.scaling.trial_resources()
    assert need == {"CPU": 2.0, "GPU": 0.25}
    # One H200 node (16 CPUs, 1 GPU): the GPU decides, four trials share it.
    assert trials_that_fit({"CPU": 16.0, "GPU": 1.0}, need) == 4
    # Two such nodes: eight; with four CPUs only two fit, whatever the GPUs.
    assert trials_that_fit({"CPU": 32.0, "GPU": 2.0}, need) == 8
    assert trials_that_fit({"CPU": 4.0, "GPU": 1.0}, need) == 2
    # --max-concurrent-trials caps it; 0.1 x 10 sums to 0.999... in floats and still fits 10.
    assert trials_that_fit({"CPU": 16.0, "GPU": 1.0}, need, cap=3) == 3
    assert trials_that_fit({"GPU": sum([0.1] * 10)}, {"GPU": 0.1}) == 10
    # Two workers per trial hold twice the GPU share.
    two = _spec(["--preset", "demo", "--gpus-per-worker", "0.25", "--workers", "2"])
    assert two.scaling.trial_resources() == {"CPU": 2.0, "GPU": 0.5}
    assert trials_that_fit({"CPU": 16.0, "GPU": 1.0}, two.scaling.trial_resources()) == 2


def test_resume_of_an_ablation_nobody_ran_is_refused(tmp_path, capsys):
    from orchestrator import tracking

    out = tmp_path / "runs"
    argv = ["ablate", "--preset", "smoke", "--out", str(out), "--name", "nope", "--resume"]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"conaclip: error: --resume: no ablation named nope in {out.resolve() / 'tune'}, and no "
        f"MLflow store at {out.resolve() / 'mlruns.db'}: nothing to resume"
    )
    # A store that holds other ablations only: still nothing to resume, and nothing is created.
    uri = tracking.default_tracking_uri(out)
    tracking.get_or_create_experiment(uri, "other")
    capsys.readouterr()  # MLflow's own lines from creating that store
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("conaclip: error: --resume: no ablation named nope in ")
    assert line.endswith("experiment 'nope' not found in " + uri + "; known experiments: other: "
                         "nothing to resume")  # fmt: skip
    assert {e.name for e in tracking.client(uri).search_experiments()} == {"other", "Default"}


def test_start_attempt_env_is_read_when_used_and_restored_after_each_fit(monkeypatch):
    from orchestrator import trial

    monkeypatch.delenv(trial.START_TIMEOUT_ENV, raising=False)
    scaling = trial.ScalingSpec(start_timeout_s=600)
    assert scaling.start_attempts() == (60.0, 10)
    with trial.start_timeout_env(trial.ScalingSpec(start_timeout_s=20)):
        assert os.environ[trial.START_TIMEOUT_ENV] == "20.0"  # what Ray Train reads in fit()
    # Without a user's value, what one trial set does not bound the next one.
    assert trial.START_TIMEOUT_ENV not in os.environ
    assert scaling.start_attempts() == (60.0, 10)
    # Set after import: the user's value wins, and survives a trial.
    monkeypatch.setenv(trial.START_TIMEOUT_ENV, "15")
    assert scaling.start_attempts() == (15.0, 40)
    with trial.start_timeout_env(trial.ScalingSpec(start_timeout_s=30)):
        assert os.environ[trial.START_TIMEOUT_ENV] == "15.0"
    assert os.environ[trial.START_TIMEOUT_ENV] == "15"
    assert trial.ScalingSpec(start_timeout_s=30).start_attempts() == (15.0, 2)


def test_amp_flag_reaches_every_trial_config():
    assert _spec(["--preset", "demo", "--amp"]).run.amp is True
    assert _spec(["--preset", "demo", "--no-amp"]).run.amp is False
    assert _spec(["--preset", "demo"]).run.amp is False
