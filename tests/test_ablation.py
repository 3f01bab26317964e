"""The ablation end to end on a real local Ray cluster and a real SQLite MLflow store, and the
CLI's handling of bad input before anything starts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator import tracking
from orchestrator.cli import main
from orchestrator.ray_cluster import descendant_pids, free_port
from trainers.errors import InputError
from trainers.evaluate import QueryRanks, metrics_from_ranks
from trainers.run_config import KD_TEMPERATURE


def data_flags(shapes, teacher, home):
    return [
        "--train-shards", str(shapes.out_dir / "train"),
        "--eval-shards", str(shapes.out_dir / "eval"),
        "--teacher-checkpoint", str(teacher.checkpoint),
        "--home", str(home),
    ]  # fmt: skip


def finished_runs(uri: str, experiment: str):
    from orchestrator import tracking

    frame = tracking.runs_frame(uri, experiment)
    return frame


def test_invalid_pair_is_one_line_exit_2(capsys):
    code = main(["ablate", "--pairs", "intra_ts:infonce;intra_ss:fd", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "intra_ss:fd" in err and "valid strategies for intra_ss: sd, kl, sym_sd, sym_kl" in err


def test_dry_run_lists_tunes_expansion(capsys):
    assert main(["ablate", "--preset", "single_additions", "--seeds", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("40 trials (20 pair sets x 2 seeds), 300 steps each = 12000")
    assert len(out) == 41


def test_unreachable_tracking_server_fails_before_any_trial(capsys, tmp_path):
    code = main(["ablate", "--preset", "smoke", "--out", str(tmp_path),
                 "--tracking-uri", "http://127.0.0.1:9"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("conaclip: error: MLflow server at http://127.0.0.1:9 is not reachable")
    assert not (tmp_path / "tune").exists()


def test_trial_logger_logs_the_loops_metrics_and_skips_tunes_bookkeeping():
    from types import SimpleNamespace

    from orchestrator.mlflow_logger import MlflowTrialLogger

    batches = []
    logger = MlflowTrialLogger("sqlite:///unused.db", "e", {}, {})
    logger._client = SimpleNamespace(log_batch=lambda run_id, metrics: batches.append(metrics))
    logger._runs["t1"] = "run-1"
    result = {
        "step": 30, "rsum": 81.5, "t2i_R@1": 2.5, "loss": float("nan"), "best": True,
        "training_iteration": 3, "time_this_iter_s": 1.0, "time_total_s": 9.0, "timestamp": 1,
        "pid": 7, "date": "today", "hostname": "h", "node_ip": "127.0.0.1", "done": False,
        "time_since_restore": 9.0, "iterations_since_restore": 3, "timesteps_total": 0,
        "episodes_total": 0, "timesteps_since_restore": 0, "should_checkpoint": True,
        "checkpoint_dir_name": "c", "experiment_tag": "1", "trial_id": "t1", "config": {},
    }  # fmt: skip
    logger.on_trial_result(0, [], SimpleNamespace(trial_id="t1"), result)
    (metrics,) = batches
    assert {m.key: m.value for m in metrics} == {"step": 30, "rsum": 81.5, "t2i_R_at_1": 2.5}
    assert {m.step for m in metrics} == {30}


def check_mlflow_as_users_see_it(out: Path, experiment: str, n_trials: int) -> None:
    """A real `mlflow server` (`conaclip ui`) on the ablation's store, asked through its REST
    API what the UI shows: the experiment kind and description, one parent run holding the
    reports, every trial's run nested under it."""
    port = free_port()
    printed = out / "ui.stdout"
    with printed.open("w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "ui", "--out", str(out), "--port",
             str(port)],
            stdout=sink, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"

    def call(path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            api + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    try:
        deadline = time.time() + 120
        while True:
            try:
                found = call(f"/experiments/get-by-name?experiment_name={experiment}")
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        tags = {t["key"]: t["value"] for t in found["experiment"].get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        assert "preset smoke" in tags["mlflow.note.content"]
        assert "`conaclip ablate --preset smoke" in tags["mlflow.note.content"]
        runs = call("/runs/search", {"experiment_ids": [found["experiment"]["experiment_id"]],
                                     "max_results": 100})["runs"]  # fmt: skip
        run_tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [r for r, t in zip(runs, run_tags, strict=True)
                   if t.get("conaclip.summary") == "true"]  # fmt: skip
        assert len(parents) == 1
        parent_id = parents[0]["info"]["run_id"]
        children = [t for t in run_tags if t.get("conaclip.summary") != "true"]
        assert len(children) == n_trials
        assert all(t["mlflow.parentRunId"] == parent_id for t in children)
        listed = call(f"/artifacts/list?run_id={parent_id}")
        names = {Path(f["path"]).name for f in listed.get("files", [])}
        assert {"table.md", "heatmap.png", "recipe.yaml"} <= names
        # The link `conaclip ui` prints opens the experiment on its runs, not MLflow 3's GenAI
        # overview, and the page it names is served.
        experiment_id = found["experiment"]["experiment_id"]
        assert printed.read_text().splitlines()[1] == (
            f"runs of {experiment}: http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs"
            "?workflowType=machine_learning&viewStateShareKey=conaclip-runs"
        )
        # ... in the view stored on the experiment, which the UI reads through the same API:
        # pair set, seed and the recall metrics as columns, best rsum first.
        view = json.loads(tags["mlflow.sharedViewState.conaclip-runs"])
        assert view == {
            "selectedColumns": ["params.`pair_set`", "params.`seed`", "metrics.`rsum`",
                                "metrics.`t2i_R1`", "metrics.`i2t_R1`", "metrics.`mean_recall`"],
            "orderByKey": "metrics.`rsum`",
            "orderByAsc": False,
        }  # fmt: skip
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read(2000).lower()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


@pytest.mark.integration
def test_smoke_preset_end_to_end(tiny_shapes, tiny_teacher, local_ray, tmp_path, capsys):
    out = tmp_path / "ablate"
    flags = data_flags(tiny_shapes, tiny_teacher, tmp_path / "home")
    code = main(["ablate", "--preset", "smoke", "--out", str(out), "--name", "smoke-e2e", *flags])
    assert code == 0
    uri = f"sqlite:///{out}/mlruns.db"
    runs = finished_runs(uri, "smoke-e2e")
    assert len(runs) == 3
    assert set(runs["status"]) == {"FINISHED"}
    assert set(runs["tags.conaclip.status"]) == {"FINISHED"}
    assert sorted(runs["params.pair_set"]) == [
        "baseline", "baseline+inter_ts:sym_kl", "baseline+intra_ts:sd"
    ]  # fmt: skip
    assert set(runs["params.steps"]) == {"6"}
    assert (runs["metrics.step"] == 6).all()
    # The live line, not Tune's tables or its start-up box and result paths, was the progress.
    printed = capsys.readouterr()
    assert "ablation: trials 3/3 done, 0 running, 0 pending" in printed.err
    for tune_says in ("Configuration for experiment", "View detailed results", "Trial status"):
        assert tune_says not in printed.out + printed.err

    # Each trial was a Ray Train run, without the two actors a local cluster has no use for
    # (Ray Data's manager, with no datasets; the preemption watcher, with no cloud nodes).
    @local_ray.remote(num_cpus=0)
    def actor_classes() -> set[str]:  # in the cluster, whose processes know its state API
        from ray.util.state import list_actors

        return {actor.class_name for actor in list_actors(limit=10_000)}

    classes = local_ray.get(actor_classes.remote())
    assert {"TrainController", "RayTrainWorker"} <= classes
    assert not classes & {"DatasetManager", "PreemptionWatcher"}
    # Every trial logged the per-query ranks of its final eval, and they are exactly what its
    # final recalls were computed from (the table's bootstrap reads them).
    for run in runs.to_dict("records"):
        ranks = tracking.read_eval_ranks(uri, run["run_id"])
        again = metrics_from_ranks(QueryRanks.from_arrays(ranks))
        assert again["rsum"] == pytest.approx(run["metrics.rsum"])
    # The fair-cell weight the sym_kl trial measured after warm-up is logged with it.
    sym = runs[runs["params.pair_set"] == "baseline+inter_ts:sym_kl"].iloc[0]
    assert sym["metrics.weight_intra_ts_infonce"] == 1.0
    assert sym["metrics.weight_inter_ts_sym_kl"] > 0
    assert sym["metrics.temperature_inter_ts_sym_kl"] == KD_TEMPERATURE
    capsys.readouterr()

    assert main(["table", "--out", str(out), "--experiment", "smoke-e2e"]) == 0
    table_text = capsys.readouterr().out
    reports = out / "reports" / "smoke-e2e"
    assert (reports / "heatmap.png").stat().st_size > 1000
    for name in ("baseline", "baseline+intra_ts:sd", "baseline+inter_ts:sym_kl"):
        assert name in table_text

    assert main(["best", "--out", str(out), "--experiment", "smoke-e2e", "--verify"]) == 0
    best_text = capsys.readouterr().out
    assert best_text.startswith("best pair set by rsum: ")
    assert (reports / "recipe.yaml").is_file()
    # --verify ran the combined recipe as one more trial of the same experiment.
    verified = finished_runs(uri, "smoke-e2e")
    assert len(verified) == 4
    recipe_run = verified[verified["params.pair_set"] == "combined_recipe"].iloc[0]
    assert recipe_run["tags.conaclip.status"] == "FINISHED"
    assert recipe_run["params.steps"] == "6"

    check_mlflow_as_users_see_it(out, "smoke-e2e", n_trials=4)

    # The exported student of the best run loads back through open_clip.
    run_id = runs.sort_values("metrics.rsum").iloc[-1]["run_id"]  # of the 3 preset trials
    export_dir = tmp_path / "export"
    assert main(["export", "--run", run_id, "--ablation-out", str(out),
                 "--out", str(export_dir), "--name", "best-student"]) == 0  # fmt: skip
    assert (export_dir / "best-student.pt").is_file()
    report = json.loads((export_dir / "best-student.report.json").read_text())
    assert report["recall"]["rsum"] == pytest.approx(runs.sort_values("metrics.rsum").iloc[-1][
        "metrics.rsum"])  # fmt: skip
    assert report["student"]["params_total"] < report["teacher"]["params_total"]


@pytest.mark.integration
def test_asha_stops_trials_and_frees_their_cpus(tiny_shapes, tiny_teacher, local_ray, tmp_path):
    out = tmp_path / "asha"
    flags = data_flags(tiny_shapes, tiny_teacher, tmp_path / "home")
    # 3 pair sets x 2 seeds, a report every 2 of 8 steps; the first rung at report 1 and a
    # reduction of 2 stop about half of the trials there, while others still run.
    code = main(["ablate", "--preset", "smoke", "--seeds", "2", "--steps", "8",
                 "--eval-every", "2", "--scheduler", "asha", "--grace-period", "1",
                 "--out", str(out), "--name", "asha-e2e", *flags])  # fmt: skip
    assert code == 0
    runs = finished_runs(f"sqlite:///{out}/mlruns.db", "asha-e2e")
    assert len(runs) == 6
    # A stopped trial is a finished one that ended early, never a failed one.
    assert set(runs["tags.conaclip.status"]) == {"FINISHED"}
    assert (runs["metrics.step"] < 8).any() and (runs["metrics.step"] == 8).any()
    assert set(runs["params.max_failures"]) == {"0"}

    @local_ray.remote(num_cpus=0)
    def live_placement_groups() -> list[str]:
        from ray.util import placement_group_table

        return [pg for pg, info in placement_group_table().items() if info["state"] != "REMOVED"]

    # Every trial's placement group is gone once the ablation is over: a stopped trial left
    # none holding CPUs that the next ablation on this cluster would wait for.
    deadline = time.monotonic() + 30
    while (left := local_ray.get(live_placement_groups.remote())) and time.monotonic() < deadline:
        time.sleep(1)
    assert left == []


def _signal_after_one_trial(tiny_shapes, tiny_teacher, tmp_path, name: str, sig: int):
    """Run the smoke ablation ``name`` as a driver process (12 steps, one trial at a time),
    send it ``sig`` once MLflow has one FINISHED run, and wait for it to end. Returns (its exit
    code, what it printed, its --out, the MLflow URI, the FINISHED run ids before the signal).
    The driver's own local Ray cluster is ended by PID afterwards."""
    out = tmp_path / "ablate"
    flags = data_flags(tiny_shapes, tiny_teacher, tmp_path / "home")
    command = [sys.executable, "-m", "orchestrator.cli", "ablate", "--preset", "smoke",
               "--out", str(out), "--name", name, "--steps", "12", "--eval-every", "3",
               "--max-concurrent-trials", "1", *flags]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "driver.log"
    with log.open("w") as sink:
        driver = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    uri = f"sqlite:///{out}/mlruns.db"
    deadline = time.time() + 420
    children: list[int] = []
    try:
        while time.time() < deadline:
            time.sleep(2)
            children = sorted(set(children) | set(descendant_pids(driver.pid)))
            if driver.poll() is not None:
                tail = log.read_text()[-3000:]
                pytest.fail(f"driver ended (rc {driver.returncode}) before the signal:\n{tail}")
            if f"ablation {name}:" not in log.read_text():
                continue  # the driver has not finished creating the MLflow store yet
            try:
                runs = finished_runs(uri, name)
                done = int((runs["tags.conaclip.status"] == "FINISHED").sum())
            except Exception:  # no run (so no status column) yet
                continue
            if done >= 1:
                break
        else:
            pytest.fail("no trial finished in time")
        children = sorted(set(children) | set(descendant_pids(driver.pid)))
        driver.send_signal(sig)
        code = driver.wait(timeout=180)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    done_before = set(runs.loc[runs["tags.conaclip.status"] == "FINISHED", "run_id"])
    return code, log.read_text(), out, uri, done_before


@pytest.mark.integration
@pytest.mark.faults
def test_resume_after_the_driver_is_killed(tiny_shapes, tiny_teacher, tmp_path):
    """SIGKILL the ablation driver after one trial finished; --resume finishes the rest and
    MLflow ends with exactly one FINISHED run per trial."""
    _, _, out, uri, done_before = _signal_after_one_trial(
        tiny_shapes, tiny_teacher, tmp_path, "killed", signal.SIGKILL
    )
    resume = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "ablate", "--resume", "--out", str(out),
         "--name", "killed"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert resume.returncode == 0, resume.stderr[-3000:]
    runs = finished_runs(uri, "killed")
    assert len(runs) == 3
    assert list(runs["tags.conaclip.status"]) == ["FINISHED"] * 3
    assert (runs["metrics.step"] == 12).all()
    assert done_before <= set(runs["run_id"])


@pytest.mark.integration
@pytest.mark.faults
def test_ctrl_c_ends_the_ablation_as_interrupted_not_as_done(tiny_shapes, tiny_teacher, tmp_path):
    """SIGINT (Ctrl-C) after one trial finished: Tune stops and returns normally, and conaclip
    says the ablation was interrupted (exit 130, the resume command), keeps the finished run
    in MLflow and counts no unfinished trial as finished."""
    code, printed, out, uri, _ = _signal_after_one_trial(
        tiny_shapes, tiny_teacher, tmp_path, "ctrlc", signal.SIGINT
    )
    assert code == 130, printed[-3000:]
    finished = int((finished_runs(uri, "ctrlc")["tags.conaclip.status"] == "FINISHED").sum())
    assert 1 <= finished < 3
    assert f"ablation ctrlc: {finished}/3 trials finished" in printed
    assert f"interrupted: {3 - finished} trial(s) did not finish" in printed
    assert f"conaclip ablate --resume --out {out} --name ctrlc" in printed


@pytest.mark.integration
@pytest.mark.faults
def test_resume_from_mlflow_when_tunes_state_is_gone(
    tiny_shapes, tiny_teacher, local_ray, tmp_path, capsys
):
    """<out>/tune/ deleted and one trial's run recorded FAILED (as an OOM-killed trial's is):
    --resume with the ablation's flags reruns exactly that trial, from the MLflow ledger."""
    from mlflow import MlflowClient

    out = tmp_path / "ablate"
    # Two pair sets: one wave of trials on two CPUs, and one of them to lose.
    flags = ["--pairs", "intra_ts:infonce;intra_ts:sd", "--out", str(out), "--name", "ledger",
             "--student", "conaclip-student-xs", "--steps", "6", "--eval-every", "3",
             "--batch-size", "16",
             *data_flags(tiny_shapes, tiny_teacher, tmp_path / "home")]  # fmt: skip
    assert main(["ablate", *flags]) == 0
    uri = f"sqlite:///{out}/mlruns.db"
    before = finished_runs(uri, "ledger")
    lost = before[before["params.pair_set"] == "intra_ts:sd"].iloc[0]
    MlflowClient(uri).set_tag(lost["run_id"], "conaclip.status", "FAILED")
    shutil.rmtree(out / "tune")
    capsys.readouterr()

    assert main(["ablate", *flags, "--resume"]) == 0
    err = capsys.readouterr().err
    assert (
        f"resume: no Tune state at {out / 'tune' / 'ledger'}; resuming from the MLflow runs" in err
    )
    assert "resume: 1 of 2 trials have a FINISHED run in experiment ledger; running 1" in err
    after = finished_runs(uri, "ledger")
    rerun = after[~after["run_id"].isin(before["run_id"])]
    assert list(rerun["params.pair_set"]) == ["intra_ts:sd"]
    assert list(rerun["tags.conaclip.status"]) == ["FINISHED"]
    assert list(rerun["metrics.step"]) == [6]
    # Nothing is left to do: a second --resume (from the re-run's saved spec) runs nothing.
    assert main(["ablate", "--resume", "--out", str(out)]) == 0
    assert "running 0" in capsys.readouterr().err
    assert len(finished_runs(uri, "ledger")) == 3


@pytest.mark.integration
def test_train_command_two_workers_improves(tiny_shapes, tiny_teacher, local_ray, tmp_path):
    out = tmp_path / "train"
    flags = data_flags(tiny_shapes, tiny_teacher, tmp_path / "home")
    code = main(["train", "--pairs", "inter_ss:infonce,intra_ts:infonce", "--workers", "2",
                 "--student", "conaclip-student-xs", "--steps", "40", "--eval-every", "10",
                 "--batch-size", "16", "--out", str(out), *flags])  # fmt: skip
    assert code == 0
    history = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().split(
        "\n") if line]  # fmt: skip
    assert [h["step"] for h in history] == [10, 20, 30, 40]
    assert [h["samples_seen"] for h in history] == [320, 640, 960, 1280]
    assert history[-1]["rsum"] > history[0]["rsum"]
    summary = json.loads((out / "train" / "metrics.json").read_text())
    assert summary["metrics"]["step"] == 40
    assert Path(summary["checkpoint"]).is_dir()


def _spec(pair_sets, **fields):
    from orchestrator.ablation import AblationSpec
    from trainers.run_config import DistillConfig

    return AblationSpec(name="x", preset="custom", out_dir="/tmp/x", tracking_uri="sqlite:///x.db",
                        pair_sets=pair_sets, run=DistillConfig(**fields))  # fmt: skip


def test_spec_pair_sets_are_typed_checked_and_round_trip_through_json():
    from pydantic import ValidationError

    from orchestrator.ablation import AblationSpec, pair_sets_by_name, param_space
    from search_spaces.presets import PairSet

    sets = [PairSet.parse("inter_ss:kl*0.5,intra_ts:infonce", "a"), PairSet.parse("intra_ts:sd")]
    spec = _spec(pair_sets_by_name(sets))
    assert spec.pair_set("a") == sets[0] and spec.pair_keys()["a"] == sets[0].key()
    assert AblationSpec.model_validate_json(spec.model_dump_json()) == spec
    # Tune's config stays JSON, which the trial validates again.
    assert param_space(spec)["pair_sets"]["a"][0] == {
        "pair": "intra_ts:infonce", "weight": 1.0, "temperature": None
    }  # fmt: skip
    with pytest.raises(ValidationError, match="pair intra_ts:sd appears more than once"):
        _spec({"a": [{"pair": "intra_ts:sd"}, {"pair": "intra_ts:sd", "weight": 2}]})
    with pytest.raises(InputError, match="pair sets: pair sets 'a' and 'b' have the same pairs"):
        pair_sets_by_name([PairSet.parse("intra_ts:sd", "a"), PairSet.parse("intra_ts:sd", "b")])


def test_the_teacher_is_prepared_when_any_pair_set_reads_it():
    # inter_ss:infonce and intra_ss:sym_sd read the student alone; the run template's own
    # pairs play no part.
    student_only = {"ss": [{"pair": "inter_ss:infonce"}, {"pair": "intra_ss:sym_sd"}]}
    assert not _spec(student_only).needs_teacher
    assert not _spec(student_only, pairs="intra_ts:infonce").needs_teacher
    assert _spec({**student_only, "ts": [{"pair": "intra_ts:fd"}]}).needs_teacher


def test_ablate_and_report_commands_share_one_default_out_and_no_import():
    import ast
    import inspect

    from orchestrator import ablate_cli, cli, cli_flags, report_cli

    parser = cli.build_parser()
    outs = [parser.parse_args([*argv]).out for argv in (["table"], ["best"], ["ui"])]
    outs.append(parser.parse_args(["export", "--run", "r", "--out", "o"]).ablation_out)
    assert {Path(out) for out in outs} == {cli_flags.DEFAULT_ABLATION_OUT}
    # Neither CLI module imports the other, at the top or inside a function.
    for module, other in ((ablate_cli, "report_cli"), (report_cli, "ablate_cli")):
        imported = set()
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.ImportFrom):
                imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert f"orchestrator.{other}" not in imported, module.__name__


def _record_asset_builds(monkeypatch, tmp_path) -> list[str]:
    """The built-in data, teacher and teacher cache replaced by recorders (they take minutes):
    the list they append "teacher" and "cache" to; data at /d/train, teacher /t.pt, cache
    ``tmp_path``."""
    from orchestrator import assets

    made = []
    shards = assets.Shards(train="/d/train", eval="/d/eval")
    monkeypatch.setattr(assets, "ensure_builtin_data", lambda workspace: shards)
    monkeypatch.setattr(
        assets,
        "ensure_builtin_teacher",
        lambda workspace, shards: made.append("teacher") or ("t", "/t.pt", {}),
    )
    monkeypatch.setattr(assets, "ensure_teacher_cache",
                        lambda cfg, workspace: made.append("cache") or tmp_path)  # fmt: skip
    return made


def test_resolve_spec_prepares_the_teacher_only_for_pair_sets_that_read_it(monkeypatch, tmp_path):
    from orchestrator.ablation import resolve_spec
    from orchestrator.config import Workspace

    made = _record_asset_builds(monkeypatch, tmp_path)
    workspace = Workspace(home=tmp_path)
    student_only = resolve_spec(_spec({"ss": [{"pair": "inter_ss:infonce"}]}), workspace, True)
    assert made == [] and student_only.run.train_shards == "/d/train"
    with_teacher = resolve_spec(_spec({"ts": [{"pair": "intra_ts:sd"}]}, pairs="inter_ss:fd"),
                                workspace, True)  # fmt: skip
    assert made == ["teacher", "cache"] and with_teacher.run.teacher_checkpoint == "/t.pt"


def test_the_teacher_trains_before_ray_starts_and_its_cache_after(monkeypatch, tmp_path):
    """An idle local cluster's daemons share the 2 cores with the teacher's training, so the
    ablation and the demo train it before ``init_ray``; the cache needs Ray's tasks."""
    from orchestrator import ablate_cli
    from orchestrator.config import Workspace

    made = _record_asset_builds(monkeypatch, tmp_path)
    monkeypatch.setattr(ablate_cli, "init_ray",
                        lambda address, log_to_driver: made.append(f"ray {address}"))  # fmt: skip
    spec = _spec({"ts": [{"pair": "intra_ts:sd"}]})
    resolved = ablate_cli._resolve_around_ray(spec, Workspace(home=tmp_path), True, "auto")
    assert made == ["teacher", "ray auto", "cache"]
    assert resolved.run.teacher_checkpoint == "/t.pt"
    assert resolved.run.teacher_cache == str(tmp_path)
