"""A YAML document that must be a mapping, read into a dict with one-line errors: the one reader
of the run config files (``orchestrator.config``) and the preset and pair-set files
(``search_spaces.presets``). It lives in ``trainers`` because both of those may import it."""

from __future__ import annotations

from typing import Any

import yaml

from trainers.errors import InputError


def parse_yaml_mapping(
    text: str, source: str, expected: str = "a mapping at the top level"
) -> dict[str, Any]:
    """The mapping ``text`` holds (an empty document is ``{}``), keys as YAML typed them.

    ``InputError`` naming ``source``: ``"<source>: line <n>: not valid YAML (<problem>)"`` when
    the text does not parse, ``"<source>: expected <expected>, got <type>"`` when the document
    is not a mapping."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise InputError(f"{source}:{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected {expected}, got {type(data).__name__}")
    return data
