"""Presets: which pair sets an ablation tries, as data.

A *pair set* is the loss of one trial: (learning type, strategy) pairs with weights and
temperatures. A *preset* is a list of pair sets plus the one the table measures against.

Fixed presets are YAML files beside this module (``search_spaces/<name>.yaml``)::

    description: "..."
    baseline: baseline          # name of one of the pair sets, optional
    settings: {steps: 6}        # suggested run settings, optional (smoke, demo)
    margin: 6                   # equivalence margin of the verdict (metric units), optional
    pair_sets:
      - name: baseline
        pairs: [intra_ts:infonce, "inter_ss:kl*0.5@0.05", {pair: intra_ts:sd, weight: 2}]

Generated presets come from ``valid_pairs()``, so a strategy added to ``trainers/graph.py``
appears in them without an edit here:

- ``single_additions``: the paper's strategy-selection table. ``valid_pairs()`` has 20 pairs and
  the baseline's own pair (intra_ts:infonce) is one of them, so the preset is the baseline alone
  (the table's reference row) plus the baseline + each of the other 19 pairs: 20 pair sets.
- ``greedy``: forward selection. Round 1 runs the same 20 sets; each later round runs
  ``greedy_candidates(current)`` and ``orchestrator.selection.greedy_next`` picks the next current
  set, until no candidate gains.

Every pair is validated on the way in (``trainers.graph.parse_pair``), so an invalid pair never
reaches a trial; a bad file is one ``InputError`` line naming the file, the field and the valid
strategies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from trainers.errors import InputError
from trainers.graph import valid_pairs
from trainers.run_config import (
    AUTO,
    PairConfig,
    describe_validation_error,
    pair_text,
    parse_pairs,
    repeated_pairs,
)
from trainers.yaml_input import parse_yaml_mapping

BASELINE_PRESET = "baseline"
GENERATED = {
    "single_additions": "the strategy-selection table: the baseline alone, then the baseline "
    "plus each other valid pair, one at a time, weighted by the fair-cell rule (*auto)",
    "greedy": "forward selection: each round adds the pair with the largest gain over the "
    "current set; stops when nothing gains (round 1 = single_additions)",
}
PresetKind = Literal["grid", "greedy"]


def _pair_order(pair: PairConfig) -> int:
    return valid_pairs().index((pair.learning_type, pair.strategy))


@dataclass(frozen=True)
class PairSet:
    """One trial's loss terms. ``pairs`` are kept in ``valid_pairs()`` order, so two sets with
    the same terms are equal whatever order they were written in. A pair appears at most once.
    """

    name: str
    pairs: tuple[PairConfig, ...]

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise InputError(f"pair set name: expected a non-empty string, got {self.name!r}")
        pairs = tuple(sorted(self.pairs, key=_pair_order))
        if not pairs:
            raise InputError(f"pair set {self.name!r}: at least one pair is needed")
        repeated = repeated_pairs(pairs)
        if repeated:
            raise InputError(
                f"pair set {self.name!r}: pair {', '.join(repeated)} appears more than once"
            )
        object.__setattr__(self, "pairs", pairs)

    @classmethod
    def parse(cls, text: str | Sequence[Any], name: str | None = None) -> PairSet:
        """From ``"intra_ts:infonce,inter_ss:kl*0.5@0.05"`` (or a list of strings / dicts);
        the name defaults to the canonical key. InputError on an invalid pair."""
        try:
            pairs = parse_pairs(text if isinstance(text, str) else list(text))
        except ValidationError as error:
            raise InputError(describe_validation_error(error, "pairs")) from None
        except InputError:
            raise
        except ValueError as error:
            raise InputError(f"pairs {text!r}: {error}") from None
        pair_set = cls(name or str(text), tuple(pairs))
        return pair_set if name else cls(pair_set.key(), pair_set.pairs)

    def key(self) -> str:
        """Canonical, order-independent text of the pairs incl. weights and temperatures, e.g.
        ``"intra_ts:infonce,inter_ss:kl*0.5"``; ``PairSet.parse(key)`` gives the same pairs."""
        return ",".join(pair_text(p) for p in self.pairs)

    @property
    def pair_names(self) -> tuple[str, ...]:
        """``("intra_ts:infonce", ...)``: the pairs without weights or temperatures."""
        return tuple(p.pair for p in self.pairs)

    def with_pair(self, pair: PairConfig, name: str | None = None) -> PairSet:
        """This set plus ``pair``, named ``<name>+<pair>`` unless ``name`` is given."""
        return PairSet(name or f"{self.name}+{pair_text(pair)}", (*self.pairs, pair))


@dataclass(frozen=True)
class Preset:
    """A named list of pair sets. ``baseline`` is the reference row of the table (one of
    ``pair_sets``) or None; ``settings`` suggests DistillConfig fields (steps, eval_every,
    batch_size, student) for smoke and demo and is empty otherwise. ``kind`` "greedy" means
    ``pair_sets`` is round 1 and later rounds come from ``greedy_candidates``. ``margin``: the
    equivalence margin its verdicts use (None: the project's default)."""

    name: str
    description: str
    pair_sets: tuple[PairSet, ...]
    baseline: PairSet | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    kind: PresetKind = "grid"
    margin: float | None = None


def _preset_files() -> dict[str, Any]:
    root = resources.files("search_spaces")
    return {
        entry.name.removesuffix(".yaml"): entry
        for entry in root.iterdir()
        if entry.name.endswith(".yaml")
    }


def preset_names() -> list[str]:
    """Every preset, sorted: the YAML files plus the generated ones."""
    return sorted({*_preset_files(), *GENERATED})


def load_preset(name: str) -> Preset:
    """The preset called ``name``; InputError listing the known names when there is none."""
    if name in GENERATED:
        return _generated(name)
    files = _preset_files()
    if name not in files:
        raise InputError(f"unknown preset {name!r}; expected one of {', '.join(preset_names())}")
    source = f"search_spaces/{name}.yaml"
    return _preset_from_mapping(name, parse_yaml_mapping(files[name].read_text(), source), source)


def baseline_pair_set() -> PairSet:
    """MoTIS: the reference every generated preset adds pairs to (from ``baseline.yaml``)."""
    baseline = load_preset(BASELINE_PRESET).baseline
    assert baseline is not None, "baseline.yaml must name its baseline"
    return baseline


def greedy_candidates(current: PairSet, weight: float | str = AUTO) -> list[PairSet]:
    """``current`` plus each valid pair not in it, one set per pair in ``valid_pairs()`` order,
    named ``<current.name>+<pair>``. The added pair has the strategy's default temperature and
    ``weight`` (default "auto": the fair-cell rule, a fixed share of the other pairs' gradient
    norm, so a cell measures its strategy and not its loss scale). ``current`` itself is not in
    the list: it was measured in the round that chose it. Empty when nothing is left."""
    present = set(current.pair_names)
    return [
        current.with_pair(PairConfig(pair=f"{lt}:{st}", weight=weight), f"{current.name}+{lt}:{st}")
        for lt, st in valid_pairs()
        if f"{lt}:{st}" not in present
    ]


def custom_preset(pair_sets: Sequence[PairSet], name: str = "custom") -> Preset:
    """A user's own sets (``--pairs`` or a YAML file) as a grid preset. The set whose pairs
    equal the MoTIS baseline, if any, is the table's reference row."""
    reference = baseline_pair_set().key()
    baseline = next((s for s in pair_sets if s.key() == reference), None)
    check_unique_sets(pair_sets, name)
    return Preset(name, f"user pair sets ({len(pair_sets)})", tuple(pair_sets), baseline)


def pair_sets_from_text(spec: str) -> list[PairSet]:
    """``--pairs``: sets separated by ``;``, pairs by ``,``; each set is named by its key.
    ``"intra_ts:infonce;intra_ts:infonce,inter_ts:sym_kl"`` -> two sets."""
    sets = [PairSet.parse(part) for part in spec.split(";") if part.strip()]
    if not sets:
        raise InputError(f"--pairs {spec!r}: expected learning_type:strategy pairs")
    check_unique_sets(sets, "--pairs")
    return sets


def pair_sets_from_yaml(path: str | Path) -> list[PairSet]:
    """A user's file: ``{pair_sets: [{name, pairs: [...]}, ...]}`` or ``{pairs: [...]}`` for
    one set (named by its ``name`` field, else the file's stem). Other top-level keys (run
    settings for ``conaclip ablate --config``) are left to the config loader."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: pair-set file not found")
    data = parse_yaml_mapping(path.read_text(), str(path))
    if ("pair_sets" in data) == ("pairs" in data):
        raise InputError(
            f"{path}: expected exactly one of 'pair_sets' (a list of {{name, pairs}}) or "
            f"'pairs' (one set), got keys {', '.join(map(str, data)) or '(none)'}"
        )
    if "pairs" in data:
        entries = [{"name": data.get("name") or path.stem, "pairs": data["pairs"]}]
        where = ""
    else:
        entries, where = data["pair_sets"], "pair_sets"
    sets = _pair_sets(entries, str(path), where)
    check_unique_sets(sets, str(path))
    return sets


def check_unique_sets(sets: Iterable[PairSet], source: str) -> None:
    """The rule for the pair sets of one ablation: each name and each set of pairs (its key)
    once, so a name picks one loss and the table has one row per loss. InputError naming
    ``source`` otherwise."""
    names: dict[str, PairSet] = {}
    keys: dict[str, str] = {}
    for pair_set in sets:
        if pair_set.key() in keys:
            raise InputError(
                f"{source}: pair sets {keys[pair_set.key()]!r} and {pair_set.name!r} have the "
                f"same pairs ({pair_set.key()})"
            )
        if pair_set.name in names:
            raise InputError(f"{source}: pair set name {pair_set.name!r} is used twice")
        names[pair_set.name] = pair_set
        keys[pair_set.key()] = pair_set.name


# ------------------------------------------------------------------------------ internals
def _generated(name: str) -> Preset:
    baseline = baseline_pair_set()
    sets = (baseline, *greedy_candidates(baseline))
    kind: PresetKind = "greedy" if name == "greedy" else "grid"
    # Scored on the EMA of the student, as the demo: docs/results/noise_budget.json.
    settings = {"ema_decay": 0.9} if name == "single_additions" else {}
    return Preset(name, f"{name}: {GENERATED[name]}", sets, baseline, settings, kind)


def _pair_sets(entries: Any, source: str, where: str) -> list[PairSet]:
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{source}: {where}: expected a non-empty list of {{name, pairs}}")
    sets = []
    for index, entry in enumerate(entries):
        field_name = f"{where}[{index}]" if where else "pairs"
        if not isinstance(entry, Mapping) or set(entry) - {"name", "pairs"}:
            raise InputError(f"{source}: {field_name}: expected a mapping with keys name, pairs")
        name, pairs = entry.get("name"), entry.get("pairs")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{source}: {field_name}.name: expected a non-empty string")
        items = [p for p in pairs.split(",") if p.strip()] if isinstance(pairs, str) else pairs
        if not isinstance(items, list) or not items:
            raise InputError(f"{source}: {field_name}.pairs: expected a non-empty list of pairs")
        parsed = [
            _one_pair(item, source, f"{field_name}.pairs[{i}]") for i, item in enumerate(items)
        ]
        try:
            sets.append(PairSet(name.strip(), tuple(parsed)))
        except InputError as error:
            raise InputError(f"{source}: {field_name}: {error}") from None
    return sets


def _one_pair(item: Any, source: str, field_name: str) -> PairConfig:
    if not isinstance(item, str | dict):
        raise InputError(
            f"{source}: {field_name}: expected 'learning_type:strategy[*weight][@temperature]' "
            f"or {{pair, weight, temperature}}, got {item!r}"
        )
    if isinstance(item, str) and "," in item:
        raise InputError(f"{source}: {field_name}: one pair per list item, got {item!r}")
    try:
        return parse_pairs([item])[0]
    except ValidationError as error:
        raise InputError(describe_validation_error(error, f"{source}: {field_name}")) from None
    except InputError as error:
        raise InputError(f"{source}: {field_name}: {error}") from None
    except ValueError:
        raise InputError(
            f"{source}: {field_name}: {item!r} is not learning_type:strategy[*weight]"
            "[@temperature] with numeric weight and temperature"
        ) from None


def _preset_from_mapping(name: str, data: dict[str, Any], source: str) -> Preset:
    known = {"description", "baseline", "settings", "pair_sets", "kind", "margin"}
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise InputError(f"{source}: unknown field {', '.join(unknown)}; known: {sorted(known)}")
    sets = _pair_sets(data.get("pair_sets"), source, "pair_sets")
    check_unique_sets(sets, source)
    baseline = None
    if data.get("baseline") is not None:
        by_name = {s.name: s for s in sets}
        if data["baseline"] not in by_name:
            raise InputError(
                f"{source}: baseline: expected the name of one of the pair sets "
                f"({', '.join(by_name)}), got {data['baseline']!r}"
            )
        baseline = by_name[data["baseline"]]
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise InputError(f"{source}: settings: expected a mapping of run settings")
    kind = data.get("kind", "grid")
    if kind not in ("grid", "greedy"):
        raise InputError(f"{source}: kind: expected grid or greedy, got {kind!r}")
    margin = data.get("margin")
    if margin is not None and (
        isinstance(margin, bool) or not isinstance(margin, int | float) or not margin > 0
    ):
        raise InputError(f"{source}: margin: expected a positive number, got {margin!r}")
    description = str(data.get("description") or name)
    return Preset(
        name, description, tuple(sets), baseline, dict(settings), kind,
        None if margin is None else float(margin),
    )  # fmt: skip
