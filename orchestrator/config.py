"""Configuration of a command: YAML file + command-line flags -> validated pydantic models.

One place for defaults: the run itself is ``trainers.run_config.DistillConfig``; how it is
spread over Ray workers is ``orchestrator.trial.ScalingSpec``; where built-in assets live is
``Workspace``. A YAML file is flat: any field of those models at the top level (``workers`` is
``num_workers``). Flags given on the command line override the file. Every problem becomes one
``InputError`` line naming the file and field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.trial import ScalingSpec
from trainers.errors import InputError
from trainers.run_config import DistillConfig, describe_validation_error
from trainers.yaml_input import parse_yaml_mapping

ALIASES = {"workers": "num_workers"}


class Workspace(BaseModel):
    """Where built-in data and the built-in teacher are generated on first use and reused."""

    model_config = ConfigDict(extra="forbid")

    home: Path = Field(
        default_factory=lambda: Path(
            os.environ.get("CONACLIP_HOME", Path.home() / ".cache" / "conaclip")
        )
    )

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def teacher_dir(self) -> Path:
        return self.home / "teachers"

    @property
    def cache_dir(self) -> Path:
        return self.home / "teacher-cache"

    @property
    def eval_cache_dir(self) -> Path:
        return self.home / "eval-cache"


class RunSettings(BaseModel):
    """A run, how it scales, and whether trials read teacher embeddings from the cache."""

    model_config = ConfigDict(extra="forbid")

    run: DistillConfig
    scaling: ScalingSpec
    use_teacher_cache: bool = True


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; InputError naming the file (and line) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    data = parse_yaml_mapping(path.read_text(), str(path), "a mapping of field: value")
    return {ALIASES.get(str(key), str(key)): value for key, value in data.items()}


def build_settings(
    file_values: dict[str, Any], overrides: dict[str, Any], source: str = "config"
) -> RunSettings:
    """Merge flags over the file and validate; one-line InputError on any bad field."""
    merged = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    merged = {ALIASES.get(key, key): value for key, value in merged.items()}
    run_fields = set(DistillConfig.model_fields)
    scaling_fields = set(ScalingSpec.model_fields)
    known = run_fields | scaling_fields | {"use_teacher_cache"}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise InputError(
            f"{source}: unknown field {', '.join(unknown)}; known fields: "
            f"{', '.join(sorted(known))}"
        )
    values = {
        "run": {k: v for k, v in merged.items() if k in run_fields},
        "scaling": {k: v for k, v in merged.items() if k in scaling_fields},
    }
    if "use_teacher_cache" in merged:
        values["use_teacher_cache"] = merged["use_teacher_cache"]
    try:
        return RunSettings.model_validate(values)
    except ValidationError as error:
        message = describe_validation_error(error, source)
        # Drop the internal grouping so the field reads as the user wrote it.
        raise InputError(message.replace("run.", "").replace("scaling.", "")) from None
