"""``orchestrator.paper_observations`` on a hand-made grid in runs_frame's column layout, and
`conaclip observations` on grid records: that grid's and the recorded demo grid."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats as scipy_stats

from orchestrator import grid_record
from orchestrator import paper_observations as observations
from orchestrator.observations_cli import register
from trainers.errors import InputError

DEMO_GRID = Path(__file__).resolve().parents[1] / "docs" / "results" / "demo_grid"


def _runs() -> pd.DataFrame:
    values = {
        "baseline": [100.0, 90.0, 95.0],
        "baseline+inter_ts:sd": [110.0, 102.0, 104.0],
        "baseline+inter_ts:sym_sd": [108.0, 101.0, 100.0],
        "baseline+inter_ts:kl": [105.0, 95.0, 99.0],
    }

    def run(name: str, seed: int, value: float, status: str = "FINISHED") -> dict:
        added = name.removeprefix("baseline").removeprefix("+")
        return {"run_id": f"{name}-{seed}-{value}", "status": status, "params.pair_set": name,
                "params.pairs": ",".join(["intra_ts:infonce", *([added] if added else [])]),
                "params.seed": str(seed), "tags.conaclip.baseline": str(name == "baseline").lower(),
                "metrics.rsum": value}  # fmt: skip

    rows = [run(name, seed, v) for name, column in values.items() for seed, v in enumerate(column)]
    # A failed run never counts, and a second FINISHED run of (cell, seed) replaces the first.
    rows.insert(0, run("baseline+inter_ts:sd", 0, 1.0))
    rows.append(run("baseline+inter_ts:sym_sd", 2, 500.0, status="FAILED"))
    return pd.DataFrame(rows)


def test_sym_versus_standard_pairs_by_seed():
    by_seed = observations.metric_by_seed(_runs())
    assert by_seed.loc["baseline+inter_ts:sd"].tolist() == [110.0, 102.0, 104.0]
    (row,) = observations.sym_versus_standard(by_seed, "baseline")
    # sd minus sym_sd seed for seed: 2, 1, 4 -> mean 7/3, sample std sqrt(7/3)
    assert row["n"] == 3 and row["mean"] == pytest.approx(7 / 3)
    half = scipy_stats.t.ppf(0.975, 2) * (7 / 3) ** 0.5 / 3**0.5
    assert (row["low"], row["high"]) == pytest.approx((7 / 3 - half, 7 / 3 + half))
    expected_p = scipy_stats.ttest_rel([110, 102, 104], [108, 101, 100]).pvalue
    assert row["p"] == pytest.approx(expected_p) and row["p_holm"] == pytest.approx(expected_p)


def test_loss_spread_is_best_minus_worst_by_mean():
    by_seed = observations.metric_by_seed(_runs())
    (row,) = observations.loss_spread(by_seed, "baseline")
    # means: sd 105.33, sym_sd 103, kl 99.67 -> sd minus kl: 5, 7, 5
    assert row["learning_type"] == "inter_ts"
    assert (row["first"], row["second"]) == ("baseline+inter_ts:sd", "baseline+inter_ts:kl")
    assert row["mean"] == pytest.approx(17 / 3)


def run(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser(prog="conaclip")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["observations", *map(str, argv)])
    return args.handler(args)


def test_observe_finds_the_tagged_baseline_and_names_a_missing_one():
    found = observations.observe(_runs())
    assert found.baseline == "baseline" and found.metric == "rsum"
    by_seed = observations.metric_by_seed(_runs())
    assert found.sym_vs_standard == observations.sym_versus_standard(by_seed, "baseline")
    assert found.loss_spread == observations.loss_spread(by_seed, "baseline")
    with pytest.raises(InputError, match="--baseline motis: no pair set of that name"):
        observations.observe(_runs(), "motis")
    untagged = _runs().assign(**{"tags.conaclip.baseline": "false"})
    with pytest.raises(InputError, match=r"no pair set tagged conaclip\.baseline; name it"):
        observations.observe(untagged)


def test_cli_on_a_record_prints_both_observations_and_writes_their_rows(tmp_path, capsys):
    record = grid_record.write_record(_runs(), {}, tmp_path / "grid")
    out = tmp_path / "observations.json"
    assert run("--from", record, "--json", out) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    # One row under each heading: sd - sym_sd (the only standard/Sym pair), sd - kl.
    assert lines[0].startswith("1. standard minus Sym") and lines[4].startswith("| `inter_ts:sd`")
    assert "`inter_ts:sym_sd` | 3 | +2.33" in lines[4]
    assert lines[6].startswith("2. best minus worst") and lines[10].startswith("| `inter_ts:sd`")
    assert "`inter_ts:kl` | 3 | +5.67" in lines[10]
    assert len(lines) == 11  # two headings, two tables, one row each
    assert printed.err == f"wrote {out}\n"  # both observations had cells: no notes
    expected = observations.observe(_runs()).as_dict()
    written = json.loads(out.read_text())
    assert written.keys() == expected.keys()
    assert written["loss_spread"] == [pytest.approx(row) for row in expected["loss_spread"]]
    assert written["sym_vs_standard"] == [pytest.approx(r) for r in expected["sym_vs_standard"]]


def test_cli_on_the_recorded_demo_grid_names_the_cells_it_lacks(capsys):
    # The demo's cells are one per learning type and no standard/Sym pair: neither observation
    # has cells to compare, and each says which it would need.
    assert run("--from", DEMO_GRID) == 0
    printed = capsys.readouterr()
    assert "| difference | n | mean [95% CI seeds] | p (Holm) |" in printed.out
    assert "`" not in printed.out  # no rows
    assert printed.err.splitlines() == [
        "observation 1: no standard and Sym cell of one teacher-student pair (e.g. "
        "baseline+inter_ts:sd and baseline+inter_ts:sym_sd)",
        "observation 2: no learning type with two cells (e.g. baseline+inter_ts:sd and "
        "baseline+inter_ts:kl)",
    ]


def test_cli_bad_input_is_one_line_naming_what_was_expected(tmp_path):
    with pytest.raises(InputError, match=r"--baseline motis: .* in demo; expected one of base"):
        run("--from", DEMO_GRID, "--baseline", "motis")
    with pytest.raises(InputError, match=r"no runs\.csv; expected a grid record"):
        run("--from", tmp_path)
    with pytest.raises(InputError, match="--metric recall: no run logged it"):
        run("--from", DEMO_GRID, "--metric", "recall")
