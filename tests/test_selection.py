"""The choice on hand-made tables: verdicts, best pair set, combined recipe, greedy step.

Each case is a runs frame in runs_frame()'s layout (one row per run, latest metrics) turned
into a table by selection_table, with eval ranks on 6,000 one-caption images in which a run
with rsum v retrieves exactly 10 v images at rank 0 (each image is worth 0.1 rsum: six
recalls of 100 / 6000). By default the hits are the images 0 .. 10v-1, so a larger v hits a
superset of a smaller one and the eval set's noise is small (a gain of g rsum differs on 10 g
images); ``offset`` moves a cell's hits to other images, so that eval-set noise is large.
The rsum values are picked so the per-seed gains, their means and stds are easy by hand.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from orchestrator.selection import (
    best_pair_set,
    choose,
    combined_recipe,
    common_settings,
    greedy_next,
    recipe_yaml,
    row_difference,
)
from orchestrator.table import selection_table
from search_spaces.presets import PairSet, pair_sets_from_yaml
from trainers.errors import InputError
from trainers.graph import valid_pairs

BASE = "intra_ts:infonce"
N_IMAGES = 6000


def runs_of(*trials: tuple[str, str, list[float | None]], baseline: str = BASE) -> pd.DataFrame:
    """trials: (pair set name, pairs key, rsum per seed; None = a FAILED seed)."""
    rows = []
    for name, key, values in trials:
        for seed, value in enumerate(values):
            status = "FAILED" if value is None else "FINISHED"
            rows.append({
                "run_id": f"{name}-{seed}", "status": status, "params.pairs": key,
                "params.pair_set": name, "params.seed": str(seed), "params.steps": "10",
                "tags.conaclip.status": status,
                "tags.conaclip.baseline": str(key == baseline).lower(),
                "metrics.rsum": float("nan") if value is None else value,
                "metrics.t2i_R1": float("nan") if value is None else value / 6,
            })  # fmt: skip
    return pd.DataFrame(rows)


def ranks_for(rsum: float, offset: int = 0) -> dict[str, np.ndarray]:
    """Ranks with 10 x ``rsum`` hits at rank 0 on the images offset .. (mod 6000)."""
    t2i = np.full(N_IMAGES, 50)
    t2i[(offset + np.arange(round(10 * rsum))) % N_IMAGES] = 0
    return {"t2i_rank": t2i, "i2t_rank": t2i.copy(), "text_to_image": np.arange(N_IMAGES)}


def table_of(*trials, metric: str = "rsum", offsets: dict[str, int] | None = None, **kwargs):
    runs = runs_of(*trials, **{k: v for k, v in kwargs.items() if k == "baseline"})
    offsets = offsets or {}
    ranks = {
        f"{name}-{seed}": ranks_for(value, offsets.get(name, 0))
        for name, _, values in trials
        for seed, value in enumerate(values)
        if value is not None
    }
    settings = {k: v for k, v in kwargs.items() if k != "baseline"}
    return selection_table(runs, metric, ranks=ranks, **settings)


# baseline 100, 102, 104 -> 102 ± 2
BASELINE = ("baseline", BASE, [100.0, 102.0, 104.0])


def test_recipe_keeps_significant_gains_only():
    # Hits nest, so the eval set adds little: the seeds decide. Holm-Shaffer over the 8 rows
    # with a test: +sd (gains 10, 11, 10), +symkl (5, 5.1), +pair2 and peer are far beyond
    # any correction; +fd (-8, -9, -9) too; +kl (-10, 8, 26) and +ssd (4, 8, 12: sd 4 on 2
    # df) are not; +big has one seed.
    table = table_of(
        BASELINE,
        ("+sd", f"{BASE},intra_ts:sd", [110.0, 113.0, 114.0]),  # gains 10, 11, 10: better
        ("+kl", f"{BASE},inter_ss:kl", [90.0, 110.0, 130.0]),  # -10, 8, 26: open
        ("+symkl", f"{BASE},inter_ts:sym_kl", [105.0, 107.1, None]),  # 5, 5.1: better
        ("+ssd", f"{BASE},intra_ss:sd", [104.0, 110.0, 116.0]),  # 4, 8, 12: open
        ("+fd", f"{BASE},inter_ts:fd", [92.0, 93.0, 95.0]),  # -8, -9, -9: worse
        ("+big", f"{BASE},intra_ts:kl", [190.0]),  # one seed: open, however large
        ("+pair2", f"{BASE},intra_ts:fd,inter_ts:sd", [200.0, 203.0, 204.0]),  # not a single
        ("peer", "inter_ss:infonce,inter_ss:kl", [300.0, 302.0, 304.0]),  # lacks the baseline
    )
    rows = table.set_index("pair_set")
    verdicts = dict(zip(table["pair_set"], table["verdict"], strict=True))
    assert verdicts == {
        "baseline": "baseline", "+sd": "better", "+kl": "open", "+symkl": "better",
        "+ssd": "open", "+fd": "worse", "+big": "open", "+pair2": "better", "peer": "better",
    }  # fmt: skip
    # Three seeds give a t-like tail on 2 df: even gains of 10, 11, 10 reach only p ~ 1e-3.
    assert rows.loc["+ssd", "p_diff_adj"] > 0.05 and rows.loc["+sd", "p_diff_adj"] < 0.01
    assert rows.loc["+big", "verdict_note"] == "one seed: training noise untested"
    recipe = combined_recipe(table)
    assert recipe.name == "combined_recipe"
    assert recipe.key() == "intra_ts:infonce,intra_ts:sd,inter_ts:sym_kl"


def test_gain_must_survive_eval_set_noise_too():
    # +sd gains 3, 3.1, 2.9 over seeds, but hits other images than the baseline: per resample
    # the two hit counts (about 1,000 images each) move independently, so the eval set's
    # share of the variance is large and the test over both noises leaves the gain open
    # although the seeds agree.
    table = table_of(
        BASELINE, ("+sd", f"{BASE},intra_ts:sd", [103.0, 105.1, 106.9]), offsets={"+sd": 3000}
    ).set_index("pair_set")
    row = table.loc["+sd"]
    assert row["p_seed"] < 0.01
    assert row["eval_share"] > 0.9 and row["gain_low"] < 0 < row["gain_high"]
    assert row["verdict"] == "open"
    choice = choose(table.reset_index())
    assert choice.winner is None and choice.leading["pair_set"] == "+sd"
    assert "The eval set cannot resolve a gain this size" in choice.reason
    assert "evaluate on more images" in choice.reason


def test_recipe_with_one_seed_is_the_baseline_alone():
    table = table_of(
        ("baseline", BASE, [100.0]),
        ("+sd", f"{BASE},intra_ts:sd", [140.0]),
        ("+kl", f"{BASE},inter_ss:kl", [100.0]),
    )
    assert set(table["verdict"]) == {"baseline", "open"}
    assert combined_recipe(table).key() == BASE


def test_recipe_takes_the_larger_gain_of_a_pair_tried_several_ways():
    table = table_of(
        BASELINE,
        ("kl-light", f"{BASE},inter_ss:kl*0.5", [104.0, 107.0, 108.0]),  # 4, 5, 4
        ("kl-cold", f"{BASE},inter_ss:kl@0.05", [107.0, 110.0, 111.0]),  # 7, 8, 7
        ("kl-auto", f"{BASE},inter_ss:kl*auto", [105.0, 107.0, 110.0]),  # 5, 5, 6
        ("kl", f"{BASE},inter_ss:kl", [101.0, 104.0, 103.0]),  # 1, 2, -1: open
    )
    assert set(table.loc[table["pair_set"] != "kl", "verdict"]) == {"baseline", "better"}
    assert combined_recipe(table).key() == "intra_ts:infonce,inter_ss:kl@0.05"


def test_recipe_needs_a_finished_baseline():
    no_base = table_of(("+sd", f"{BASE},intra_ts:sd", [1.0]), baseline="x")
    with pytest.raises(InputError, match="no finished baseline run"):
        combined_recipe(no_base)
    failed_base = table_of(("baseline", BASE, [None]), ("+sd", f"{BASE},intra_ts:sd", [1.0]))
    with pytest.raises(InputError, match="no finished baseline run"):
        combined_recipe(failed_base)


def test_best_pair_set_is_ahead_of_every_other_better_row():
    table = table_of(
        BASELINE,
        ("+sd", f"{BASE},intra_ts:sd", [110.0, 113.0, 114.0]),  # better, gain 10.33
        ("+ssd", f"{BASE},intra_ss:sd", [104.0, 107.0, 108.0]),  # better, gain 4.33
        ("+kl", f"{BASE},inter_ss:kl", [None, None]),  # nothing finished
        ("+symkl", f"{BASE},inter_ts:sym_kl", [180.0, 90.0, None]),  # mean 135, open
        ("+big", f"{BASE},intra_ts:kl", [300.0]),  # largest mean, one seed
    )
    best = best_pair_set(table)
    assert best["pair_set"] == "+sd" and best["gain_mean"] == pytest.approx(31 / 3)
    choice = choose(table)
    assert choice.winner["pair_set"] == choice.leading["pair_set"] == "+sd"
    assert choice.reason.startswith("+sd gains +10.33 rsum [95% CI +")
    assert "over seeds and eval set; 3 seeds]" in choice.reason
    # +sd - +ssd is 6 on every seed and differs on 60 images: far apart.
    assert choice.reason.endswith(
        "it is ahead of the other 1 better row by the same test on their paired difference (Holm)"
    )
    difference = row_difference(
        table.set_index("pair_set").loc["+sd"], table.set_index("pair_set").loc["+ssd"], "rsum"
    )
    assert difference.n == 3 and difference.mean == pytest.approx(6.0)
    assert difference.seed_var == 0.0 and difference.p_diff < 1e-9
    # +sd - +x per seed: 1, 5, 0.5 (sd 2.47 on 2 df): both better, not told apart.
    close = table_of(
        BASELINE,
        ("+sd", f"{BASE},intra_ts:sd", [110.0, 116.0, 114.0]),
        ("+x", f"{BASE},intra_ss:sd", [109.0, 111.0, 113.5]),
    )
    tie = choose(close)
    assert set(close["verdict"]) == {"baseline", "better"}
    assert tie.winner is None and best_pair_set(close) is None
    assert tie.leading["pair_set"] == "+sd" and tie.rivals == ("+x",)
    assert tie.reason.startswith("no single winner: +sd has the largest gain")
    assert "but is not told apart from +x (adjusted p 0." in tie.reason
    assert combined_recipe(close).key() == f"{BASE},intra_ts:sd,intra_ss:sd"
    by_r1 = table_of(
        BASELINE, ("+sd", f"{BASE},intra_ts:sd", [99.0, 101.0, 103.0]), metric="t2i_R1"
    )
    assert by_r1.attrs["metric"] == "t2i_R1" and by_r1.loc[1, "verdict"] == "worse"
    with pytest.raises(InputError, match=r"--metric mean_recall: not in the table"):
        best_pair_set(table, "mean_recall")
    with pytest.raises(InputError, match=r"--metric t2i_R1: the table's gains and verdicts are"):
        best_pair_set(table, "t2i_R1")
    only_failed = table_of(("baseline", BASE, [None]))
    with pytest.raises(InputError, match="no pair set has a finished run yet"):
        best_pair_set(only_failed)


def test_no_winner_names_the_leader_and_the_seeds_that_would_settle_it():
    # gains 0, 8, 16: mean 8, sd 8 over 3 seeds, open. One comparison (family 1): with the
    # same mean and spread the test over both noises rejects "gain = 0" first at n seeds,
    # where seeds_to_decide finds it (checked against the test itself below).
    from orchestrator.gain_test import GainTest

    table = table_of(BASELINE, ("+sd", f"{BASE},intra_ts:sd", [100.0, 110.0, 120.0]))
    choice = choose(table)
    assert choice.winner is None and best_pair_set(table) is None
    assert choice.leading["pair_set"] == "+sd"
    assert choice.reason.startswith(
        "no significant winner: the leading candidate is +sd: +8.00 rsum [95% CI "
    )
    row = table.set_index("pair_set").loc["+sd"]
    c = row["eval_share"] * row["gain_se"] ** 2
    first = next(n for n in range(2, 31) if GainTest(n, 8.0, 64.0 / n, c).p_diff < 0.05)
    assert GainTest(first - 1, 8.0, 64.0 / (first - 1), c).p_diff >= 0.05
    assert f"about {first} seeds would show that it differs (`--seeds {first}`" in choice.reason
    assert f"`conaclip ablate --race` with `--max-seeds {first}` or more" in choice.reason
    single = choose(table_of(BASELINE, ("+sd", f"{BASE},intra_ts:sd", [110.0])))
    assert "With one seed the gain cannot be told apart from training noise" in single.reason
    assert "would show that it" in single.reason
    # A gain of 0.1 with the baseline's spread: inside the margin after a few seeds.
    tiny = choose(table_of(BASELINE, ("+sd", f"{BASE},intra_ts:sd", [100.1])))
    assert "would show that it is within ±6" in tiny.reason
    losing = choose(table_of(BASELINE, ("+sd", f"{BASE},intra_ts:sd", [90.0, 92.0, 95.0])))
    assert losing.reason == (
        "no pair set gains over the baseline (the largest paired gain is -9.67 rsum, by +sd; "
        "1 worse)"
    )
    same = choose(table_of(BASELINE, ("+sd", f"{BASE},intra_ts:sd", [100.5, 102.0, 104.5])))
    assert "it is within ±6 rsum of the baseline, no practical difference (1 equivalent)" in (
        same.reason
    )
    assert choose(table_of(BASELINE)).reason.startswith("only the baseline has finished runs")


def test_greedy_next_needs_a_paired_gain_over_the_current_set():
    # greedy_candidates adds each pair with the fair-cell weight (*auto).
    current = PairSet.parse(f"{BASE},intra_ts:sd", name="r1")
    table = table_of(
        BASELINE,
        ("r1", current.key(), [110.0, 112.0, 114.0]),
        ("r1+kl", f"{BASE},intra_ts:sd,inter_ss:kl*auto", [110.0, 120.0, 130.0]),  # 0, 8, 16
        ("r1+fd", f"{BASE},intra_ts:sd,inter_ts:fd*auto", [115.0, 116.0, 117.0]),
        ("other", f"{BASE},intra_ss:sd", [500.0]),  # not a candidate of r1
    )
    # r1+kl has the largest mean; its gains over r1 (0, 8, 16) are not significant.
    rows = table.set_index("pair_set")
    step = row_difference(rows.loc["r1+kl"], rows.loc["r1"], "rsum")
    assert (step.n, step.mean) == (3, 8.0) and step.p_diff > 0.05
    assert greedy_next(table, current) is None
    better = table_of(
        BASELINE,
        ("r1", current.key(), [110.0, 112.0, 114.0]),
        ("r1+kl", f"{BASE},intra_ts:sd,inter_ss:kl*auto", [119.0, 120.0, 121.0]),  # 9, 8, 7
        ("r1+fd", f"{BASE},intra_ts:sd,inter_ts:fd*auto", [115.0, 116.0, 117.0]),
    )
    chosen = greedy_next(better, current)
    assert chosen.name == "r1+kl" and chosen.key() == f"{BASE},intra_ts:sd,inter_ss:kl*auto"


def test_greedy_next_from_the_baseline_one_seed_and_errors():
    base = PairSet.parse(BASE, name="baseline")
    table = table_of(BASELINE, ("b+sd", f"{BASE},intra_ts:sd*auto", [104.0, 105.0, 106.0]))
    assert greedy_next(table, base).key() == f"{BASE},intra_ts:sd*auto"  # 4, 3, 2
    # gains 3, 0, -2: not shown to be above 0
    weak = table_of(BASELINE, ("b+sd", f"{BASE},intra_ts:sd*auto", [103.0, 102.0, 102.0]))
    assert greedy_next(weak, base) is None
    # one seed: no step (training noise untested), however large the gain
    one = [("baseline", BASE, [100.0]), ("b+sd", f"{BASE},intra_ts:sd*auto", [150.0])]
    assert greedy_next(table_of(*one), base) is None
    # identical per-seed gains are not p = 0 without eval ranks: no step
    runs = runs_of(BASELINE, ("b+sd", f"{BASE},intra_ts:sd*auto", [103.0, 105.0, 107.0]))
    assert greedy_next(selection_table(runs), base) is None
    with pytest.raises(InputError, match="current set intra_ts:infonce,inter_ss:sd has no"):
        greedy_next(table, PairSet.parse(f"{BASE},inter_ss:sd"))
    lonely = table_of(BASELINE)
    with pytest.raises(InputError, match="no candidate of baseline has a finished run"):
        greedy_next(lonely, base)
    everything = PairSet.parse(",".join(f"{a}:{b}" for a, b in valid_pairs()), name="all")
    assert greedy_next(lonely, everything) is None


def test_recipe_yaml_is_exact_and_reads_back(tmp_path):
    recipe = PairSet.parse("inter_ss:kl*0.5@0.05,intra_ts:infonce,intra_ts:fd*2000", "combined")
    text = recipe_yaml(recipe, {"student": "conaclip-student-xs", "steps": 150})
    assert text == (
        "student: conaclip-student-xs\n"
        "steps: 150\n"
        "pair_sets:\n"
        "- name: combined\n"
        "  pairs: ['intra_ts:infonce', 'intra_ts:fd*2000', 'inter_ss:kl*0.5@0.05']\n"
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    (back,) = pair_sets_from_yaml(path)
    assert back == recipe
    assert yaml.safe_load(recipe_yaml(recipe)) == {
        "pair_sets": [
            {"name": "combined", "pairs": ["intra_ts:infonce", "intra_ts:fd*2000",
                                           "inter_ss:kl*0.5@0.05"]}
        ]
    }  # fmt: skip


def test_common_settings_keeps_shared_typed_params():
    runs = pd.DataFrame({
        "params.student": ["conaclip-student-xs", "conaclip-student-xs"],
        "params.teacher": ["conaclip-teacher", "other"],
        "params.steps": ["150", "150"],
        "params.batch_size": ["16", None],
    })  # fmt: skip
    assert common_settings(runs) == {
        "student": "conaclip-student-xs", "steps": 150, "batch_size": 16,
    }  # fmt: skip
