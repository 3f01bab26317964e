"""Configuration of one distillation (or teacher pre-training) run: the loop's only input.

One pydantic model holds every default, so the CLI, YAML files, Tune search spaces and tests
all agree. A bad value fails validation before any work starts; ``describe_validation_error``
turns pydantic's report into the one-line message the CLI prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainers.errors import InputError
from trainers.graph import parse_pair

PositiveInt = Annotated[int, Field(gt=0)]


class PairConfig(BaseModel):
    """One (learning type, strategy) term of the loss: ``weight x interaction_loss(...)``.

    temperature None means the student's learnable temperature (1 / logit_scale, as in CLIP).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pair: str = Field(description="learning_type:strategy, e.g. intra_ts:infonce")
    weight: float = Field(default=1.0, gt=0)
    temperature: float | None = Field(default=None, gt=0)

    @field_validator("pair")
    @classmethod
    def _valid_pair(cls, value: str) -> str:
        learning_type, strategy = parse_pair(value)
        return f"{learning_type}:{strategy}"

    @property
    def learning_type(self) -> str:
        return self.pair.split(":")[0]

    @property
    def strategy(self) -> str:
        return self.pair.split(":")[1]

    @property
    def metric_name(self) -> str:
        """Metric key of this pair's loss: ``loss_intra_ts_infonce`` (no ':' or '@')."""
        return "loss_" + self.pair.replace(":", "_")


def parse_pairs(spec: str | list[Any]) -> list[PairConfig]:
    """``"intra_ts:infonce,inter_ss:kl*0.5"`` or a list of strings/dicts -> PairConfigs.

    In the string form ``*W`` sets a weight and ``@T`` a fixed temperature:
    ``inter_ss:kl*2@0.05``.
    """
    items = [p for p in spec.split(",") if p.strip()] if isinstance(spec, str) else list(spec)
    pairs = []
    for item in items:
        if isinstance(item, PairConfig):
            pairs.append(item)
        elif isinstance(item, dict):
            pairs.append(PairConfig(**item))
        else:
            text, _, temperature = str(item).partition("@")
            text, _, weight = text.partition("*")
            fields: dict[str, Any] = {"pair": text.strip()}
            if weight:
                fields["weight"] = float(weight)
            if temperature:
                fields["temperature"] = float(temperature)
            pairs.append(PairConfig(**fields))
    return pairs


class DistillConfig(BaseModel):
    """Everything one run needs. Paths are strings so the config travels through Ray as JSON."""

    model_config = ConfigDict(extra="forbid")

    pairs: list[PairConfig] = Field(
        default_factory=lambda: [PairConfig(pair="intra_ts:infonce")],
        description="loss terms; teacher pre-training is [inter_ss:infonce] with no teacher",
    )
    student: str = "conaclip-student-s"
    teacher: str | None = "conaclip-teacher"
    teacher_checkpoint: str | None = None
    train_shards: str = ""
    eval_shards: str = ""
    teacher_cache: str | None = Field(
        default=None, description="dir of a teacher-embedding cache built for train_shards"
    )
    steps: PositiveInt = 300
    batch_size: PositiveInt = Field(default=64, description="per worker")
    eval_every: PositiveInt = 100
    eval_batch_size: PositiveInt = 256
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    loader_workers: int = Field(default=1, ge=0, description="DataLoader processes per worker")
    shuffle_buffer: int = Field(default=1000, ge=0)
    resampled: bool = Field(
        default=True,
        description="draw shards with replacement (fixed epoch; DDP-safe); False = plain passes",
    )
    global_batch: bool = Field(
        default=True, description="similarity matrices over the all-gathered global batch"
    )
    amp: bool = Field(default=False, description="bfloat16 autocast on GPU; ignored on CPU")
    torch_threads: int | None = Field(default=None, ge=1)
    out_dir: str = Field(default="", description="where checkpoints go when run without Ray")

    @field_validator("pairs", mode="before")
    @classmethod
    def _pairs_from_text(cls, value: Any) -> Any:
        return parse_pairs(value) if isinstance(value, str | list) else value

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if not self.pairs:
            raise ValueError("pairs: at least one learning_type:strategy pair is needed")
        names = [p.pair for p in self.pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"pairs: each pair may appear once, got {', '.join(names)}")
        if self.needs_teacher and not self.teacher:
            raise ValueError(
                f"teacher: pairs {', '.join(p.pair for p in self.teacher_pairs)} need a teacher"
            )
        if self.eval_every > self.steps:
            self.eval_every = self.steps
        return self

    @property
    def teacher_pairs(self) -> list[PairConfig]:
        from trainers.graph import nodes_needed

        return [
            p for p in self.pairs if {"TI", "TT"} & set(nodes_needed(p.learning_type, p.strategy))
        ]

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_pairs)


def describe_validation_error(error: ValidationError, source: str | Path = "config") -> str:
    """pydantic's multi-line report -> one line naming the source, each field and the problem."""
    parts = []
    for item in error.errors():
        field = ".".join(str(x) for x in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        parts.append(f"{field}: {message}")
    return f"{source}: " + "; ".join(parts)


def load_distill_config(values: dict[str, Any], source: str | Path = "config") -> DistillConfig:
    """Validate ``values``; InputError with a one-line message on any problem."""
    try:
        return DistillConfig.model_validate(values)
    except ValidationError as error:
        raise InputError(describe_validation_error(error, source)) from None
    except InputError as error:
        raise InputError(f"{source}: {error}") from None
