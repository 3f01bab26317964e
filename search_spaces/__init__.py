"""Presets of pair sets that an ablation sweeps, stored as data (``search_spaces/*.yaml``) or
generated from ``trainers.graph.valid_pairs()``; see ``search_spaces.presets``."""

from search_spaces.presets import (
    PairSet,
    Preset,
    custom_preset,
    greedy_candidates,
    load_preset,
    pair_sets_from_text,
    pair_sets_from_yaml,
    preset_names,
)

__all__ = [
    "PairSet",
    "Preset",
    "custom_preset",
    "greedy_candidates",
    "load_preset",
    "pair_sets_from_text",
    "pair_sets_from_yaml",
    "preset_names",
]
