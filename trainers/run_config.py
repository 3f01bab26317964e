"""Configuration of one distillation (or teacher pre-training) run: the loop's only input.

One pydantic model holds every default, so the CLI, YAML files, Tune search spaces and tests
all agree. A bad value fails validation before any work starts; ``describe_validation_error``
turns pydantic's report into the one-line message the CLI prints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainers.errors import InputError
from trainers.graph import (
    DEFAULT_SYM_ORIENTATION,
    SymOrientation,
    nodes_needed,
    parse_pair,
    strategy_spec,
)

PositiveInt = Annotated[int, Field(gt=0)]
AUTO = "auto"
LEARNABLE = "learnable"
# The distillation temperature of the KL-family strategies (kl, sym_kl): it softens similarity
# rows into the distributions to be matched (Hinton), and is a setting of the loss, not the
# student's contrastive temperature. At the student's learnable temperature (~0.067 after a
# short run) inter_ts:sym_kl collapses below chance; docs/method.md tables the measurement
# behind this default. No t^2 factor is applied: see docs/method.md, "Temperatures".
KD_TEMPERATURE = 0.1
# Fair cells: an auto-weighted pair gets this share of the gradient norm of the fixed-weight
# pairs (the baseline), measured over BALANCE_STEPS steps right after warm-up.
BALANCE_SHARE = 0.5
BALANCE_STEPS = 5


def _positive_or(value: Any, word: str) -> Any:
    # One clear message instead of pydantic's one-per-union-member report.
    if value == word:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"Input should be greater than 0 or '{word}', got {value!r}")
    return float(value)


class PairConfig(BaseModel):
    """One (learning type, strategy) term of the loss: ``weight x interaction_loss(...)``.

    weight: a positive float, or "auto": chosen inside the run so that this pair's gradient
    norm is ``balance_share`` x the gradient norm of the pairs with numeric weights, measured
    right after warm-up (the pair is off until then; see DistillConfig).
    temperature: a positive float, "learnable" (the student's 1 / logit_scale, as in CLIP), or
    None for the strategy's default: learnable for infonce, ``kd_temperature`` for kl and
    sym_kl; fd, sd and sym_sd read no temperature.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pair: str = Field(description="learning_type:strategy, e.g. intra_ts:infonce")
    weight: float | Literal["auto"] = 1.0
    temperature: float | Literal["learnable"] | None = None

    @field_validator("weight", mode="before")
    @classmethod
    def _weight(cls, value: Any) -> Any:
        return _positive_or(value, AUTO)

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature(cls, value: Any) -> Any:
        return None if value is None else _positive_or(value, LEARNABLE)

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
        return "loss_" + self.slug

    @property
    def slug(self) -> str:
        """``intra_ts_infonce``: the pair as a metric-name fragment."""
        return self.pair.replace(":", "_")

    @property
    def is_auto(self) -> bool:
        return self.weight == AUTO

    @property
    def needs_teacher(self) -> bool:
        """Whether this pair's loss reads a teacher node (TI or TT)."""
        return bool({"TI", "TT"} & set(nodes_needed(self.learning_type, self.strategy)))


def repeated_pairs(pairs: list[PairConfig] | tuple[PairConfig, ...]) -> list[str]:
    """The pairs (``learning_type:strategy``) that occur more than once in ``pairs``, sorted:
    the one rule for a loss, as a pair's weight and temperature apply to its term once."""
    names = [p.pair for p in pairs]
    return sorted({name for name in names if names.count(name) > 1})


def _number(value: float) -> str:
    # Shortest text that parses back to the same float (repr), without a trailing ".0".
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def pair_text(pair: PairConfig) -> str:
    """``intra_ts:fd*2000@0.05``: the string form ``parse_pairs`` reads; defaults omitted."""
    text = pair.pair
    if pair.weight != 1.0:
        text += "*auto" if pair.is_auto else f"*{_number(pair.weight)}"
    if pair.temperature is not None:
        learnable = isinstance(pair.temperature, str)
        text += f"@{pair.temperature}" if learnable else f"@{_number(pair.temperature)}"
    return text


def parse_pairs(spec: str | list[Any]) -> list[PairConfig]:
    """``"intra_ts:infonce,inter_ss:kl*0.5"`` or a list of strings/dicts -> PairConfigs.

    In the string form ``*W`` sets a weight (``*auto``: the gradient-share rule) and ``@T`` a
    temperature (``@learnable``: the student's own): ``inter_ss:kl*2@0.05``.
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
                fields["weight"] = AUTO if weight.strip() == AUTO else float(weight)
            if temperature:
                text_t = temperature.strip()
                fields["temperature"] = LEARNABLE if text_t == LEARNABLE else float(text_t)
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
    teacher: str | None = Field(
        default="conaclip-teacher",
        description="built-in config, open_clip architecture, or an open_clip model config .json",
    )
    teacher_checkpoint: str | None = None
    train_shards: str = ""
    eval_shards: str = ""
    teacher_cache: str | None = Field(
        default=None, description="dir of a teacher-embedding cache built for train_shards"
    )
    eval_cache: str | None = Field(
        default=None,
        description="dir where the decoded eval set is kept for every trial that preprocesses "
        "alike (trainers/eval_cache.py); None decodes the eval shards in each run",
    )
    steps: PositiveInt = 300
    batch_size: PositiveInt = Field(default=64, description="per worker")
    eval_every: PositiveInt = 100
    eval_batch_size: PositiveInt = 256
    eval_fold_size: PositiveInt | None = Field(
        default=1000,
        description="rank each eval query within consecutive folds of this many images and "
        "their captions, recalls averaged over all queries (COCO's 1k protocol: rsum keeps its "
        "scale on bigger eval sets); the set must split into whole folds or be at most one; "
        "None ranks the whole set",
    )
    eval_max_images: PositiveInt | None = Field(
        default=None,
        description="score only the eval set's first this many images and their captions "
        "(a quicker eval where its noise does not matter, e.g. a teacher's report); None: all",
    )
    ema_decay: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="evaluate (and export) an exponential moving average of the student's "
        "parameters and buffers with this decay, updated after every optimizer step; None: "
        "the student itself",
    )
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
    kd_temperature: float = Field(
        default=KD_TEMPERATURE, gt=0, description="default temperature of kl and sym_kl pairs"
    )
    sym_orientation: SymOrientation = Field(
        default=DEFAULT_SYM_ORIENTATION, description="how Sym strategies read inter_ts partners"
    )
    balance_share: float = Field(
        default=BALANCE_SHARE, gt=0, description="gradient-norm share of each *auto pair"
    )
    balance_after: int | None = Field(
        default=None, ge=0, description="step where *auto weights are measured (None: warm-up)"
    )
    balance_steps: int = Field(default=BALANCE_STEPS, ge=1, description="steps averaged")
    amp: bool = Field(
        default=False,
        description="bfloat16 autocast of forward and losses (a GPU, or a CPU with AVX-512 "
        "BF16 or AMX: slower elsewhere); weights and optimizer state stay float32",
    )
    torch_threads: int | None = Field(default=None, ge=1)
    out_dir: str = Field(default="", description="where checkpoints go when run without Ray")

    # Files are read again in Ray workers, whose working directory is not the CLI's (Tune runs
    # each trial in a folder of its own): relative paths are made absolute where they are given.
    @field_validator("teacher")
    @classmethod
    def _config_file_absolute(cls, value: str | None) -> str | None:
        if value and value.endswith(".json"):  # trainers.models.is_config_file, without torch
            path = os.path.abspath(os.path.expanduser(value))
            if not os.path.isfile(path):
                raise ValueError(f"model config file {path} not found (an open_clip model .json)")
            return path
        return value

    @field_validator("teacher_checkpoint", "teacher_cache", "eval_cache", "out_dir")
    @classmethod
    def _path_absolute(cls, value: str | None) -> str | None:
        return os.path.abspath(os.path.expanduser(value)) if value else value

    @field_validator("train_shards", "eval_shards")
    @classmethod
    def _shards_absolute(cls, value: str) -> str:
        from trainers.shards import absolute_spec  # webdataset and PIL: only when shards are set

        return absolute_spec(value)

    @field_validator("pairs", mode="before")
    @classmethod
    def _pairs_from_text(cls, value: Any) -> Any:
        return parse_pairs(value) if isinstance(value, str | list) else value

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if not self.pairs:
            raise ValueError("pairs: at least one learning_type:strategy pair is needed")
        if repeated_pairs(self.pairs):
            names = ", ".join(p.pair for p in self.pairs)
            raise ValueError(f"pairs: each pair may appear once, got {names}")
        if any(p.is_auto for p in self.pairs) and all(p.is_auto for p in self.pairs):
            raise ValueError(
                "pairs: weight auto is a share of the fixed-weight pairs' gradient; at least "
                "one pair needs a numeric weight"
            )
        if any(p.is_auto for p in self.pairs) and self.balance_step >= self.steps - 1:
            raise ValueError(
                f"balance_after: *auto weights are measured from step {self.balance_step}, but "
                f"the run has {self.steps} steps; expected a step below {self.steps - 1}"
            )
        if self.needs_teacher and not self.teacher:
            raise ValueError(
                f"teacher: pairs {', '.join(p.pair for p in self.teacher_pairs)} need a teacher"
            )
        if self.eval_every > self.steps:
            self.eval_every = self.steps
        return self

    @property
    def teacher_pairs(self) -> list[PairConfig]:
        return [p for p in self.pairs if p.needs_teacher]

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_pairs)

    @property
    def balance_step(self) -> int:
        """First step whose gradients measure the *auto weights: ``balance_after``, by default
        the end of warm-up (or mid-run for runs shorter than twice their warm-up)."""
        if self.balance_after is not None:
            return self.balance_after
        return min(self.warmup_steps, self.steps // 2)

    @property
    def balance_window(self) -> int:
        """Steps averaged for the *auto weights: ``balance_steps``, fewer when the run would
        otherwise end before its auto pairs are switched on."""
        return max(1, min(self.balance_steps, self.steps - self.balance_step - 1))

    def temperature_of(self, pair: PairConfig) -> float | Literal["learnable"] | None:
        """The temperature ``pair`` trains at: its own, else its strategy's default; None for
        strategies that read none (fd, sd, sym_sd)."""
        if not strategy_spec(pair.strategy).uses_temperature:
            return None
        if pair.temperature is not None:
            return pair.temperature
        return LEARNABLE if pair.strategy == "infonce" else self.kd_temperature


# Fields that name files and folders on the machine that ran (filled in there by
# orchestrator.assets): a recipe meant for another run leaves them to that run's own flags.
LOCATION_FIELDS = frozenset(
    ("train_shards", "eval_shards", "teacher_checkpoint", "teacher_cache", "eval_cache", "out_dir")
)


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
