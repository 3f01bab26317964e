"""Seed racing: the decision on hand-built tables, the loop replayed on hand-built runs through
the real selection table, the replay benchmark on a real SQLite MLflow store, and
`conaclip ablate --race` end to end on a real local Ray cluster (then resumed: no new trial)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from test_ablation import data_flags  # the same tiny data and teacher flags

from orchestrator import race
from orchestrator.cli import main
from trainers.errors import InputError

NAN = math.nan
ROOT = Path(__file__).resolve().parents[1]


def row(name, mean, verdict="open", *, baseline=False, seeds=2, gain=NAN, low=NAN, high=NAN,
        p_diff=NAN, p_equiv=NAN):  # fmt: skip
    """One table row with the columns the race reads (selection_table's contract)."""
    return {
        "pair_set": name, "pairs": name, "is_baseline": baseline, "seeds": seeds,
        "rsum_mean": mean, "gain_n": pd.NA if baseline else seeds, "gain_mean": gain,
        "gain_low": low, "gain_high": high, "p_diff_adj": p_diff, "p_equiv_adj": p_equiv,
        "verdict": "baseline" if baseline else verdict,
    }  # fmt: skip


def table(*rows):
    return pd.DataFrame(list(rows))


BASE = row("base", 90.0, baseline=True)


# ------------------------------------------------------------------------------ decide
def test_decided_cells_leave_with_their_verdict_and_open_ones_race_on():
    t = table(
        BASE,
        row("a", 91.0),
        row("w", 70.0, "worse", gain=-20.0, low=-22.5, high=-17.5, p_diff=0.012),
        row("g", 99.0, "better", gain=9.0, low=4.0, high=14.0, p_diff=0.003),
        row("e", 90.5, "equivalent", gain=0.5, low=-2.0, high=3.0, p_diff=1.0, p_equiv=0.01),
    )
    step = race.decide(t, ["a", "w", "g", "e"], seeds=2, max_seeds=5)
    assert step.kept == ("a",)
    assert step.dropped == {
        "w": "worse than the baseline (gain -20.00, 95% CI -22.50..-17.50, adjusted p 0.012)",
        "g": "better than the baseline (gain +9.00, 95% CI +4.00..+14.00, adjusted p 0.003)",
        "e": "equivalent to the baseline (gain +0.50, 95% CI -2.00..+3.00, adjusted p 0.01)",
    }
    assert step.leader == "g"
    assert (step.stop, step.next_seeds, step.reason) == (False, 3, "1 cell(s) still open")
    assert race.round_plan("base", step.kept, step.next_seeds) == [
        ("base", 0), ("a", 0), ("base", 1), ("a", 1), ("base", 2), ("a", 2)
    ]  # fmt: skip


def test_a_worse_cell_cannot_lead_and_the_baseline_can():
    t = table(BASE, row("x", 95.0, "worse", p_diff=0.01), row("a", 85.0))
    step = race.decide(t, ["x", "a"], seeds=3, max_seeds=5)
    assert step.leader == "base" and list(step.dropped) == ["x"] and step.kept == ("a",)


def test_stops_when_every_cell_is_decided_or_at_max_seeds():
    done = table(BASE, row("a", 99.0, "better", p_diff=0.001), row("b", 80.0, "worse"))
    step = race.decide(done, ["a", "b"], seeds=2, max_seeds=5)
    assert step.stop and step.kept == () and step.reason == "settled: every cell is decided"
    assert step.next_seeds == 2
    still = table(BASE, row("a", 99.0), row("b", 80.0, "worse"))
    step = race.decide(still, ["a", "b"], seeds=5, max_seeds=5)
    assert step.stop and step.kept == ("a",)
    assert step.reason == "reached --max-seeds 5 with 1 cell(s) still open"
    # A cell without a finished run yet (not in the table) is open: it races on.
    assert race.decide(table(BASE), ["new"], seeds=2, max_seeds=5).kept == ("new",)


def grid_runs(values: dict[str, list[float]], baseline: str = "base", status=None, first=0):
    """A runs_frame-shaped grid: one FINISHED run per (pair set, seed) with that rsum, seeds
    counting up from ``first``."""
    keys = {baseline: "intra_ts:infonce", "a": "intra_ts:infonce,intra_ts:sd",
            "b": "intra_ts:infonce,inter_ss:kl", "c": "intra_ts:infonce,intra_ss:sd",
            "d": "intra_ts:infonce,inter_ts:kl"}  # fmt: skip
    rows = []
    for name, series in values.items():
        for seed, value in enumerate(series, first):
            rows.append({
                "run_id": f"{name}-{seed}", "status": "FINISHED",
                "params.pair_set": name, "params.pairs": keys[name], "params.seed": str(seed),
                "params.steps": "10",
                "tags.conaclip.status": (status or {}).get((name, seed), "FINISHED"),
                "tags.conaclip.baseline": str(name == baseline).lower(),
                "metrics.rsum": float(value),
            })  # fmt: skip
    return pd.DataFrame(rows)


def test_finished_trials_reads_the_status_tag_and_visible_runs_the_limits():
    runs = grid_runs({"base": [1, 2, 3], "a": [4, 5, 6]}, status={("a", 1): "FAILED"})
    assert race.finished_trials(runs) == {("base", 0), ("base", 1), ("base", 2), ("a", 0),
                                          ("a", 2)}  # fmt: skip
    visible = race.visible_runs(runs, {"base": 2, "a": 1})
    assert list(visible["run_id"]) == ["base-0", "base-1", "a-0"]
    assert race.finished_trials(pd.DataFrame(columns=["run_id", "status"])) == set()


def test_check_ledger_refuses_runs_made_with_other_settings():
    runs = grid_runs({"base": [1], "a": [2]})
    keys = {"base": "intra_ts:infonce", "a": "intra_ts:infonce,intra_ts:sd"}
    race.check_ledger(runs, keys, steps=10)
    with pytest.raises(
        InputError,
        match=r"run a-0 \(a seed 0\) has pairs intra_ts:infonce,intra_ts:sd and 10 steps",
    ):
        race.check_ledger(runs, {**keys, "a": "intra_ts:infonce,inter_ss:kl"}, steps=10)
    with pytest.raises(InputError, match="this race intra_ts:infonce and 20"):
        race.check_ledger(runs, keys, steps=20)


GRID = {"base": [90, 91, 92], "a": [95, 96, 97], "b": [80, 81, 82], "c": [93, 97, 90]}


def ranked_grid(xs: dict[str, list[int]], first: int = 0):
    """(runs, ranks_of) of a grid whose run (name, seed) has t2i = i2t recalls (x, x+10, x+20)
    for x = ``xs[name][seed]``: rsum 6x + 60, with eval ranks on 100 images that give exactly
    it (a larger x hits a superset of a smaller one's images)."""
    from test_table import ranks_for

    runs = grid_runs({name: [6 * x + 60 for x in series] for name, series in xs.items()},
                     first=first)  # fmt: skip
    ranks = {f"{name}-{seed}": ranks_for(x, x) for name, series in xs.items()
             for seed, x in enumerate(series, first)}  # fmt: skip

    def ranks_of(visible):
        return {run_id: ranks[run_id] for run_id in visible["run_id"]}

    return runs, ranks_of


# a gains +60 at every seed, b -60, c is the baseline's own numbers (identical runs), d swings
# +90 / -90: a, b and c are decided at the first look (no seed spread, so the normal test with
# the eval set's variance; c's gain is exactly 0 everywhere), d never is.
RACE_XS = {"base": [20] * 4, "a": [30] * 4, "b": [10] * 4, "c": [20] * 4, "d": [35, 5, 35, 5]}


def test_a_race_decides_what_it_can_at_each_look_and_reports_the_rest_open():
    runs, ranks_of = ranked_grid(RACE_XS)
    lines: list[str] = []
    result = race.race_loop("base", ["a", "b", "c", "d"], 2, 4, lambda: runs, None, steps=10,
                            ranks=ranks_of, say=lines.append)  # fmt: skip
    first, second, third = result.rounds
    assert set(first.step.dropped) == {"a", "b", "c"} and first.step.kept == ("d",)
    assert first.step.dropped["c"].startswith("equivalent to the baseline (gain +0.00")
    assert second.planned[-2:] == [("base", 2), ("d", 2)] and second.step.kept == ("d",)
    assert third.step.stop
    assert third.step.reason == "reached --max-seeds 4 with 1 cell(s) still open"
    # 5 cells x 2 seeds, then seeds 2 and 3 of the baseline and d: 14 of the grid's 20.
    assert len(result.asked) == 14 and (result.spent_steps, result.full_steps) == (140, 200)
    assert result.verdict == race.RaceVerdict("a", "a", ("a",), ("b",), ("c",), ("d",))
    assert lines[0].startswith(
        "race round 1: 10 trials (all already in MLflow), seeds 0..1 per cell; active (1/4): d; "
        "dropped: a (better than the baseline"
    )
    assert race.verdict_lines(result)[0] == (
        "race verdict (rsum, 3 round(s), up to 4 seeds): winner a; better: a; worse: b; "
        "equivalent: c; open: d"
    )
    assert race.verdict_lines(result)[1] == (
        "race spent 14 trials = 140 trial-steps vs 200 for the full grid (5 pair sets x 4 "
        "seeds): 70%"
    )


def test_the_race_table_tests_each_cell_at_the_looks_it_reached():
    from orchestrator.sequential import Design

    runs, ranks_of = ranked_grid(RACE_XS)
    # The race's ledger: a, b, c at seeds 0..1, the baseline and d at 0..3.
    limits = {"base": 4, "a": 2, "b": 2, "c": 2, "d": 4}
    visible = race.visible_runs(runs, limits)
    design = Design.race(2, 4)
    rows = race.race_table(visible, "rsum", ranks_of(visible), design).set_index("pair_set")
    assert list(rows.loc[["a", "b", "c", "d"], "looks"]) == [1, 1, 1, 3]
    assert list(rows.loc[["a", "b", "c", "d"], "verdict"]) == [
        "better", "worse", "equivalent", "open"
    ]  # fmt: skip
    # d's sequential p over its three looks, recomputed: its paired gains and their resampled
    # gains (the table's draw) at 2, 3 and 4 seeds, each look's one-sided p-values, and the
    # design's inversion of them.
    from test_table import ranks_for

    from orchestrator import stats
    from orchestrator.gain_test import paired_gain_test
    from orchestrator.verdicts import LookP, sequential_p

    draw = stats.QueryBootstrap(stats.bootstrap_indices(100, 2000, 0))

    def boot(x):
        return draw.metric(ranks_for(x, x), "rsum")

    gains = [6.0 * (x - 20) for x in RACE_XS["d"]]
    resampled = [boot(x) - boot(20) for x in RACE_XS["d"]]
    looks = [LookP.of(paired_gain_test(gains[:n], resampled[:n]), 6.0) for n in (2, 3, 4)]
    p_diff, p_equiv = sequential_p(looks, design)
    assert rows.loc["d", "p_diff_seq"] == pytest.approx(p_diff)
    assert rows.loc["d", "p_equiv_seq"] == pytest.approx(p_equiv)
    assert rows.loc["d", "p_diff"] == pytest.approx(2 * min(looks[-1].above, looks[-1].below))
    assert rows.attrs["design"] == "looks at 2,3,4 seeds, obf spending"
    # As a fixed grid (one look at each cell's own seeds) the same runs read the same way.
    fixed = race.race_table(visible, "rsum", ranks_of(visible)).set_index("pair_set")
    assert list(fixed.loc[["a", "b", "c"], "verdict"]) == ["better", "worse", "equivalent"]


def test_a_race_from_a_first_seed_reads_only_its_own_seeds():
    # Two draws of one grid in one experiment: seeds 0..3 as RACE_XS, seeds 4..7 with a and b
    # swapped. A race from seed 4 sees only the second draw.
    second = {**RACE_XS, "a": RACE_XS["b"], "b": RACE_XS["a"]}
    runs0, ranks0 = ranked_grid(RACE_XS)
    runs4, ranks4 = ranked_grid(second, first=4)
    runs = pd.concat([runs0, runs4], ignore_index=True)

    def ranks_of(visible):
        return {**ranks0(visible[visible["run_id"].isin(runs0["run_id"])]),
                **ranks4(visible[visible["run_id"].isin(runs4["run_id"])])}  # fmt: skip

    visible = race.visible_runs(runs, {"base": 2, "a": 1}, first_seed=4)
    assert list(visible["run_id"]) == ["base-4", "base-5", "a-4"]
    assert race.round_plan("base", ["a"], 2, 4) == [("base", 4), ("a", 4), ("base", 5), ("a", 5)]
    result = race.race_loop("base", ["a", "b", "c", "d"], 2, 4, lambda: runs, None, steps=10,
                            ranks=ranks_of, say=lambda _: None, first_seed=4)  # fmt: skip
    assert {seed for _, seed in result.asked} == {4, 5, 6, 7}
    assert result.verdict.better == ("b",) and result.verdict.worse == ("a",)
    with pytest.raises(InputError, match="no FINISHED run of base seed 8"):
        race.race_loop("base", ["d"], 2, 4, lambda: runs, None, say=lambda _: None, first_seed=5)


def test_race_loop_launches_only_what_the_ledger_lacks():
    ledger = grid_runs({"base": [90, 91], "a": [95, 96], "b": [80, 81], "c": [93, 97]})
    full = grid_runs(GRID)
    calls: list[tuple[int, list]] = []

    def launch(number, trials):
        calls.append((number, trials))
        nonlocal ledger
        ledger = full  # the launched trials now have their runs
        return []

    result = race.race_loop("base", ["a", "b", "c"], 2, 3, lambda: ledger, launch,
                            say=lambda _: None)  # fmt: skip
    # No eval ranks: nothing is decided, so round 2 runs seed 2 of every cell and the baseline.
    assert calls == [(2, [("base", 2), ("a", 2), ("b", 2), ("c", 2)])]
    assert result.rounds[0].launched == [] and result.rounds[1].launched == calls[0][1]
    assert result.verdict.open == ("a", "c", "b")  # table order: by mean


def test_race_loop_stops_undecided_when_a_round_is_interrupted():
    from orchestrator.ablation import TrialOutcome

    ledger = grid_runs({"base": [90, 91], "a": [95, 96], "b": [80, 81], "c": [93, 97]})
    said: list[str] = []
    calls: list[int] = []

    def launch(number, trials):  # Ctrl-C during the round: Tune stopped every trial
        calls.append(number)
        return [TrialOutcome(name, seed, race.INTERRUPTED, "", None) for name, seed in trials]

    result = race.race_loop("base", ["a", "b", "c"], 2, 3, lambda: ledger, launch,
                            say=said.append)  # fmt: skip
    # Round 1 is decided from the ledger; round 2's four trials were cut short, so nothing
    # after it runs and no verdict is drawn from seeds that happened to finish.
    assert calls == [2] and len(result.rounds) == 1
    assert result.interrupted and result.verdict is None
    assert said[-1] == (
        "race round 2: interrupted with 4 of its 4 trials unfinished; no cell is decided on a "
        "partial round"
    )
    assert result.as_dict()["interrupted"] is True


def test_replay_needs_every_run_the_race_asks_for():
    runs = grid_runs({"base": [90, 91, 92], "a": [95, 96], "b": [80, 81, 82], "c": [93, 97, 90]})
    with pytest.raises(InputError, match="no FINISHED run of a seed 2: not a full grid"):
        race.race_loop("base", ["a", "b", "c"], 2, 3, lambda: runs, None, say=lambda _: None)


def test_replay_compares_the_race_with_the_full_grid():
    from orchestrator import race_replay

    runs, ranks_of = ranked_grid(RACE_XS)
    report = race_replay.replay(runs, 2, 4, ranks=ranks_of, say=lambda _: None)
    assert (report["trials"], report["spent_steps"], report["full_steps"]) == (14, 140, 200)
    assert report["grid_verdict"] == report["verdict"]
    assert report["same"] == {"winner": True, "better": True, "worse": True, "equivalent": True}
    assert race_replay.markdown_row(report) == (
        "| None | 2..4 | 14 | 140 | 200 | 70% | 1 / 1 / 1 / 1 | 1 / 1 / 1 / 1 | yes | yes | yes |"
    )
    # An earlier race's ledger, not a grid: the race alone is reported.
    ledger = runs[~runs["run_id"].isin(["a-3", "b-3", "c-3"])].reset_index(drop=True)
    lines: list[str] = []
    alone = race_replay.replay(ledger, 2, 4, ranks=ranks_of, say=lines.append)
    assert lines[0] == ("race_replay: not a full grid at 4 seeds: no FINISHED run of a seed 3; "
                        "the race is replayed alone")  # fmt: skip
    assert alone["grid_verdict"] is None and alone["same"] is None and alone["trials"] == 14


def test_replay_command_on_a_real_sqlite_store(tmp_path, capsys):
    from test_table import ranks_for

    from orchestrator import tracking

    uri = tracking.default_tracking_uri(tmp_path)
    experiment = tracking.get_or_create_experiment(uri, "grid")
    client = tracking.client(uri)
    runs, _ = ranked_grid(RACE_XS)
    for record in runs.to_dict("records"):
        run = client.create_run(experiment, tags={
            "conaclip.ablation_id": "grid", "conaclip.status": "FINISHED",
            "conaclip.baseline": record["tags.conaclip.baseline"]})  # fmt: skip
        for key in ("pair_set", "pairs", "seed", "steps"):
            client.log_param(run.info.run_id, key, record[f"params.{key}"])
        client.log_metric(run.info.run_id, "rsum", record["metrics.rsum"], step=10)
        x = RACE_XS[record["params.pair_set"]][int(record["params.seed"])]
        folder = tmp_path / "ranks" / run.info.run_id
        folder.mkdir(parents=True)
        import numpy as np

        np.savez(folder / tracking.EVAL_RANKS_ARTIFACT, **ranks_for(x, x))
        client.log_artifact(run.info.run_id, str(folder / tracking.EVAL_RANKS_ARTIFACT))
        client.set_terminated(run.info.run_id, "FINISHED")
    # `conaclip best --verify` adds its recipe's runs to the grid's experiment: not a cell.
    for seed in range(2):
        run = client.create_run(experiment, tags={
            "conaclip.ablation_id": "grid", "conaclip.status": "FINISHED",
            "conaclip.baseline": "false", "conaclip.preset": "verify"})  # fmt: skip
        for key, value in (("pair_set", "combined_recipe"),
                           ("pairs", "intra_ts:infonce,intra_ts:sd,inter_ss:kl"), ("seed", seed),
                           ("steps", 10)):  # fmt: skip
            client.log_param(run.info.run_id, key, value)
        client.log_metric(run.info.run_id, "rsum", 200.0, step=10)
        client.set_terminated(run.info.run_id, "FINISHED")
    out = tmp_path / "replay.json"
    code = main(["replay", "--tracking-uri", uri, "--experiment", "grid", "--start-seeds", "2",
                 "--max-seeds", "4", "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    import json

    report = json.loads(out.read_text())
    assert (report["trials"], report["spent_steps"], report["full_steps"]) == (14, 140, 200)
    assert report["verdict"]["equivalent"] == ["c"] and report["grid_verdict"] == report["verdict"]
    assert printed.out.splitlines()[-1] == (
        "| grid | 2..4 | 14 | 140 | 200 | 70% | 1 / 1 / 1 / 1 | 1 / 1 / 1 / 1 | yes | yes | yes |"
    )


def test_replay_command_on_the_recorded_demo_grid(tmp_path, capsys):
    record = ROOT / "docs" / "results" / "demo_grid"
    # The demo's race stopped after its first round: one look at its 2 seeds replays it...
    out = tmp_path / "replay.json"
    assert main(["replay", "--from", str(record), "--max-seeds", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["trials"] == 8 and all(report["same"].values())
    assert report["grid_verdict"] == report["verdict"]
    assert len(report["rounds"]) == 1 and report["rounds"][0]["seeds"] == 2
    capsys.readouterr()
    # ...and a race that would go on asks for a seed the record lacks: one line, exit 2.
    assert main(["replay", "--from", str(record), "--max-seeds", "6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("conaclip: error: replay: no FINISHED run of baseline")
    assert err[-1].endswith("seed 2: not a full grid")


def test_a_race_records_its_design_and_refuses_another_on_resume(tmp_path):
    from orchestrator import tracking
    from orchestrator.ablation_spec import RaceSettings

    uri = tracking.default_tracking_uri(tmp_path)
    tracking.get_or_create_experiment(uri, "r")
    settings = RaceSettings(start_seeds=2, max_seeds=5)
    tracking.record_race(uri, "r", settings)
    tracking.record_race(uri, "r", settings)  # the same again: fine
    runs = tracking.runs_frame(uri, "r")
    assert tracking.race_of(runs) == {
        "start_seeds": 2, "max_seeds": 5, "first_seed": 0, "spending": "obf", "margin": 6.0,
        "metric": "rsum",
    }  # fmt: skip
    with pytest.raises(InputError, match=r"planned with max_seeds 5 \(now 8\); its looks"):
        tracking.record_race(uri, "r", RaceSettings(start_seeds=2, max_seeds=8))


# ------------------------------------------------------------------------------ the CLI
def test_race_needs_a_baseline_and_max_seeds_at_least_seeds(capsys):
    # No set is the MoTIS baseline (intra_ts:infonce alone), so there is nothing to pair with.
    no_baseline = "intra_ts:infonce,inter_ss:kl;intra_ts:sd"
    assert main(["ablate", "--pairs", no_baseline, "--race", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("conaclip: error: --race: the pair sets")
    code = main(["ablate", "--preset", "smoke", "--race", "--seeds", "3", "--max-seeds", "2",
                 "--dry-run"])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "conaclip: error: --max-seeds 2 is below --seeds 3: every cell starts with --seeds"
    )
    assert main(["ablate", "--preset", "smoke", "--max-seeds", "4", "--dry-run"]) == 2
    assert "only with --race" in capsys.readouterr().err


def test_race_dry_run_shows_round_one(capsys):
    assert main(["ablate", "--preset", "smoke", "--race", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("race: round 1 runs every pair set at seeds 0..1;")
    assert "up to 5 seeds (at most 15 trials = 90 trial-steps)" in out[0]
    assert out[1] == ("6 trials (3 pair sets, explicit trial list), 6 steps each = 36 "
                      "trial-steps (batch 16 x 1 worker(s))")  # fmt: skip
    assert [line.split()[1:4] for line in out[2:]] == [
        [name, "seed", str(seed)] for seed in (0, 1)
        for name in ("baseline", "baseline+intra_ts:sd", "baseline+inter_ts:sym_kl")
    ]  # fmt: skip


def test_first_seed_numbers_the_seeds_of_a_grid_and_of_a_race(capsys):
    assert main(["ablate", "--preset", "smoke", "--seeds", "2", "--first-seed", "5",
                 "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("6 trials (3 pair sets x 2 seeds)")
    assert [line.split()[2:4] for line in out[1:]] == [["seed", "5"]] * 3 + [["seed", "6"]] * 3
    assert main(["ablate", "--preset", "smoke", "--race", "--first-seed", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("race: round 1 runs every pair set at seeds 5..6;")
    assert [line.split()[3] for line in out[2:]] == ["5"] * 3 + ["6"] * 3
    assert main(["ablate", "--preset", "smoke", "--first-seed", "-1", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        "conaclip: error: --first-seed -1: seeds are 0 or more"
    )


def test_help_explains_race_and_max_seeds(capsys):
    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--race seed racing (needs a baseline)" in text
    assert "--max-seeds MAX_SEEDS --race: no cell runs more seeds than M (default 5" in text


def test_explicit_trial_list_is_what_tune_expands():
    from orchestrator.ablation import AblationSpec, expand_trials
    from trainers.run_config import DistillConfig

    spec = AblationSpec(
        name="x", preset="custom", out_dir="/tmp/x", tracking_uri="sqlite:////tmp/x/m.db",
        pair_sets={"b/ase": [{"pair": "intra_ts:infonce"}],
                   "c": [{"pair": "intra_ts:sd"}]},
        trials=[("c", 3), ("b/ase", 0), ("c", 0)], run=DistillConfig(steps=7),
    )  # fmt: skip
    assert spec.trial_count == 3
    assert [(t["pair_set"], t["seed"]) for t in expand_trials(spec)] == spec.trial_list() == [
        ("c", 3), ("b/ase", 0), ("c", 0)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="trials name pair sets the spec lacks: d"):
        AblationSpec.model_validate({**spec.model_dump(), "trials": [("d", 0)]})


# ------------------------------------------------------------------------------ end to end
@pytest.mark.integration
def test_race_end_to_end_then_resume_launches_nothing(
    tiny_shapes, tiny_teacher, local_ray, tmp_path, capsys
):
    from orchestrator import tracking

    out = tmp_path / "race"
    flags = data_flags(tiny_shapes, tiny_teacher, tmp_path / "home")
    code = main(["ablate", "--preset", "smoke", "--race", "--seeds", "2", "--max-seeds", "3",
                 "--steps", "4", "--eval-every", "2", "--batch-size", "8", "--out", str(out),
                 "--name", "race-e2e", *flags])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    uri = tracking.default_tracking_uri(out)
    runs = tracking.runs_frame(uri, "race-e2e")
    assert set(runs["tags.conaclip.status"]) == {"FINISHED"}
    trials = list(zip(runs["params.pair_set"], runs["params.seed"].astype(int), strict=True))
    assert len(trials) == len(set(trials))  # every (cell, seed) ran once
    seeds_of = {name: {s for n, s in trials if n == name} for name, _ in trials}
    assert seeds_of["baseline"] == set(range(max(map(len, seeds_of.values()))))
    assert all(seeds == set(range(len(seeds))) for seeds in seeds_of.values())
    assert all(2 <= len(seeds) <= 3 for seeds in seeds_of.values())
    assert set(runs["params.steps"]) == {"4"}
    # Round 1 ran seeds 0 and 1 of all three sets; round 2 (if any) only seed 2.
    rounds = dict(zip(trials, runs["tags.conaclip.round"], strict=True))
    assert {t for t, r in rounds.items() if r == "1"} == {
        (n, s) for n in ("baseline", "baseline+intra_ts:sd", "baseline+inter_ts:sym_kl")
        for s in (0, 1)
    }  # fmt: skip
    assert {s for (_, s), r in rounds.items() if r != "1"} <= {2}
    assert set(rounds.values()) <= {"1", "2"}
    round_lines = [line for line in captured.err.splitlines() if line.startswith("race round")]
    assert round_lines[0].startswith("race round 1: 6 trials (6 launched), seeds 0..1 per cell")
    assert len(round_lines) == len(set(rounds.values()))
    assert "race verdict (rsum" in captured.out
    spent = f"race spent {len(trials)} trials = {4 * len(trials)} trial-steps vs 36"
    assert spent in captured.out

    # Again with --resume: every round is replayed from MLflow, no trial is launched.
    tune_runs = sorted(p.name for p in (out / "tune").iterdir() if p.is_dir())
    assert main(["ablate", "--resume", "--out", str(out), "--name", "race-e2e"]) == 0
    again = capsys.readouterr()
    assert len(tracking.runs_frame(uri, "race-e2e")) == len(runs)
    assert sorted(p.name for p in (out / "tune").iterdir() if p.is_dir()) == tune_runs
    replayed = [line for line in again.err.splitlines() if line.startswith("race round")]
    assert len(replayed) == len(round_lines)
    assert all("(all already in MLflow)" in line for line in replayed)
    # The live rounds decided exactly what a replay of their runs decides.
    strip = [line.split(" trials (")[1].split(")", 1)[1] for line in round_lines]
    assert [line.split(" trials (")[1].split(")", 1)[1] for line in replayed] == strip
    assert again.out.splitlines()[-2:] == captured.out.splitlines()[-2:]

    # A trial whose run the ledger holds as FAILED is run again, and only that one: round 1's
    # Tune run is restored (its trials all ended) and the trial runs as round1-retry1.
    failed = runs[(runs["params.pair_set"] == "baseline") & (runs["params.seed"] == "0")]
    client = tracking.client(uri)
    client.set_tag(failed["run_id"].iloc[0], "conaclip.status", "FAILED")
    assert main(["ablate", "--resume", "--out", str(out), "--name", "race-e2e"]) == 0
    third = capsys.readouterr()
    assert "race round 1: 6 trials (1 launched)" in third.err
    assert (out / "tune" / "race-e2e-round1-retry1").is_dir()
    final = tracking.runs_frame(uri, "race-e2e")
    done = final[final["tags.conaclip.status"] == "FINISHED"]
    done_trials = list(zip(done["params.pair_set"], done["params.seed"], strict=True))
    assert len(done_trials) == len(set(done_trials)) >= len(trials)
    assert ("baseline", "0") in done_trials
    new = done[~done["run_id"].isin(runs["run_id"])]
    rerun = new[(new["params.pair_set"] == "baseline") & (new["params.seed"] == "0")]
    assert list(rerun["tags.conaclip.round"]) == ["1"]


def test_margin_and_spending_flags(capsys, tmp_path):
    from orchestrator.ablate_cli import add_ablation_flags, build_spec

    def spec_of(*flags):
        import argparse

        parser = argparse.ArgumentParser()
        add_ablation_flags(parser)
        args = parser.parse_args(["--preset", "smoke", "--out", str(tmp_path), *flags])
        return build_spec(args)[0]

    race_spec = spec_of("--race", "--margin", "3.5", "--spending", "pocock")
    assert (race_spec.race.margin, race_spec.race.spending) == (3.5, "pocock")
    assert race_spec.race.design().looks == (2, 3, 4, 5)
    assert spec_of("--race").race.margin == 6.0  # the default: one point of mean recall
    config = tmp_path / "c.yaml"
    config.write_text("margin: 2.5\n")
    assert spec_of("--race", "--config", str(config)).race.margin == 2.5
    assert main(["ablate", "--preset", "smoke", "--race", "--margin", "0", "--dry-run"]) == 2
    assert "--margin: expected a positive gain in rsum, got 0.0" in capsys.readouterr().err
    assert main(["ablate", "--preset", "smoke", "--spending", "obf", "--dry-run"]) == 2
    assert "--spending: only with --race" in capsys.readouterr().err


def test_a_time_budget_stops_before_a_round_that_would_overrun_it():
    grid = {k: [*v, v[-1]] for k, v in GRID.items()}  # 4 seeds
    full = grid_runs(grid)
    ledger = full[full["params.seed"].astype(int) < 2]
    now = [0.0]

    def launch(number, trials):  # every trial takes 10 s of the race's clock
        nonlocal ledger
        now[0] += 10.0 * len(trials)
        ids = {f"{name}-{seed}" for name, seed in trials}
        ledger = pd.concat([ledger, full[full["run_id"].isin(ids)]], ignore_index=True)
        return []

    # Round 1 is in MLflow already; round 2's 4 trials have no pace to judge by: they run
    # (40 s). Round 3 would take another 40 s at that pace: past a deadline at 60 s.
    lines: list[str] = []
    result = race.race_loop("base", ["a", "b", "c"], 2, 4, lambda: ledger, launch, steps=10,
                            say=lines.append, deadline=60.0, clock=lambda: now[0])  # fmt: skip
    assert len(result.rounds) == 2 and now[0] == 40.0
    assert result.stopped == (
        "time budget: round 3 (4 trials, about 0.7 min at the last round's pace) would end "
        "past it; 3 cell(s) left open"
    )
    assert lines[-1] == f"race: {result.stopped}"
    assert result.verdict.open == ("a", "c", "b") and result.as_dict()["stopped"]
    assert ("a", 3) not in result.asked
