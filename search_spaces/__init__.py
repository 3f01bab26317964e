"""Presets of pair sets that an ablation sweeps, stored as data."""
