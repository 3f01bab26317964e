"""MLflow -> runs frame -> strategy-selection table, heatmap and the `table` / `best` CLI.

Fast tests feed selection_table the frame runs_frame() gives for the runs below; integration
tests log those runs to one real SQLite MLflow store per module (its creation alone takes
3-7 s) and check that MLflow gives the same table, and drive the CLI. Each run's recalls
are t2i = (a, a+10, a+20) and i2t = (b, b+10, b+20), so rsum = 3a + 3b + 60. Expected numbers
below are worked out by hand from the (a, b) of each run. Each finished run also has eval ranks
(``ranks_for``) on 100 images with one caption each that give exactly those recalls, so the
bootstrap over eval queries sees the same numbers the metrics report.
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

from orchestrator import report_cli, reports, stats, tracking
from orchestrator.heatmap import color_halfrange, heatmap, heatmap_grid
from orchestrator.table import load_ranks, selection_table
from orchestrator.table_format import format_table
from search_spaces.presets import PairSet, pair_sets_from_yaml
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
# +inter_ss:kl 90, 150, 210 -> 150 ± 60, delta +12.   +intra_ss:sd 114 (n=1), delta -24.
EXPECTED_RSUM = {
    "baseline": (138.0, 12.0, 0.0),
    "baseline+intra_ts:sd": (198.0, 12.0, 60.0),
    "baseline+inter_ts:sym_kl": (156.0, np.sqrt(72.0), 18.0),
    "baseline+inter_ss:kl": (150.0, 60.0, 12.0),
    "baseline+intra_ss:sd": (114.0, np.nan, -24.0),
}
# 95% t half-widths: t_{0.975,2} = 4.302653 (n = 3), t_{0.975,1} = 12.706205 (n = 2).
T2, T1 = 4.302652729749, 12.706204736174
EXPECTED_CI_HALF = {
    "baseline": T2 * 12 / np.sqrt(3),  # 29.8097
    "baseline+intra_ts:sd": T2 * 12 / np.sqrt(3),
    "baseline+inter_ts:sym_kl": T1 * np.sqrt(72) / np.sqrt(2),  # 76.2372
    "baseline+inter_ss:kl": T2 * 60 / np.sqrt(3),  # 149.0483
    "baseline+intra_ss:sd": np.nan,
}
# Paired by seed (baseline 126, 138, 150 for seeds 0, 1, 2):
# +intra_ts:sd 60, 60, 60; +inter_ts:sym_kl 24, 24 (seeds 0, 1: not the unpaired +18);
# +inter_ss:kl -36, 12, 60 -> 12 ± 48 (t = 12 / (48 / sqrt 3) = 0.433); +intra_ss:sd -12 (n=1).
EXPECTED_GAIN = {
    "baseline+intra_ts:sd": (3, 60.0, 0.0, 0.0, 0.0),
    "baseline+inter_ts:sym_kl": (2, 24.0, 0.0, 0.0, 0.0),
    "baseline+inter_ss:kl": (3, 12.0, 48.0, T2 * 48 / np.sqrt(3), 0.70723),
    "baseline+intra_ss:sd": (1, -12.0, np.nan, np.nan, np.nan),
}
FINAL_STEP = 6
N_IMAGES = 100


def ranks_for(a: float, b: float) -> dict[str, np.ndarray]:
    """Eval ranks on N_IMAGES images (one caption each) with recalls t2i (a, a+10, a+20) and
    i2t (b, b+10, b+20): a images at rank 0, 10 at rank 2, 10 at rank 7, the rest at 50."""

    def ranks(hits: float) -> np.ndarray:
        hits = int(hits)
        return np.array([0] * hits + [2] * 10 + [7] * 10 + [50] * (N_IMAGES - hits - 20))

    return {"t2i_rank": ranks(a), "i2t_rank": ranks(b), "text_to_image": np.arange(N_IMAGES)}


def _log_trial(client, experiment_id, name, key, seed, a, b, status, ranks_dir=None):
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
    if ranks_dir is not None and status == "FINISHED":
        folder = ranks_dir / run_id
        folder.mkdir(parents=True)
        np.savez(folder / tracking.EVAL_RANKS_ARTIFACT, **ranks_for(a, b))
        client.log_artifact(run_id, str(folder / tracking.EVAL_RANKS_ARTIFACT))
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
            _log_trial(client, experiment, name, key, seed, a, b, status, root / "ranks")
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
def ranks() -> dict[str, dict[str, np.ndarray]]:
    """The eval ranks of every finished run, by the run ids of the ``runs`` frame."""
    return {
        f"{name}-{seed}": ranks_for(a, b)
        for name, (_, seeds) in TRIALS.items()
        for seed, (a, b, status) in enumerate(seeds)
        if status == "FINISHED"
    }


@pytest.fixture(scope="module")
def table(runs, ranks) -> pd.DataFrame:
    return selection_table(runs, ranks=ranks)


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
    runs = tracking.runs_frame(store, "ablation-a")
    from_mlflow = selection_table(runs, ranks=load_ranks(store, runs))
    assert from_mlflow.attrs == table.attrs
    pd.testing.assert_frame_equal(from_mlflow, table)


@pytest.mark.integration
def test_eval_ranks_round_trip_through_mlflow(store):
    runs = tracking.runs_frame(store, "ablation-a")
    loaded = load_ranks(store, runs)
    finished = runs[runs["tags.conaclip.status"] == "FINISHED"]
    assert set(loaded) == set(finished["run_id"])  # the FAILED run is not read
    run = finished[finished["run_name"] == "baseline+inter_ss:kl-2"].iloc[0]
    got = tracking.read_eval_ranks(store, run["run_id"])
    expected = ranks_for(24, 26)
    assert set(got) == set(expected)
    for key, array in expected.items():
        np.testing.assert_array_equal(got[key], array)
    assert stats.recalls_from_ranks(got)["rsum"] == run["metrics.rsum"] == 210.0
    older = tracking.runs_frame(store, "older-ablation")["run_id"].iloc[0]
    assert tracking.read_eval_ranks(store, older) is None  # no artifact: None, no error


@pytest.mark.integration
def test_an_unreadable_ranks_file_is_one_line_and_not_a_crash(store, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    scratch = client.get_experiment_by_name("scratch").experiment_id  # not an ablation
    run_id = client.create_run(scratch).info.run_id
    garbage = tmp_path / tracking.EVAL_RANKS_ARTIFACT
    garbage.write_bytes(b"not an npz archive")
    client.log_artifact(run_id, str(garbage))
    client.set_terminated(run_id)
    with pytest.raises(InputError, match=f"run {run_id}: eval_ranks.npz is not a readable .npz"):
        tracking.read_eval_ranks(store, run_id)
    frame = pd.DataFrame({"run_id": [run_id], "params.pairs": [BASE], "status": ["FINISHED"]})
    assert load_ranks(store, frame) == {run_id: {}}  # the table reports it as unusable


def test_table_values_match_hand_computation(table):
    assert table.attrs == {
        "metric": "rsum", "baseline": BASE, "experiment": "ablation-a", "correction": "holm",
        "alpha": 0.05, "n_boot": 2000, "boot_seed": 0, "boot_note": None,
        "eval_set": stats.eval_set_id(ranks_for(10, 12)), "margin": 6.0,
        "design": "fixed grid: one look at each cell's seeds", "looks": None, "first_seed": 0,
    }  # fmt: skip
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
        assert rows.loc[name, "rsum_std"] == pytest.approx(std, nan_ok=True)
        assert rows.loc[name, "delta_rsum"] == pytest.approx(delta)
        half = EXPECTED_CI_HALF[name]
        assert rows.loc[name, "rsum_ci_low"] == pytest.approx(mean - half, nan_ok=True)
        assert rows.loc[name, "rsum_ci_high"] == pytest.approx(mean + half, nan_ok=True)
    assert rows.loc["baseline", "rsum_by_seed"] == {"0": 126.0, "1": 138.0, "2": 150.0}
    assert rows.loc["baseline+inter_ts:sym_kl", "rsum_by_seed"] == {"0": 150.0, "1": 162.0}
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
    assert rows["used_weight"].isna().all() and rows["used_temperature"].isna().all()


def test_paired_gains_match_hand_computation_and_scipy(table, runs):
    rows = table.set_index("pair_set")
    assert pd.isna(rows.loc["baseline", "gain_n"]) and np.isnan(rows.loc["baseline", "p_seed"])
    for name, (n, mean, std, half, p) in EXPECTED_GAIN.items():
        row = rows.loc[name]
        assert row["gain_n"] == n and row["gain_mean"] == pytest.approx(mean)
        assert row["gain_std"] == pytest.approx(std, nan_ok=True)
        assert row["gain_ci_low"] == pytest.approx(mean - half, nan_ok=True)
        assert row["gain_ci_high"] == pytest.approx(mean + half, nan_ok=True)
        assert row["p_seed"] == pytest.approx(p, abs=1e-5, nan_ok=True)
    from scipy.stats import ttest_1samp

    assert rows.loc["baseline+inter_ss:kl", "p_seed"] == pytest.approx(
        ttest_1samp([-36.0, 12.0, 60.0], 0).pvalue
    )
    assert list(rows["verdict"]) == ["baseline", "better", "better", "open", "open"]


def test_one_test_carries_both_noises_by_hand(table):
    """The verdict's test recomputed from the ranks: the shared eval-set variance C is the
    mean cross-seed covariance of the resampled gains; +intra_ts:sd and +inter_ts:sym_kl
    have the same gain at every seed (no seed spread), so their test is the normal test with
    variance C; +inter_ss:kl's spread over seeds (sd 48) keeps it open."""
    from scipy import stats as scipy_stats

    draw = _boot_draw()
    rows = table.set_index("pair_set")
    base = {s: draw.metric(ranks_for(a, b), "rsum") for s, (a, b, _) in
            enumerate(TRIALS["baseline"][1])}  # fmt: skip
    p = {}
    for name in ("baseline+intra_ts:sd", "baseline+inter_ts:sym_kl"):
        seeds = [(a, b) for a, b, st in TRIALS[name][1] if st == "FINISHED"]
        boot = np.array([draw.metric(ranks_for(a, b), "rsum") - base[s]
                         for s, (a, b) in enumerate(seeds)])  # fmt: skip
        cov = np.cov(boot, ddof=1)
        shared = cov[~np.eye(len(seeds), dtype=bool)].mean()
        row = rows.loc[name]
        assert row["gain_se"] == pytest.approx(np.sqrt(shared))
        assert row["eval_share"] == pytest.approx(1.0)
        p[name] = 2 * scipy_stats.norm.sf(row["gain_mean"] / np.sqrt(shared))
        assert row["p_diff"] == pytest.approx(p[name], rel=1e-6)
        assert row["gain_low"] == pytest.approx(row["gain_mean"] - 1.959964 * np.sqrt(shared))
    kl = rows.loc["baseline+inter_ss:kl"]
    assert kl["verdict"] == "open" and kl["verdict_note"] == "not decided yet"
    assert kl["p_diff"] > 0.3 and kl["looks"] == 1
    one = rows.loc["baseline+intra_ss:sd"]
    assert np.isnan(one["p_diff_adj"])
    assert one["verdict_note"] == "one seed: training noise untested"
    # The family: the three rows with a test (the one-seed row is no member); each cell's
    # difference p stands against the larger p of every other cell (Holm-Shaffer).
    assert rows.loc["baseline+intra_ts:sd", "p_diff_adj"] <= 3 * max(p.values())


def _boot_draw():
    return stats.QueryBootstrap(stats.bootstrap_indices(N_IMAGES, 2000, 0))


def test_bootstrap_columns_match_a_direct_computation(table):
    """The table's bootstrap columns recomputed from the ranks with the same draw: the mean
    over a cell's seeds, and the mean over seeds of cell_s - baseline_s (same seed)."""
    draw = _boot_draw()

    def resampled(name: str) -> dict[int, np.ndarray]:
        _, seeds = TRIALS[name]
        return {s: draw.metric(ranks_for(a, b), "rsum") for s, (a, b, st) in enumerate(seeds)
                if st == "FINISHED"}  # fmt: skip

    base = resampled("baseline")
    rows = table.set_index("pair_set")
    for name in TRIALS:
        cell = resampled(name)
        low, high = np.percentile(np.mean(list(cell.values()), axis=0), [2.5, 97.5])
        assert (rows.loc[name, "boot_low"], rows.loc[name, "boot_high"]) == pytest.approx(
            (low, high)
        )
        if name == "baseline":
            assert np.isnan(rows.loc[name, "p_boot"])
            continue
        gains = np.mean([cell[s] - base[s] for s in cell], axis=0)
        low, high = np.percentile(gains, [2.5, 97.5])
        row = rows.loc[name]
        assert (row["boot_gain_low"], row["boot_gain_high"]) == pytest.approx((low, high))
        assert row["p_boot"] == pytest.approx(stats.bootstrap_p(gains))
    # Hits of +intra_ts:sd are a superset of the baseline's on every seed: every resampled
    # gain is > 0, so p_boot is the smallest possible, 2 / (B + 1); the one-seed
    # +intra_ss:sd (a=8 < 10) is the mirror image.
    assert rows.loc["baseline+intra_ts:sd", "p_boot"] == pytest.approx(2 / 2001)
    assert rows.loc["baseline+intra_ss:sd", "p_boot"] == pytest.approx(2 / 2001)
    assert rows.loc["baseline+intra_ss:sd", "boot_gain_high"] < 0


def test_bootstrap_gaps_are_nan_with_one_line_why(runs, ranks):
    no_kl = {k: v for k, v in ranks.items() if k != "baseline+inter_ss:kl-1"}
    other_set = {**no_kl, "baseline+intra_ts:sd-0": {
        **ranks_for(20, 22), "text_to_image": np.arange(N_IMAGES)[::-1].copy()}}  # fmt: skip
    result = selection_table(runs, ranks=other_set).set_index("pair_set")
    note = result.attrs["boot_note"]
    assert note.startswith("bootstrap over eval queries: 1 finished runs have no eval_ranks.npz")
    assert "1 runs scored another eval set" in note and "\n" not in note
    for name in ("baseline+inter_ss:kl", "baseline+intra_ts:sd"):
        assert result.loc[name, ["boot_low", "boot_gain_low", "p_boot"]].isna().all()
        assert result.loc[name, "verdict"] == "open"  # eval noise untested: no verdict
    assert result.loc["baseline+inter_ts:sym_kl", "verdict"] == "better"
    assert result.loc["baseline", "boot_low"] > 0
    assert result.loc["baseline+intra_ts:sd", "verdict_note"] == (
        "no usable eval ranks: eval-set noise untested"
    )
    nothing = selection_table(runs)
    assert nothing["boot_low"].isna().all() and (nothing["verdict"] != "better").all()
    assert "no eval ranks were loaded" in nothing.attrs["boot_note"]
    by_loss = selection_table(runs.assign(**{"metrics.loss": 1.0}), "loss", ranks=ranks)
    assert "loss is not computable from eval ranks" in by_loss.attrs["boot_note"]
    bad = selection_table(runs, ranks={**ranks, "baseline-0": {}})
    assert "1 have unusable ranks (baseline-0: missing t2i_rank" in bad.attrs["boot_note"]


def test_identical_runs_are_equivalent(runs, ranks):
    twin = runs[runs["params.pair_set"] == "baseline"].assign(
        **{"params.pair_set": "twin", "params.pairs": f"{BASE},intra_ts:sd",
           "tags.conaclip.baseline": "false",
           "run_id": lambda f: f["run_id"].str.replace("baseline", "twin")}
    )  # fmt: skip
    both = pd.concat([runs[runs["params.pair_set"] == "baseline"], twin], ignore_index=True)
    twin_ranks = {**ranks, **{f"twin-{s}": ranks[f"baseline-{s}"] for s in range(3)}}
    row = selection_table(both, ranks=twin_ranks).set_index("pair_set").loc["twin"]
    assert (row["boot_gain_low"], row["boot_gain_high"], row["p_boot"]) == (0.0, 0.0, 1.0)
    assert (row["gain_mean"], row["p_seed"], row["p_diff"]) == (0.0, 1.0, 1.0)
    # A gain of exactly 0 on every seed and every resample lies inside any margin.
    assert (row["p_equiv"], row["verdict"]) == (0.0, "equivalent")


def test_benjamini_hochberg_option_and_bad_settings(runs, ranks):
    bh = selection_table(runs, ranks=ranks, correction="bh").set_index("pair_set")
    assert bh.attrs["correction"] == "bh"
    both = np.concatenate([bh["p_diff_seq"].iloc[1:], bh["p_equiv_seq"].iloc[1:]])
    adjusted = stats.adjust_pvalues(both, "bh")
    assert bh["p_diff_adj"].iloc[1:].to_numpy() == pytest.approx(adjusted[:4], nan_ok=True)
    assert bh["p_equiv_adj"].iloc[1:].to_numpy() == pytest.approx(adjusted[4:], nan_ok=True)
    with pytest.raises(InputError, match="--correction bonferroni: expected one of holm, bh"):
        selection_table(runs, correction="bonferroni")
    with pytest.raises(InputError, match=r"--alpha 1\.5"):
        selection_table(runs, alpha=1.5)
    with pytest.raises(InputError, match=r"--margin -1\.0: expected a positive gain"):
        selection_table(runs, margin=-1.0)


def test_used_weight_and_temperature_of_the_added_pair():
    rows = [
        {"run_id": f"{name}-{seed}", "status": "FINISHED", "params.pairs": key,
         "params.pair_set": name, "params.seed": str(seed), "tags.conaclip.status": "FINISHED",
         "tags.conaclip.baseline": str(name == "baseline").lower(), "metrics.rsum": 100.0 + seed,
         **extra}
        for name, key, seed, extra in [
            ("baseline", BASE, 0, {"metrics.weight_intra_ts_infonce": 1.0}),
            ("kl", f"{BASE},inter_ss:kl*auto", 0,
             {"metrics.weight_inter_ss_kl": 0.25, "metrics.temperature_inter_ss_kl": 0.5}),
            ("kl", f"{BASE},inter_ss:kl*auto", 1,
             {"metrics.weight_inter_ss_kl": 0.75, "metrics.temperature_inter_ss_kl": 0.5}),
            ("sd", f"{BASE},intra_ts:sd", 0, {}),
        ]
    ]  # fmt: skip
    result = selection_table(pd.DataFrame(rows)).set_index("pair_set")
    assert result.loc["kl", "added"] == "inter_ss:kl*auto"
    assert result.loc["kl", "used_weight"] == 0.5 and result.loc["kl", "used_temperature"] == 0.5
    assert np.isnan(result.loc["sd", "used_weight"])  # not logged
    assert np.isnan(result.loc["baseline", "used_weight"])  # not a single addition
    md = format_table(result.reset_index())
    assert "| kl | `inter_ss:kl*auto` | 0.5 | 0.5 | 2 |" in md


def test_table_by_another_metric(runs):
    by_r1 = selection_table(runs, metric="t2i_R1").set_index("pair_set")
    # +intra_ts:sd t2i_R1 = 20, 22, 24 -> 22; baseline 12
    assert by_r1.loc["baseline+intra_ts:sd", "delta_t2i_R1"] == 10.0
    assert by_r1.attrs["metric"] == "t2i_R1"
    with pytest.raises(InputError, match=r"--metric recall: no run logged it; .*'t2i_R1'"):
        selection_table(runs, metric="recall")


def test_formats(table):
    md = format_table(table, "md")
    lines = md.splitlines()
    assert lines[0] == (
        "| pair set | added | weight | T | n | rsum [95% CI seeds] | gain vs baseline "
        "[95% CI seeds] | gain [95% CI seeds + eval set] | eval share | p adj (differs / "
        "within ±6) | verdict |"
    )
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:7]}
    assert rows["**baseline** (baseline)"] == (
        "| **baseline** (baseline) | — |  |  | 3 | 138.00 [108.19, 167.81] | — | — |  |  "
        "| baseline |"
    )
    # +intra_ts:sd gains +60 at every seed: its interval over both noises is the eval set's
    # alone (100% of the variance), +-1.96 sqrt(C) (test_one_test_carries_both_noises_by_hand).
    assert rows["baseline+intra_ts:sd"].startswith(
        "| baseline+intra_ts:sd | `intra_ts:sd` |  |  | 3 | 198.00 [168.19, 227.81] "
        "| +60.00 [+60.00, +60.00] | +60.00 [+"
    )
    assert rows["baseline+intra_ts:sd"].endswith(" | 100% | <0.001 / 1.000 | **better** |")
    assert (
        "| 2 (2/3 FINISHED, 1 FAILED) | 156.00 [79.76, 232.24] | +24.00 [+24.00, +24.00] |"
        in (rows["baseline+inter_ts:sym_kl"])
    )
    assert "| 150.00 [0.95, 299.05] | +12.00 [-107.24, +131.24] |" in rows["baseline+inter_ss:kl"]
    assert rows["baseline+inter_ss:kl"].endswith("| open (not decided yet) |")
    assert rows["baseline+intra_ss:sd"].startswith(
        "| baseline+intra_ss:sd | `intra_ss:sd` |  |  | 1 | 114.00 (n=1) | -12.00 (n=1) | -12.00 |"
    )
    assert rows["baseline+intra_ss:sd"].endswith(
        " |  | — / — | open (one seed: training noise untested) |"
    )
    assert "± 0.00" not in md
    notes = lines[8:]
    assert len(notes) == 3
    assert notes[0].startswith("CI seeds: Student t") and "data order" in notes[0]
    assert "2000 resamples of the eval set's images (100 images, 100 captions" in notes[1]
    assert "Holm with Shaffer's restriction (family-wise)" in notes[2]
    assert "one family of the 4 non-baseline rows" in notes[2]
    assert "fixed grid: one look at each cell's seeds" in notes[2]
    assert "equivalent (within ±6, not shown to differ)" in notes[2]
    back = pd.read_csv(io.StringIO(format_table(table, "csv")))
    assert back["rsum_mean"].tolist() == pytest.approx([138, 198, 156, 150, 114])
    assert json.loads(back["rsum_by_seed"][0]) == {"0": 126.0, "1": 138.0, "2": 150.0}
    assert {"t2i_R1_ci_low", "gain_ci_high", "p_diff_adj", "verdict"} <= set(back.columns)
    assert "rsum_boot_by_seed" not in back.columns
    records = json.loads(format_table(table, "json"))
    assert records[4]["pair_set"] == "baseline+intra_ss:sd" and records[4]["delta_rsum"] == -24
    assert records[4]["rsum_std"] is None and records[1]["verdict"] == "better"
    with pytest.raises(InputError, match="--format html: expected one of md, csv, json"):
        format_table(table, "html")


def test_heatmap_draws_the_hand_computed_grid(table, tmp_path):
    grid = heatmap(table, tmp_path / "h" / "heatmap.png")
    assert list(grid.values.index) == list(LEARNING_TYPES)
    assert list(grid.values.columns) == list(STRATEGIES)
    # values: the paired gains (24 for +inter_ts:sym_kl, not the unpaired delta 18);
    # "*" on the two "better" cells; second line the 95% interval over seeds, or n=1.
    expected = {
        ("intra_ts", "infonce"): (0.0, "base"),
        ("intra_ts", "sd"): (60.0, "+60.00*\n[+60.0, +60.0]"),
        ("inter_ts", "sym_kl"): (24.0, "+24.00*\n[+24.0, +24.0]"),
        ("inter_ss", "kl"): (12.0, "+12.00\n[-107.2, +131.2]"),
        ("intra_ss", "sd"): (-12.0, "-12.00\nn=1"),
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
    marked = {
        (lt, st) for lt in LEARNING_TYPES for st in STRATEGIES if grid.significant.loc[lt, st]
    }
    assert marked == {("intra_ts", "sd"), ("inter_ts", "sym_kl")}
    # |values| 60, 24, 12, 12: 60 > 2 x 24, so the scale spans ±24 and 60 saturates.
    assert grid.halfrange == 24.0
    with Image.open(tmp_path / "h" / "heatmap.png") as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_color_halfrange_ignores_one_outlier():
    # The README's demo table: one collapsed trial (-84.26) next to gains of a few points.
    assert color_halfrange(np.array([0.0, 4.02, 2.86, 0.32, -84.26])) == 4.02
    assert color_halfrange(np.array([3.0, -2.5, 1.0, np.nan])) == 3.0  # no outlier
    assert color_halfrange(np.array([5.0, 10.0])) == 10.0  # 10 = 2 x 5: not beyond
    assert color_halfrange(np.array([7.0, np.nan, 0.0])) == 7.0  # one value only
    assert color_halfrange(np.array([np.nan, 0.0])) == 1.0


def test_heatmap_prefers_the_auto_weighted_variant():
    rows = [
        {"run_id": f"{name}-0", "status": "FINISHED", "params.pairs": key,
         "params.pair_set": name, "params.seed": "0", "tags.conaclip.status": "FINISHED",
         "tags.conaclip.baseline": str(name == "baseline").lower(), "metrics.rsum": rsum}
        for name, key, rsum in [
            ("baseline", BASE, 100.0),
            ("kl-heavy", f"{BASE},inter_ss:kl*4", 130.0),
            ("kl-auto", f"{BASE},inter_ss:kl*auto", 103.0),
            ("sd-cold", f"{BASE},intra_ts:sd@0.05", 90.0),
        ]
    ]  # fmt: skip
    grid = heatmap_grid(selection_table(pd.DataFrame(rows)))
    assert grid.labels.loc["inter_ss", "kl"] == "+3.00\nn=1"  # auto counts as the default
    assert grid.values.loc["intra_ts", "sd"] == -10.0  # the only variant
    assert not grid.significant.to_numpy().any()


def test_heatmap_needs_a_baseline(runs):
    untagged = runs.drop(columns=["tags.conaclip.baseline"])
    result = selection_table(untagged)
    assert result.attrs["baseline"] is None and result["delta_rsum"].isna().all()
    with pytest.raises(InputError, match=r"no run is tagged conaclip\.baseline=true"):
        heatmap_grid(result)


def test_reports_and_artifacts_share_one_folder_name(tmp_path):
    assert tracking.safe_name("sa3 / grid: 3 seeds") == "sa3_grid_3_seeds"
    assert tracking.safe_name("demo-1.2_x") == "demo-1.2_x"
    assert tracking.safe_name("///") == "experiment"
    name = "my ablation/1"
    assert reports.report_dir(tmp_path, name) == tmp_path / "reports" / "my_ablation_1"


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
    assert "rsum: 198.00 [168.19, 227.81]" in out
    assert "gain vs baseline (paired by seed): +60.00 rsum [95% CI +" in out
    assert "over seeds and eval set; 3 seeds]" in out
    assert "verdict: better (adjusted p " in out and "(differs)" in out
    # The other better row, +inter_ts:sym_kl (+24), trails it by 36 on both shared seeds.
    assert "it is ahead of the other 1 better row by the same test" in out
    recipe = tmp_path / "reports" / "ablation-a" / "recipe.yaml"
    # inter_ss:kl's gain (-36, 12, 60 by seed) is open and intra_ss:sd has one seed: left out.
    (combined,) = pair_sets_from_yaml(recipe)
    assert combined.key() == "intra_ts:infonce,intra_ts:sd,inter_ts:sym_kl"
    settings = yaml.safe_load(recipe.read_text())
    assert settings["student"] == "conaclip-student-xs" and settings["steps"] == FINAL_STEP
    assert recipe.read_text() in out


@pytest.mark.integration
def test_best_cli_without_significance_says_so(store, tmp_path, capsys):
    # At --alpha 1e-15 not even +intra_ts:sd's gain of 60 on 100 images is decided.
    assert _cli("best", "--tracking-uri", store, "--out", str(tmp_path), "--alpha", "1e-15") == 0
    out = capsys.readouterr().out
    assert out.startswith("best pair set by rsum: none is significantly better than the baseline\n")
    assert (
        "No significant winner: the leading candidate is baseline+intra_ts:sd: +60.00 rsum" in out
    )
    assert "neither below 1e-15 (4 open)" in out
    assert "open: baseline+inter_ss:kl (3 seeds, gain +12.00): " in out
    assert "leading candidate: baseline+intra_ts:sd" in out
    assert "combined recipe: the baseline alone (intra_ts:infonce)" in out
    (combined,) = pair_sets_from_yaml(tmp_path / "reports" / "ablation-a" / "recipe.yaml")
    assert combined.key() == BASE


@pytest.mark.integration
def test_table_cli_margin_is_in_the_table_and_on_the_experiment(store, tmp_path, capsys):
    assert _cli("table", "--tracking-uri", store, "--out", str(tmp_path), "--margin", "100") == 0
    out = capsys.readouterr().out
    assert "p adj (differs / within ±100)" in out
    found = tracking.find_experiment(store, "ablation-a")
    assert found.tags[tracking.MARGIN_TAG] == "100.0"
    summary = tracking.client(store).get_run(tracking.summary_run_id(store, "ablation-a"))
    assert summary.data.tags[tracking.MARGIN_TAG] == "100.0"
    assert _cli("table", "--tracking-uri", store, "--out", str(tmp_path)) == 0
    assert "within ±6)" in capsys.readouterr().out  # the default again, recorded again
    assert tracking.find_experiment(store, "ablation-a").tags[tracking.MARGIN_TAG] == "6.0"


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


def test_verify_repeats_the_baselines_seeds(table, runs):
    assert reports.seeds_of_baseline(table) == [0, 1, 2]
    failed = runs.assign(**{"tags.conaclip.status": "FAILED", "status": "FAILED"})
    with pytest.raises(InputError, match="best --verify: no finished baseline run with a seed"):
        reports.seeds_of_baseline(selection_table(failed))


def test_verify_runs_the_recipe_in_the_setting_the_runs_share(table, runs, tmp_path):
    params = {"params.student": "conaclip-student-xs", "params.batch_size": "16",
              "params.teacher_checkpoint": "", "params.num_workers": "2"}  # fmt: skip
    shared = runs.assign(**params)
    shared.attrs = {"experiment": "ablation-a", "tracking_uri": "sqlite:///unused.db"}
    recipe = PairSet.parse(f"{BASE},intra_ts:sd", name="combined_recipe")
    spec = reports.verification_spec(reports.Selection(shared, table), recipe, tmp_path)
    assert spec.name == "ablation-a-verify" and spec.experiment_name == "ablation-a"
    assert spec.seeds == [0, 1, 2] and spec.pair_keys() == {"combined_recipe": recipe.key()}
    assert (spec.run.student, spec.run.steps, spec.run.batch_size) == (
        "conaclip-student-xs", FINAL_STEP, 16
    )  # fmt: skip
    assert spec.run.teacher_checkpoint is None and spec.scaling.num_workers == 2
    split = shared.assign(**{"params.batch_size": ["16"] + ["32"] * (len(shared) - 1)})
    with pytest.raises(InputError, match="do not share one batch_size param"):
        reports.verification_spec(reports.Selection(split, table), recipe, tmp_path)


@pytest.mark.integration
def test_a_grid_record_gives_the_same_table_as_its_store(store, tmp_path, capsys):
    from orchestrator import grid_record

    folder = tmp_path / "record"
    assert _cli("table", "--tracking-uri", store, "--out", str(tmp_path), "--record",
                str(folder)) == 0  # fmt: skip
    from_store = capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["grid.json", "ranks.npz", "runs.csv"]
    runs, ranks = grid_record.read_record(folder)
    original = tracking.runs_frame(store, "ablation-a")
    assert len(runs) == len(original) and set(ranks) == set(load_ranks(store, original))
    # Ranks are kept up to 10: every recall at K <= 10 and every bootstrap column agrees.
    pd.testing.assert_frame_equal(
        selection_table(runs, ranks=ranks).drop(columns=["rsum_boot_by_seed"]),
        selection_table(original, ranks=load_ranks(store, original)).drop(
            columns=["rsum_boot_by_seed"]
        ),
        check_dtype=False,
    )
    out = tmp_path / "elsewhere"
    assert _cli("table", "--from", str(folder), "--out", str(out)) == 0
    assert capsys.readouterr().out == from_store
    assert _cli("best", "--from", str(folder), "--out", str(out)) == 0
    assert "best pair set by rsum: baseline+intra_ts:sd" in capsys.readouterr().out
    with pytest.raises(InputError, match=r"no runs.csv; expected a grid record"):
        _cli("table", "--from", str(tmp_path / "nothing"))
