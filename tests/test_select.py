"""The choice on hand-made tables: best pair set, combined recipe, greedy step, recipe YAML.

Each case is a runs frame in runs_frame()'s layout (one row per run, latest metrics) turned
into a table by selection_table; the rsum values are picked so means and sample stds are easy
to check by hand.
"""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from orchestrator.select import (
    best_pair_set,
    combined_recipe,
    common_settings,
    greedy_next,
    recipe_yaml,
)
from orchestrator.table import selection_table
from search_spaces.presets import PairSet, pair_sets_from_yaml
from trainers.errors import InputError
from trainers.graph import valid_pairs

BASE = "intra_ts:infonce"


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


# baseline 100, 102, 104 -> 102 ± 2
BASELINE = ("baseline", BASE, [100.0, 102.0, 104.0])


def test_recipe_keeps_gains_above_their_std_only():
    table = selection_table(
        runs_of(
            BASELINE,
            ("+sd", f"{BASE},intra_ts:sd", [110.0, 112.0, 114.0]),  # 112 ± 2: +10 > 2, kept
            ("+kl", f"{BASE},inter_ss:kl", [90.0, 110.0, 130.0]),  # 110 ± 20: +8 < 20, dropped
            ("+symkl", f"{BASE},inter_ts:sym_kl", [105.0, 107.0, None]),  # 106 ± √2: +4, kept
            ("+fd", f"{BASE},inter_ts:fd", [101.0, 103.0, 105.0]),  # 103 ± 2: +1 < 2, dropped
            ("+ssd", f"{BASE},intra_ss:sd", [106.0, 110.0, 114.0]),  # 110 ± 4: +8 > 4, kept
            ("+eq", f"{BASE},inter_ss:sd", [102.0, 106.0, 110.0]),  # 106 ± 4: +4 = 4, dropped
            ("+bad", f"{BASE},intra_ts:kl", [90.0]),  # one seed, loses
            ("+pair2", f"{BASE},intra_ts:fd,inter_ts:sd", [200.0]),  # two pairs: not a single
            ("peer", "inter_ss:infonce,inter_ss:kl", [300.0]),  # lacks the baseline's pair
        )
    )
    recipe = combined_recipe(table)
    assert recipe.name == "combined_recipe"
    assert recipe.key() == "intra_ts:infonce,intra_ts:sd,intra_ss:sd,inter_ts:sym_kl"


def test_recipe_with_one_seed_keeps_every_positive_gain():
    table = selection_table(
        runs_of(
            ("baseline", BASE, [100.0]),
            ("+sd", f"{BASE},intra_ts:sd", [100.5]),
            ("+kl", f"{BASE},inter_ss:kl", [100.0]),  # no gain
            ("+symsd", f"{BASE},intra_ts:sym_sd", [99.0]),
        )
    )
    assert combined_recipe(table).key() == "intra_ts:infonce,intra_ts:sd"


def test_recipe_takes_the_better_variant_of_a_pair():
    table = selection_table(
        runs_of(
            ("baseline", BASE, [100.0]),
            ("kl-light", f"{BASE},inter_ss:kl*0.5", [104.0]),
            ("kl-cold", f"{BASE},inter_ss:kl@0.05", [107.0]),
            ("kl", f"{BASE},inter_ss:kl", [101.0]),
        )
    )
    assert combined_recipe(table).key() == "intra_ts:infonce,inter_ss:kl@0.05"


def test_recipe_needs_a_finished_baseline():
    no_base = selection_table(runs_of(("+sd", f"{BASE},intra_ts:sd", [1.0]), baseline="x"))
    with pytest.raises(InputError, match="no finished baseline run"):
        combined_recipe(no_base)
    failed_base = selection_table(
        runs_of(("baseline", BASE, [None]), ("+sd", f"{BASE},intra_ts:sd", [1.0]))
    )
    with pytest.raises(InputError, match="no finished baseline run"):
        combined_recipe(failed_base)


def test_best_pair_set_ranks_finished_means():
    table = selection_table(
        runs_of(
            BASELINE,
            ("+sd", f"{BASE},intra_ts:sd", [110.0, 112.0, 114.0]),  # 112
            ("+kl", f"{BASE},inter_ss:kl", [None, None]),  # nothing finished
            ("+symkl", f"{BASE},inter_ts:sym_kl", [130.0, 90.0, None]),  # 110
        )
    )
    best = best_pair_set(table)
    assert best["pair_set"] == "+sd" and best["rsum_mean"] == 112.0 and best["seeds"] == 3
    by_r1 = selection_table(runs_of(BASELINE, ("+sd", f"{BASE},intra_ts:sd", [99.0])), "t2i_R1")
    assert best_pair_set(by_r1)["pair_set"] == "baseline"  # 17 vs 16.5
    with pytest.raises(InputError, match=r"--metric mean_recall: not in the table"):
        best_pair_set(table, "mean_recall")
    only_failed = selection_table(runs_of(("baseline", BASE, [None])))
    with pytest.raises(InputError, match="no pair set has a finished run yet"):
        best_pair_set(only_failed)


def test_greedy_next_takes_the_largest_gain_over_the_current_set():
    current = PairSet.parse(f"{BASE},intra_ts:sd", name="r1")
    table = selection_table(
        runs_of(
            BASELINE,
            ("r1", current.key(), [110.0, 112.0, 114.0]),  # 112 ± 2
            ("r1+kl", f"{BASE},intra_ts:sd,inter_ss:kl", [110.0, 120.0, 130.0]),  # 120 ± 10
            ("r1+fd", f"{BASE},intra_ts:sd,inter_ts:fd", [115.0, 116.0, 117.0]),  # 116 ± 1
            ("other", f"{BASE},intra_ss:sd", [500.0]),  # not a candidate of r1
        )
    )
    # r1+kl has the largest mean, and gains 8 < its std 10: greedy stops there.
    assert greedy_next(table, current) is None
    better = selection_table(
        runs_of(
            BASELINE,
            ("r1", current.key(), [110.0, 112.0, 114.0]),
            ("r1+kl", f"{BASE},intra_ts:sd,inter_ss:kl", [119.0, 120.0, 121.0]),  # +8 > 1
            ("r1+fd", f"{BASE},intra_ts:sd,inter_ts:fd", [115.0, 116.0, 117.0]),
        )
    )
    chosen = greedy_next(better, current)
    assert chosen.name == "r1+kl" and chosen.key() == f"{BASE},intra_ts:sd,inter_ss:kl"


def test_greedy_next_from_the_baseline_and_its_errors():
    base = PairSet.parse(BASE, name="baseline")
    table = selection_table(
        runs_of(BASELINE, ("b+sd", f"{BASE},intra_ts:sd", [103.0, 104.0, 105.0]))  # +2 > 1
    )
    assert greedy_next(table, base).key() == f"{BASE},intra_ts:sd"
    with pytest.raises(InputError, match="current set intra_ts:infonce,inter_ss:sd has no"):
        greedy_next(table, PairSet.parse(f"{BASE},inter_ss:sd"))
    lonely = selection_table(runs_of(BASELINE))
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
