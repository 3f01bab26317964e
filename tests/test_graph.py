"""The interaction graph as data: validity, pair parsing, counterparts."""

import pytest

from trainers.errors import InputError
from trainers.graph import (
    LEARNING_TYPES,
    STRATEGIES,
    is_valid,
    nodes_needed,
    parse_pair,
    teacher_counterpart,
    valid_pairs,
    valid_strategies,
)

# docs/method.md, read independently: the four invalid pairs.
INVALID = {
    ("intra_ss", "infonce"),
    ("intra_ss", "fd"),
    ("inter_ss", "sym_sd"),
    ("inter_ss", "sym_kl"),
}


def test_contract_names_and_order():
    assert LEARNING_TYPES == ("intra_ts", "intra_ss", "inter_ts", "inter_ss")
    assert STRATEGIES == ("infonce", "fd", "sd", "kl", "sym_sd", "sym_kl")


def test_valid_pairs_are_the_twenty_of_method_md_in_order():
    expected = [(lt, st) for lt in LEARNING_TYPES for st in STRATEGIES if (lt, st) not in INVALID]
    assert valid_pairs() == expected
    assert len(valid_pairs()) == 20


@pytest.mark.parametrize("pair", sorted(INVALID))
def test_invalid_pairs(pair):
    assert not is_valid(*pair)
    with pytest.raises(InputError, match=f"invalid pair {pair[0]}:{pair[1]}"):
        parse_pair(f"{pair[0]}:{pair[1]}")


def test_unknown_names_are_invalid_and_errors_list_valid_names():
    assert not is_valid("intra_xx", "sd")
    assert not is_valid("intra_ts", "mse")
    with pytest.raises(InputError, match="intra_ts, intra_ss, inter_ts, inter_ss"):
        parse_pair("intra_xx:sd")
    with pytest.raises(InputError, match="infonce, fd, sd, kl, sym_sd, sym_kl"):
        parse_pair("intra_ts:mse")
    with pytest.raises(InputError, match="learning_type:strategy"):
        parse_pair("intra_ts")


def test_parse_pair_and_valid_strategies():
    assert parse_pair(" inter_ts:sym_kl ") == ("inter_ts", "sym_kl")
    assert valid_strategies("intra_ss") == ["sd", "kl", "sym_sd", "sym_kl"]
    assert valid_strategies("inter_ss") == ["infonce", "fd", "sd", "kl"]


def test_teacher_counterparts_follow_method_md():
    assert teacher_counterpart(("SI", "TT")) == ("TI", "TT")
    assert teacher_counterpart(("SI", "SI")) == ("TI", "TI")
    assert teacher_counterpart(("SI", "ST")) == ("TI", "TT")
    assert teacher_counterpart(("ST", "TI")) == ("TT", "TI")


def test_nodes_needed():
    # The student's own CLIP loss reads no teacher node: teacher pre-training relies on this.
    assert nodes_needed("inter_ss", "infonce") == ("SI", "ST")
    assert nodes_needed("inter_ss", "sd") == ("TI", "TT", "SI", "ST")
    assert nodes_needed("intra_ss", "sym_kl") == ("SI", "ST")
    assert nodes_needed("intra_ss", "kl") == ("TI", "TT", "SI", "ST")
