"""Search-space presets: every preset is valid data; generated ones follow valid_pairs()."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from search_spaces.presets import (
    PairSet,
    custom_preset,
    greedy_candidates,
    load_preset,
    pair_sets_from_text,
    pair_sets_from_yaml,
    preset_names,
)
from trainers.errors import InputError
from trainers.graph import valid_pairs
from trainers.run_config import PairConfig, load_distill_config

BASELINE_KEY = "intra_ts:infonce"

# docs/method.md's peer table and third-party recipe, written out by hand in valid_pairs() order.
EXPECTED_KEYS = {
    "baseline": [BASELINE_KEY],
    "motis": [BASELINE_KEY],
    # The peers soften KL at the student's own (learnable) temperature, as their trainers do.
    "clip_kd": ["intra_ts:fd*2000,inter_ts:infonce,inter_ss:infonce,inter_ss:kl@learnable"],
    "tinyclip": ["inter_ss:kl@0.02"],
    "mobileclip_lite": ["inter_ss:infonce,inter_ss:kl@learnable"],
    "openclip_distill": ["inter_ss:infonce,inter_ss:kl@learnable"],
    "conaclip_recipe": [
        BASELINE_KEY,
        "intra_ts:infonce,intra_ts:sd,intra_ts:sym_sd,intra_ss:sd,inter_ts:infonce,"
        "inter_ts:sym_kl,inter_ss:infonce,inter_ss:sd",
    ],
    "smoke": [
        BASELINE_KEY,
        "intra_ts:infonce,intra_ts:sd*auto",
        "intra_ts:infonce,inter_ts:sym_kl*auto",
    ],
}


def test_every_expected_preset_exists():
    expected = {
        "baseline", "single_additions", "conaclip_recipe", "motis", "clip_kd", "tinyclip",
        "mobileclip_lite", "openclip_distill", "greedy", "smoke", "demo",
    }  # fmt: skip
    assert expected <= set(preset_names())
    assert preset_names() == sorted(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_consistent(name):
    preset = load_preset(name)
    assert preset.name == name and preset.description
    assert preset.kind in ("grid", "greedy") and preset.pair_sets
    keys = [s.key() for s in preset.pair_sets]
    assert len(set(keys)) == len(keys) and len({s.name for s in preset.pair_sets}) == len(keys)
    if preset.baseline is not None:
        assert preset.baseline in preset.pair_sets
    for pair_set in preset.pair_sets:
        # Each set is a valid run configuration with the preset's settings.
        config = load_distill_config({**preset.settings, "pairs": list(pair_set.pairs)}, name)
        assert [p.pair for p in config.pairs] == list(pair_set.pair_names)


@pytest.mark.parametrize(("name", "keys"), sorted(EXPECTED_KEYS.items()))
def test_fixed_presets_match_method_md(name, keys):
    assert [s.key() for s in load_preset(name).pair_sets] == keys


def test_tinyclip_uses_logit_scale_50_and_clip_kd_fd_weight_2000():
    (kl,) = load_preset("tinyclip").pair_sets[0].pairs
    assert kl.temperature == pytest.approx(1 / 50) and kl.weight == 1.0
    fd = load_preset("clip_kd").pair_sets[0].pairs[0]
    assert (fd.pair, fd.weight, fd.temperature) == ("intra_ts:fd", 2000.0, None)


def test_single_additions_is_the_strategy_selection_table():
    preset = load_preset("single_additions")
    assert preset.kind == "grid" and len(preset.pair_sets) == 20
    assert preset.baseline == preset.pair_sets[0] and preset.baseline.key() == BASELINE_KEY
    added = []
    for pair_set in preset.pair_sets[1:]:
        assert set(pair_set.pair_names) > {BASELINE_KEY} and len(pair_set.pairs) == 2
        (extra,) = set(pair_set.pair_names) - {BASELINE_KEY}
        added.append(extra)
        assert pair_set.name == f"baseline+{extra}"
        # Fair cells: the added pair is weighted by the gradient-share rule, the baseline not.
        weights = {p.pair: p.weight for p in pair_set.pairs}
        assert weights == {BASELINE_KEY: 1.0, extra: "auto"}
    everything = [f"{lt}:{st}" for lt, st in valid_pairs()]
    assert sorted(added) == sorted(set(everything) - {BASELINE_KEY})
    assert "intra_ss:infonce" not in added and "inter_ss:sym_kl" not in added
    assert "inter_ts:sym_kl" in added and "intra_ss:sd" in added


def test_greedy_starts_as_single_additions():
    greedy = load_preset("greedy")
    assert greedy.kind == "greedy"
    assert [s.key() for s in greedy.pair_sets] == [
        s.key() for s in load_preset("single_additions").pair_sets
    ]


def test_smoke_and_demo_settings():
    smoke = load_preset("smoke")
    assert len(smoke.pair_sets) == 3
    assert smoke.settings == {
        "student": "conaclip-student-xs", "steps": 6, "eval_every": 3, "batch_size": 16,
    }  # fmt: skip
    demo = load_preset("demo")
    assert 4 <= len(demo.pair_sets) <= 6 and demo.baseline.key() == BASELINE_KEY
    assert 100 <= demo.settings["steps"] <= 200
    # The verdict grids score the student's moving average (docs/results/noise_budget.json).
    assert demo.settings["ema_decay"] == load_preset("single_additions").settings["ema_decay"]
    assert load_preset("single_additions").settings == {"ema_decay": 0.9}
    for name in ("baseline", "clip_kd", "greedy"):
        assert load_preset(name).settings == {}


def test_unknown_preset_lists_the_names():
    with pytest.raises(InputError, match=r"unknown preset 'nope'; expected one of .*smoke"):
        load_preset("nope")


def test_greedy_candidates_add_each_missing_pair_once():
    current = PairSet.parse("intra_ts:infonce,inter_ts:sym_kl,intra_ss:sd", name="round2")
    candidates = greedy_candidates(current)
    assert len(candidates) == 20 - 3
    assert candidates[0].name == "round2+intra_ts:fd"
    assert candidates[0].key() == "intra_ts:infonce,intra_ts:fd*auto,intra_ss:sd,inter_ts:sym_kl"
    assert greedy_candidates(current, weight=1.0)[0].key() == (
        "intra_ts:infonce,intra_ts:fd,intra_ss:sd,inter_ts:sym_kl"
    )
    for candidate in candidates:
        assert set(current.pairs) < set(candidate.pairs) and len(candidate.pairs) == 4
    everything = PairSet("all", tuple(PairConfig(pair=f"{a}:{b}") for a, b in valid_pairs()))
    assert greedy_candidates(everything) == []


def test_key_is_canonical_and_order_independent():
    a = PairSet.parse("inter_ss:kl*0.5@0.05,intra_ts:infonce", name="x")
    b = PairSet.parse(["intra_ts:infonce", {"pair": "inter_ss:kl", "weight": 0.5,
                                            "temperature": 0.05}], name="x")  # fmt: skip
    assert a == b and a.key() == "intra_ts:infonce,inter_ss:kl*0.5@0.05"
    assert PairSet.parse(a.key()).name == a.key()


weights = st.sampled_from([1.0, 0.5, 2000.0, 1e-3, 0.1 + 0.2, 3.0])
temperatures = st.one_of(st.none(), st.floats(min_value=1e-4, max_value=10.0))


@given(
    st.lists(st.sampled_from(valid_pairs()), min_size=1, max_size=8, unique=True),
    st.lists(st.tuples(weights, temperatures), min_size=8, max_size=8),
    st.randoms(),
)
def test_key_round_trips_and_ignores_order(pairs, terms, rng):
    configs = [
        PairConfig(pair=f"{lt}:{s}", weight=w, temperature=t)
        for (lt, s), (w, t) in zip(pairs, terms, strict=False)
    ]
    shuffled = list(configs)
    rng.shuffle(shuffled)
    one, two = PairSet("a", tuple(configs)), PairSet("a", tuple(shuffled))
    assert one.key() == two.key()
    assert PairSet.parse(one.key()).pairs == one.pairs


def test_invalid_pairs_never_reach_a_set():
    with pytest.raises(InputError, match="valid strategies for inter_ss: infonce, fd, sd, kl"):
        PairSet.parse("intra_ts:infonce,inter_ss:sym_kl")
    with pytest.raises(InputError, match="intra_ts:sd appears more than once"):
        PairSet.parse("intra_ts:sd,intra_ts:sd*2")


def test_pairs_flag_gives_several_sets():
    sets = pair_sets_from_text("intra_ts:infonce ; intra_ts:infonce,inter_ts:sym_kl*2")
    assert [s.name for s in sets] == ["intra_ts:infonce", "intra_ts:infonce,inter_ts:sym_kl*2"]
    preset = custom_preset(sets)
    assert preset.baseline == sets[0] and preset.kind == "grid"
    with pytest.raises(InputError, match="same pairs"):
        pair_sets_from_text("intra_ts:infonce;intra_ts:infonce")


def test_user_yaml_with_several_sets(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "student: conaclip-student-xs\n"
        "pair_sets:\n"
        "  - {name: base, pairs: [intra_ts:infonce]}\n"
        "  - name: heavy\n"
        "    pairs: ['inter_ss:kl*0.5@0.05', {pair: intra_ts:infonce, weight: 2}]\n"
    )
    base, heavy = pair_sets_from_yaml(path)
    assert (base.name, base.key()) == ("base", "intra_ts:infonce")
    assert (heavy.name, heavy.key()) == ("heavy", "intra_ts:infonce*2,inter_ss:kl*0.5@0.05")


def test_user_yaml_with_one_set_is_named_after_the_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("pairs: intra_ts:infonce,intra_ss:sd\n")
    (only,) = pair_sets_from_yaml(path)
    assert (only.name, only.key()) == ("recipe", "intra_ts:infonce,intra_ss:sd")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pair_sets:\n  - {name: a, pairs: [intra_ts:infonce, inter_ss:sym_sd]}\n",
         r"bad.yaml: pair_sets\[0\].pairs\[1\]: pair: invalid pair inter_ss:sym_sd .*"
         r"valid strategies for inter_ss: infonce, fd, sd, kl"),
        ("pairs: [intra_ts:infonce*heavy]\n", r"bad.yaml: pairs.pairs\[0\]: .*numeric weight"),
        ("pairs: [{pair: intra_ts:sd, weight: -1}]\n",
         r"bad.yaml: pairs.pairs\[0\]: weight: Input should be greater than 0"),
        ("pair_sets:\n  - {name: a, pairs: [intra_ts:sd]}\n  - {name: a, pairs: [inter_ts:fd]}\n",
         "pair set name 'a' is used twice"),
        ("pair_sets:\n  - {pairs: [intra_ts:sd]}\n", r"pair_sets\[0\].name: expected"),
        ("pair_sets:\n  - {name: a, pairs: [], weight: 2}\n", r"pair_sets\[0\]: expected a map"),
        ("pair_sets: []\n", "pair_sets: expected a non-empty list"),
        ("steps: 3\n", "expected exactly one of 'pair_sets'"),
        ("pairs: [intra_ts:sd]\npair_sets: []\n", "expected exactly one of 'pair_sets'"),
        ("pairs: [intra_ts:sd\n", r"bad.yaml: line \d+: not valid YAML"),
        ("- intra_ts:sd\n", "expected a mapping at the top level"),
    ],
)  # fmt: skip
def test_bad_user_yaml_is_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as error:
        pair_sets_from_yaml(path)
    assert "\n" not in str(error.value)


def test_missing_user_yaml(tmp_path):
    with pytest.raises(InputError, match=r"nothing\.yaml: pair-set file not found"):
        pair_sets_from_yaml(tmp_path / "nothing.yaml")
