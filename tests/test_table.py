"""MLflow -> runs frame -> strategy-selection table, heatmap and the `table` / `best` CLI.

Fast tests feed selection_table the frame runs_frame() gives for the runs below; integration
tests log those runs to one real SQLite MLflow store per module (its creation alone takes
3-7 s) and check that MLflow gives the same table, and drive the CLI. Each run's recalls
are t2i = (a, a+10, a+20) and i2t = (b, b+10, b+20), so rsum = 3a + 3b + 60. Expected numbers
below are worked out by hand from the (a, b) of each run.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from orchestrator import report_cli, tracking
from orchestrator.table import format_table, heatmap, heatmap_grid, selection_table
from search_spaces.presets import pair_sets_from_yaml
from trainers.errors import InputError
from trainers.graph import LEARNING_TYPES, STRATEGIES

BASE = "intra_ts:infonce"
# pair set name -> (pairs key, [(a, b, status), ...] one per seed)
TRIALS = {
    "baseline": (BASE, [(10, 12, "FINISHED"), (12, 14, "FINISHED"), (14, 16, "FINISHED")]),
    "baseline+intra_ts:sd": (
        f"{BASE},intra_ts:sd",
        [(20, 22, "FINISHED"), (22, 24, "FINISHED"), (24, 26, "FINISHED")],
    ),
    "baseline+inter_ts:sym_kl": (
        f"{BASE},inter_ts:sym_kl",
        [(14, 16, "FINISHED"), (16, 18, "FINISHED"), (40, 40, "FAILED")],
    ),
    "baseline+inter_ss:kl": (
        f"{BASE},inter_ss:kl",
        [(4, 6, "FINISHED"), (14, 16, "FINISHED"), (24, 26, "FINISHED")],
    ),
    "baseline+intra_ss:sd": (f"{BASE},intra_ss:sd", [(8, 10, "FINISHED")]),
}
# By hand: baseline rsum 126, 138, 150 -> mean 138, sample std 12.
# +intra_ts:sd 186, 198, 210 -> 198 ± 12, delta +60.
# +inter_ts:sym_kl 150, 162 (the FAILED 300 is left out) -> 156 ± sqrt(72), delta +18.
# +inter_ss:kl 90, 150, 210 -> 150 ± 60, delta +12.   +intra_ss:sd 114 ± 0, delta -24.
EXPECTED_RSUM = {
    "baseline": (138.0, 12.0, 0.0),
    "baseline+intra_ts:sd": (198.0, 12.0, 60.0),
    "baseline+inter_ts:sym_kl": (156.0, np.sqrt(72.0), 18.0),
    "baseline+inter_ss:kl": (150.0, 60.0, 12.0),
    "baseline+intra_ss:sd": (114.0, 0.0, -24.0),
}
FINAL_STEP = 6


def _log_trial(client, experiment_id, name, key, seed, a, b, status):
    from mlflow.entities import Metric, Param

    tags = {
        "conaclip.preset": "test", "conaclip.ablation_id": "abl-1",
        "conaclip.trial_id": f"{name}-{seed}", "conaclip.pair_set": name,
        "conaclip.baseline": "true" if name == "baseline" else "false", "conaclip.status": status,
    }  # fmt: skip
    run = client.create_run(experiment_id, run_name=f"{name}-{seed}", tags=tags)
    run_id = run.info.run_id
    params = {"pairs": key, "pair_set": name, "seed": seed, "student": "conaclip-student-xs",
              "teacher": "conaclip-teacher", "steps": FINAL_STEP, "batch_size": 16}  # fmt: skip
    metrics = []
    # An earlier report with other values: the table must use the last one.
    last_step = 4 if status == "FAILED" else FINAL_STEP
    for step, shift in ((3, -5.0), (last_step, 0.0)):
        recalls = {
            "t2i_R1": a, "t2i_R5": a + 10, "t2i_R10": a + 20,
            "i2t_R1": b, "i2t_R5": b + 10, "i2t_R10": b + 20,
        }  # fmt: skip
        values = {k: v + shift for k, v in recalls.items()}
        values["rsum"] = sum(values.values())
        values["step"] = step
        metrics += [Metric(k, float(v), timestamp=step, step=step) for k, v in values.items()]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run_id, status)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("ablate")
    uri = tracking.default_tracking_uri(root)
    client = MlflowClient(uri)
    older = tracking.get_or_create_experiment(uri, "older-ablation")
    _log_trial(client, older, "baseline", BASE, 0, 1, 1, "FINISHED")
    experiment = tracking.get_or_create_experiment(uri, "ablation-a")
    for name, (key, seeds) in TRIALS.items():
        for seed, (a, b, status) in enumerate(seeds):
            _log_trial(client, experiment, name, key, seed, a, b, status)
    summary = tracking.summary_run_id(uri, "ablation-a")
    client.log_metric(summary, "rsum", 999.0)
    # Created last but not an ablation: "the newest conaclip experiment" must skip it.
    scratch = client.create_experiment("scratch", artifact_location=(root / "s").as_uri())
    client.set_terminated(client.create_run(scratch).info.run_id)
    return uri


def _frame_row(name: str, key: str, seed: int, a: float, b: float, status: str) -> dict:
    """The row runs_frame() gives for one run logged by _log_trial (checked against MLflow in
    test_mlflow_gives_the_same_table)."""
    recalls = {"t2i_R1": a, "t2i_R5": a + 10, "t2i_R10": a + 20,
               "i2t_R1": b, "i2t_R5": b + 10, "i2t_R10": b + 20}  # fmt: skip
    row = {"run_id": f"{name}-{seed}", "run_name": f"{name}-{seed}", "status": status,
           "params.pairs": key, "params.pair_set": name, "params.seed": str(seed),
           "params.steps": str(FINAL_STEP), "tags.conaclip.status": status,
           "tags.conaclip.baseline": "true" if name == "baseline" else "false"}  # fmt: skip
    row.update({f"metrics.{k}": float(v) for k, v in recalls.items()})
    row["metrics.rsum"] = sum(recalls.values())
    row["metrics.step"] = 4.0 if status == "FAILED" else float(FINAL_STEP)
    return row


@pytest.fixture(scope="module")
def runs() -> pd.DataFrame:
    rows = [
        _frame_row(name, key, seed, a, b, status)
        for name, (key, seeds) in TRIALS.items()
        for seed, (a, b, status) in enumerate(seeds)
    ]
    frame = pd.DataFrame(rows)
    frame.attrs["experiment"] = "ablation-a"
    return frame


@pytest.fixture(scope="module")
def table(runs) -> pd.DataFrame:
    return selection_table(runs)


def test_default_tracking_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.default_tracking_uri("runs/x") == f"sqlite:///{tmp_path}/runs/x/mlruns.db"
    assert tracking.default_tracking_uri("runs/x").startswith("sqlite:////")


@pytest.mark.integration
def test_runs_frame_picks_the_newest_ablation_and_skips_the_summary(store):
    runs = tracking.runs_frame(store, None)
    assert runs.attrs["experiment"] == "ablation-a"
    assert len(runs) == 3 + 3 + 3 + 3 + 1
    assert (runs["tags.conaclip.preset"] == "test").all()
    assert runs["metrics.rsum"].max() < 999.0
    first = runs[runs["run_name"] == "baseline-1"].iloc[0]
    # latest values: a=12, b=14 at step 6 (not the step-3 values 5 lower)
    assert first["metrics.t2i_R1"] == 12.0 and first["metrics.rsum"] == 138.0
    assert first["params.steps"] == "6" and first["status"] == "FINISHED"
    older = tracking.runs_frame(store, "older-ablation")
    assert len(older) == 1 and older["metrics.rsum"].iloc[0] == 3 + 3 + 60


@pytest.mark.integration
def test_unknown_experiment_names_the_known_ones(store):
    with pytest.raises(
        InputError, match=r"experiment 'nope' not found.*: ablation-a, older-ablation, scratch$"
    ):
        tracking.runs_frame(store, "nope")


@pytest.mark.integration
def test_mlflow_gives_the_same_table(store, table):
    from_mlflow = selection_table(tracking.runs_frame(store, "ablation-a"))
    assert from_mlflow.attrs == table.attrs
    pd.testing.assert_frame_equal(from_mlflow, table)


def test_table_values_match_hand_computation(table):
    assert table.attrs == {"metric": "rsum", "baseline": BASE, "experiment": "ablation-a"}
    assert list(table["pair_set"]) == [
        "baseline",
        "baseline+intra_ts:sd",
        "baseline+inter_ts:sym_kl",
        "baseline+inter_ss:kl",
        "baseline+intra_ss:sd",
    ]  # fmt: skip  (baseline first, then by mean rsum)
    rows = table.set_index("pair_set")
    for name, (mean, std, delta) in EXPECTED_RSUM.items():
        assert rows.loc[name, "rsum_mean"] == pytest.approx(mean)
        assert rows.loc[name, "rsum_std"] == pytest.approx(std)
        assert rows.loc[name, "delta_rsum"] == pytest.approx(delta)
    # t2i_R1: baseline 10, 12, 14 -> 12 ± 2; i2t_R10 of +inter_ts:sym_kl: 36, 38 -> 37 ± sqrt(2)
    assert rows.loc["baseline", "t2i_R1_mean"] == 12.0 and rows.loc["baseline", "t2i_R1_std"] == 2.0
    assert rows.loc["baseline+inter_ts:sym_kl", "i2t_R10_mean"] == 37.0
    assert rows.loc["baseline+inter_ts:sym_kl", "i2t_R10_std"] == pytest.approx(np.sqrt(2.0))
    assert list(rows["seeds"]) == [3, 3, 2, 3, 1]
    assert list(rows["runs"]) == [3, 3, 3, 3, 1]
    assert rows.loc["baseline+inter_ts:sym_kl", "status"] == "2/3 FINISHED, 1 FAILED"
    assert rows.loc["baseline", "status"] == "FINISHED"
    assert list(rows["steps"]) == [FINAL_STEP] * 5
    assert list(rows["added"]) == ["", "intra_ts:sd", "inter_ts:sym_kl", "inter_ss:kl",
                                   "intra_ss:sd"]  # fmt: skip
    assert list(rows["is_baseline"]) == [True, False, False, False, False]


def test_table_by_another_metric(runs):
    by_r1 = selection_table(runs, metric="t2i_R1").set_index("pair_set")
    # +intra_ts:sd t2i_R1 = 20, 22, 24 -> 22; baseline 12
    assert by_r1.loc["baseline+intra_ts:sd", "delta_t2i_R1"] == 10.0
    assert by_r1.attrs["metric"] == "t2i_R1"
    with pytest.raises(InputError, match=r"--metric recall: no run logged it; .*'t2i_R1'"):
        selection_table(runs, metric="recall")


def test_formats(table):
    md = format_table(table, "md")
    assert "| **baseline** (baseline) | `intra_ts:infonce` | 3 | 12.00 ± 2.00 |" in md
    assert "| 198.00 ± 12.00 | +60.00 | 6 | FINISHED |" in md
    assert "| 156.00 ± 8.49 | +18.00 | 6 | 2/3 FINISHED, 1 FAILED |" in md
    assert len(md.strip().splitlines()) == 2 + 5
    back = pd.read_csv(io.StringIO(format_table(table, "csv")))
    assert back["rsum_mean"].tolist() == pytest.approx([138, 198, 156, 150, 114])
    records = json.loads(format_table(table, "json"))
    assert records[4]["pair_set"] == "baseline+intra_ss:sd" and records[4]["delta_rsum"] == -24
    with pytest.raises(InputError, match="--format html: expected one of md, csv, json"):
        format_table(table, "html")


def test_heatmap_draws_the_hand_computed_grid(table, tmp_path):
    grid = heatmap(table, tmp_path / "h" / "heatmap.png")
    assert list(grid.values.index) == list(LEARNING_TYPES)
    assert list(grid.values.columns) == list(STRATEGIES)
    expected = {
        ("intra_ts", "infonce"): (0.0, "base"),
        ("intra_ts", "sd"): (60.0, "+60.00\n±12.00"),
        ("inter_ts", "sym_kl"): (18.0, "+18.00\n±8.49"),
        ("inter_ss", "kl"): (12.0, "+12.00\n±60.00"),
        ("intra_ss", "sd"): (-24.0, "-24.00"),
    }
    invalid = {("intra_ss", "infonce"), ("intra_ss", "fd"), ("inter_ss", "sym_sd"),
               ("inter_ss", "sym_kl")}  # fmt: skip
    for lt in LEARNING_TYPES:
        for st in STRATEGIES:
            value, label = grid.values.loc[lt, st], grid.labels.loc[lt, st]
            if (lt, st) in expected:
                assert (value, label) == expected[(lt, st)]
            else:
                assert np.isnan(value)
                assert label == ("n/a" if (lt, st) in invalid else "")
    with Image.open(tmp_path / "h" / "heatmap.png") as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_heatmap_needs_a_baseline(runs):
    untagged = runs.drop(columns=["tags.conaclip.baseline"])
    result = selection_table(untagged)
    assert result.attrs["baseline"] is None and result["delta_rsum"].isna().all()
    with pytest.raises(InputError, match=r"no run is tagged conaclip\.baseline=true"):
        heatmap_grid(result)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="conaclip")
    report_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.handler(args)


@pytest.mark.integration
def test_table_cli_writes_files_and_logs_them(store, tmp_path, capsys):
    code = _cli("table", "--tracking-uri", store, "--experiment", "ablation-a", "--out",
                str(tmp_path), "--format", "csv")  # fmt: skip
    assert code == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("pair_set,pairs,added,")
    folder = tmp_path / "reports" / "ablation-a"
    assert (folder / "table.csv").read_text() == printed.out
    assert (folder / "heatmap.png").stat().st_size > 0
    from mlflow.tracking import MlflowClient

    summary = tracking.summary_run_id(store, "ablation-a")
    logged = {a.path for a in MlflowClient(store).list_artifacts(summary)}
    assert {"table.csv", "heatmap.png"} <= logged


@pytest.mark.integration
def test_best_cli_prints_winner_and_a_loadable_recipe(store, tmp_path, capsys):
    assert _cli("best", "--tracking-uri", store, "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "best pair set by rsum: baseline+intra_ts:sd" in out
    assert "rsum: 198.00 ± 12.00" in out and "Δ rsum vs baseline: +60.00" in out
    recipe = tmp_path / "reports" / "ablation-a" / "recipe.yaml"
    # inter_ss:kl gains 12 < its std 60 and intra_ss:sd loses: both left out.
    (combined,) = pair_sets_from_yaml(recipe)
    assert combined.key() == "intra_ts:infonce,intra_ts:sd,inter_ts:sym_kl"
    settings = yaml.safe_load(recipe.read_text())
    assert settings["student"] == "conaclip-student-xs" and settings["steps"] == FINAL_STEP
    assert recipe.read_text() in out


def test_cli_without_a_store_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r"no MLflow database at .*mlruns\.db"):
        _cli("table", "--out", str(tmp_path / "empty"))


def test_check_tracking_uri(tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(InputError, match=f"MLflow server at http://127.0.0.1:{port} is not"):
        tracking.check_tracking_uri(f"http://127.0.0.1:{port}", timeout_s=1.0)
    nested = tmp_path / "a" / "b" / "mlruns.db"
    tracking.check_tracking_uri(f"sqlite:///{nested}")
    assert nested.parent.is_dir() and not nested.exists()
    with pytest.raises(InputError, match="no MLflow database"):
        tracking.check_tracking_uri(f"sqlite:///{nested}", must_exist=True)
    with pytest.raises(InputError, match="MLflow 3 has no file store"):
        tracking.check_tracking_uri(str(tmp_path / "mlruns"))


@pytest.mark.integration
def test_artifacts_stay_beside_the_database(store):
    experiment = tracking.find_experiment(store, "ablation-a")
    db_dir = Path(store.removeprefix("sqlite:///")).parent
    assert experiment.artifact_location == (db_dir / "mlartifacts" / "ablation-a").as_uri()
