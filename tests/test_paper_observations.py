"""``orchestrator.paper_observations`` on a hand-made grid in runs_frame's column layout."""

from __future__ import annotations

import pandas as pd
import pytest
from scipy import stats as scipy_stats

from orchestrator import paper_observations as observations
from trainers.errors import InputError


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
