"""The choice on hand-made tables: verdicts, best pair set, combined recipe, greedy step.

Each case is a runs frame in runs_frame()'s layout (one row per run, latest metrics) turned
into a table by selection_table, with eval ranks on 600 one-caption images in which a run
with rsum v retrieves exactly v images at rank 0 (so every recall is v / 6 and rsum is v).
By default the hits are the images 0 .. v-1, so a larger v hits a superset of a smaller one
and every bootstrap resample agrees on the sign of the gain (p_boot = 2 / 2001, the smallest
possible); ``offset`` moves a cell's hits to other images, so that eval-query noise is real.
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
    paired_gain,
    recipe_yaml,
)
from orchestrator.table import selection_table
from search_spaces.presets import PairSet, pair_sets_from_yaml
from trainers.errors import InputError
from trainers.graph import valid_pairs

BASE = "intra_ts:infonce"
N_IMAGES = 600


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
    """Ranks with ``rsum`` hits at rank 0 on the images offset .. offset+rsum-1 (mod 600)."""
    t2i = np.full(N_IMAGES, 50)
    t2i[(offset + np.arange(int(rsum))) % N_IMAGES] = 0
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
    # p_seed (scipy's ttest_1samp of the gains) and Holm over the 7 rows with >= 2 seeds:
    # peer 0 (x7), +pair2 1.1e-5 (x6), +sd 0.00104 (x5 = 0.0052), +fd 0.00148 (x4 = 0.0059),
    # +symkl 0.0063 (x3 = 0.019), +ssd 0.074 (x2 = 0.15), +kl 0.52. Every p_boot is at most a
    # few 2/2001 (hits nest), so the seeds decide here.
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
    assert rows.loc["+symkl", "p_seed_adj"] == pytest.approx(3 * 0.0063029601, rel=1e-6)
    assert rows.loc["+ssd", "p_seed_adj"] == pytest.approx(2 * 0.0741799002, rel=1e-6)
    verdicts = dict(zip(table["pair_set"], table["verdict"], strict=True))
    assert verdicts == {
        "baseline": "baseline", "+sd": "better", "+kl": "open", "+symkl": "better",
        "+ssd": "open", "+fd": "worse", "+big": "open", "+pair2": "better", "peer": "better",
    }  # fmt: skip
    recipe = combined_recipe(table)
    assert recipe.name == "combined_recipe"
    assert recipe.key() == "intra_ts:infonce,intra_ts:sd,inter_ts:sym_kl"


def test_gain_must_survive_eval_query_noise_too():
    # +sd gains 10, 11, 10 over seeds, but hits other images than the baseline: per resample
    # the two hit counts move independently, the bootstrap interval of the gain spans 0.
    table = table_of(
        BASELINE, ("+sd", f"{BASE},intra_ts:sd", [110.0, 113.0, 114.0]), offsets={"+sd": 300}
    ).set_index("pair_set")
    row = table.loc["+sd"]
    assert row["p_seed_adj"] < 0.01
    assert row["boot_gain_low"] < 0 < row["boot_gain_high"] and row["p_boot_adj"] > 0.05
    assert row["verdict"] == "open"
    choice = choose(table.reset_index())
    assert choice.winner is None and choice.leading["pair_set"] == "+sd"
    assert "survives training noise but not eval-query noise" in choice.reason
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


def test_best_pair_set_is_the_largest_significant_gain():
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
    assert choice.reason.startswith("+sd gains +10.33 rsum [95% CI +8.90, +11.77 over 3 seeds; ")
    # +sd - +ssd is 6 on every seed (zero spread: p 0): the lead is settled seed for seed.
    assert choice.reason.endswith(
        "both below 0.05; 1 other row is significantly better too, and seed for seed it is "
        "ahead of it (paired t-test, Holm)"
    )
    # +sd - +x per seed: 1, 5, 0.5 (t = 1.52 on 2 df, p 0.27): both better, lead not settled.
    close = table_of(
        BASELINE,
        ("+sd", f"{BASE},intra_ts:sd", [110.0, 116.0, 114.0]),
        ("+x", f"{BASE},intra_ss:sd", [109.0, 111.0, 113.5]),
    )
    assert choose(close).winner["pair_set"] == "+sd"
    assert choose(close).reason.endswith(
        "1 other row is significantly better too; seed for seed (paired t-test, Holm) it is "
        "ahead of 0 "
        "of them, not yet of +x"
    )
    by_r1 = table_of(
        BASELINE, ("+sd", f"{BASE},intra_ts:sd", [99.0, 101.0, 103.0]), metric="t2i_R1"
    )
    assert best_pair_set(by_r1) is None and by_r1.attrs["metric"] == "t2i_R1"
    # t2i_R1 gains -1/6 on every seed (p_seed ~ 0), but only one image per seed (ids 99, 101,
    # 103) tells +sd from the baseline: a resample misses all three with probability
    # (597/600)^600 = 0.0495, and then its gain is 0, so p_boot = 2 x 0.0495: open.
    assert by_r1.loc[1, "p_seed"] < 1e-12 and by_r1.loc[1, "verdict"] == "open"
    assert by_r1.loc[1, "p_boot"] == pytest.approx(2 * (597 / 600) ** 600, abs=0.02)
    with pytest.raises(InputError, match=r"--metric mean_recall: not in the table"):
        best_pair_set(table, "mean_recall")
    with pytest.raises(InputError, match=r"--metric t2i_R1: the table's gains and verdicts are"):
        best_pair_set(table, "t2i_R1")
    only_failed = table_of(("baseline", BASE, [None]))
    with pytest.raises(InputError, match="no pair set has a finished run yet"):
        best_pair_set(only_failed)


def test_no_winner_names_the_leader_and_the_seeds_that_would_settle_it():
    # gains 0, 8, 16: mean 8, std 8, t = 1.73 (p 0.23). One comparison, so alpha 0.05 as is:
    # t_{0.975, n-1} * 8 / sqrt(n) < 8 first at n = 7 (2.447 < 2.646; n = 6: 2.571 > 2.449).
    table = table_of(BASELINE, ("+sd", f"{BASE},intra_ts:sd", [100.0, 110.0, 120.0]))
    choice = choose(table)
    assert choice.winner is None and best_pair_set(table) is None
    assert choice.leading["pair_set"] == "+sd"
    assert choice.reason.startswith(
        "no significant winner: the leading candidate is +sd: +8.00 rsum [95% CI -11.87, +27.87 "
        "over 3 seeds; +"
    )
    assert "about `--seeds 7` would settle it" in choice.reason
    assert "`conaclip ablate --race`" in choice.reason
    # One seed: the baseline's spread (std 2, x sqrt 2 for a difference) says n = 3 suffice
    # for a gain of 10 (4.303 * 2.83 / 1.73 = 7.0 < 10; n = 2: 25.4 > 10).
    single = choose(table_of(BASELINE, ("+sd", f"{BASE},intra_ts:sd", [110.0])))
    assert "With one seed the gain cannot be told apart from training noise" in single.reason
    assert "rerun with `--seeds 3`" in single.reason
    tiny = choose(table_of(BASELINE, ("+sd", f"{BASE},intra_ts:sd", [100.1])))
    assert "would need more than 20 seeds" in tiny.reason
    losing = choose(table_of(BASELINE, ("+sd", f"{BASE},intra_ts:sd", [90.0, 92.0, 95.0])))
    assert losing.reason == (
        "no pair set gains over the baseline (the largest paired gain is -9.67 rsum, by +sd)"
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
    # r1+kl has the largest mean; its gains over r1 (0, 8, 16) have a 95% lower bound of
    # 8 - 4.303 * 8 / sqrt 3 = -11.9 < 0: greedy stops there.
    top = table.set_index("pair_set").loc["r1+kl"]
    n, mean, low = paired_gain(top, table.set_index("pair_set").loc["r1"], "rsum")
    assert (n, mean) == (3, 8.0) and low == pytest.approx(8 - 4.302653 * 8 / np.sqrt(3))
    assert greedy_next(table, current) is None
    better = table_of(
        BASELINE,
        ("r1", current.key(), [110.0, 112.0, 114.0]),
        ("r1+kl", f"{BASE},intra_ts:sd,inter_ss:kl*auto", [119.0, 120.0, 121.0]),  # 9, 8, 7
        ("r1+fd", f"{BASE},intra_ts:sd,inter_ts:fd*auto", [115.0, 116.0, 117.0]),
    )
    # 8 - 4.303 * 1 / sqrt 3 = 5.52 > 0
    chosen = greedy_next(better, current)
    assert chosen.name == "r1+kl" and chosen.key() == f"{BASE},intra_ts:sd,inter_ss:kl*auto"


def test_greedy_next_from_the_baseline_one_seed_and_errors():
    base = PairSet.parse(BASE, name="baseline")
    table = table_of(BASELINE, ("b+sd", f"{BASE},intra_ts:sd*auto", [104.0, 105.0, 106.0]))
    # gains 4, 3, 2: 3 - 4.303 / sqrt 3 = 0.52 > 0
    assert greedy_next(table, base).key() == f"{BASE},intra_ts:sd*auto"
    # gains 3, 2, 1: 2 - 2.48 < 0
    weak = table_of(BASELINE, ("b+sd", f"{BASE},intra_ts:sd*auto", [103.0, 104.0, 105.0]))
    assert greedy_next(weak, base) is None
    # one seed: any gain > 0 counts (nothing to test it against)
    one = [("baseline", BASE, [100.0]), ("b+sd", f"{BASE},intra_ts:sd*auto", [100.5])]
    assert greedy_next(table_of(*one), base).key() == f"{BASE},intra_ts:sd*auto"
    flat = [("baseline", BASE, [100.0]), ("b+sd", f"{BASE},intra_ts:sd*auto", [100.0])]
    assert greedy_next(table_of(*flat), base) is None
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
