"""The parts of a study file below its top level: pre-trainings, label budgets and dataset subsets.

Each is a pydantic model validated against the registries (SSL methods, init kinds, datasets), so a typo fails
when the study is read, with the key named. `medpretrain.study` assembles them into a `Study`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medpretrain.errors import MedpretrainError

Ratio = Annotated[float, Field(ge=1)]


class Pretraining(BaseModel):
    """An init that the runner pre-trains first (once; the checkpoint is content-addressed and reused)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    epochs: int = Field(gt=0)
    init: str = "scratch"  # scratch, imagenet or a checkpoint: "ImageNet, then self-supervised on the domain"
    unlabeled_from: str | None = None  # pre-train on another dataset / image folder (domain-mismatch studies)
    seed: int = Field(0, ge=0)
    hparams: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from medpretrain.ssl import METHODS

        return member(value, METHODS, "method")

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        return check_init_text(value, start=True)

    @model_validator(mode="after")
    def _valid_hparams(self) -> Pretraining:
        from medpretrain.ssl import method_config

        try:
            method_config(self.method, self.hparams)
        except MedpretrainError as err:
            raise ValueError(f"{err.message}; {err.hint}") from None
        return self

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        start = {"scratch": "", "imagenet": "ImageNet→"}.get(self.init.lower(), f"{Path(self.init).stem}→")
        source = f" on {self.unlabeled_from}" if self.unlabeled_from else ""
        return f"{start}{self.method} ({self.epochs} ep{source})"


class Budgets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fractions: list[float] = Field(default_factory=list)
    shots: list[int] = Field(default_factory=list)
    # Exactly r:1 between the most and the least frequent class of the labelled subset (budgets.allocate), 1 =
    # balanced; a list gives one budget per ratio (null in it: the data's own class frequencies).
    imbalance: Ratio | list[Ratio | None] | None = None

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not 0 < v <= 1]
        if bad:
            raise ValueError(f"fractions must be in (0, 1], got {bad}")
        return sorted(set(values))

    @field_validator("shots")
    @classmethod
    def _shots(cls, values: list[int]) -> list[int]:
        bad = [v for v in values if v < 1]
        if bad:
            raise ValueError(f"shots (labeled images per class) must be ≥ 1, got {bad}")
        return sorted(set(values))

    @model_validator(mode="after")
    def _some(self) -> Budgets:
        if not self.fractions and not self.shots:
            raise ValueError("give at least one of fractions or shots, e.g. {fractions: [0.01, 0.1, 1.0]}")
        return self


class DatasetEntry(BaseModel):
    """A dataset, optionally limited to a fixed stratified subset per split (quick studies)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    train: int | None = Field(None, ge=1)
    val: int | None = Field(None, ge=1)
    test: int | None = Field(None, ge=1)

    @property
    def spec(self) -> str:
        from medpretrain.data import subset_spec

        return subset_spec(self.name, {"train": self.train, "val": self.val, "test": self.test})


def is_init_text(value: str) -> bool:
    try:
        check_init_text(value)
    except ValueError:
        return False
    return True


def member(value: str, registry: Any, what: str) -> str:
    if value not in registry:
        raise ValueError(f"unknown {what} '{value}'; allowed: {', '.join(sorted(registry))}")
    return value


def check_init_text(value: str, *, start: bool = False) -> str:
    from medpretrain.inits import init_text

    try:
        return init_text(value, start=start)  # the init-kind registry decides what an init is
    except MedpretrainError as err:
        raise ValueError(f"{err.message}; {err.hint}") from None
