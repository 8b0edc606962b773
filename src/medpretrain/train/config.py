"""Fine-tuning hyper-parameters and the step plan derived from them and the labelled-set size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medpretrain.augment import ViewRecipe


class FinetuneConfig(BaseModel):
    """Fine-tuning hyper-parameters; the defaults were chosen by measurement (BENCHMARKS.md, "Fine-tuning").

    - Length: `max(min_steps, epochs × batches per epoch)` optimiser steps, batch `min(batch_size, labels)`.
    - Selection: validation every ~1/`evals` of training (rounded to whole epochs), early stop after
      `patience` evaluations without a better validation AUC (0 = never stop early).
    - `lr`: one value or a grid; each is trained in full and the best on validation is kept.
      `pretrained_backbone_lr_scale` multiplies the backbone's lr for inits that carry weights (not scratch).
    - `optimizer`/`schedule`: AdamW with warm-up + cosine (default), or Adam with the lr cut by `gamma` at
      `milestones` (fractions of training; the MedMNIST v2 recipe is 0.5 and 0.75 of 100 epochs).
    - `augment: false` turns every augmentation off. The flip probability is not a fine-tuning parameter:
      it is the study's (`hflip`), by default the dataset's own (`Dataset.default_hflip`: 0 where class names
      mark laterality), so pre-training and fine-tuning of one study flip alike.
    - `max_time` (seconds) stops training early; the best evaluation so far is still the one kept.
    - `train_eval_max` caps the un-augmented pass over the labelled subset for the overfitting gap.
    - `mitigation` for imbalanced classes (medpretrain.mitigations: class_weighted, balanced_sampler,
      logit_adjustment with `tau`); `class_weighted: true` is the older spelling of `mitigation: class_weighted`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(10, ge=1)
    min_steps: int = Field(500, ge=0)
    lr: tuple[float, ...] = (1e-3, 1e-4)
    pretrained_backbone_lr_scale: float = Field(1.0, gt=0, le=1)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: int = Field(128, ge=2)
    optimizer: Literal["adamw", "adam"] = "adamw"
    schedule: Literal["cosine", "multistep"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = Field(0.1, gt=0, le=1)
    evals: int = Field(20, ge=1)
    patience: int = Field(6, ge=0)
    class_weighted: bool = False
    mitigation: str = "none"
    tau: float = Field(1.0, ge=0)
    augment: bool = True
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    max_time: float | None = Field(None, gt=0)
    crop_scale_min: float = Field(0.8, gt=0, le=1)
    rotation: float = Field(10.0, ge=0, le=180)
    jitter: float = Field(0.1, ge=0, lt=1)
    precision: str = "auto"  # Lightning precision; "auto" = fp32 on CPU, mixed on GPU (train.trainer)
    eval_batch_size: int = Field(512, ge=1)
    train_eval_max: int = Field(5_000, ge=1)

    @field_validator("lr", mode="before")
    @classmethod
    def _grid(cls, value: Any) -> Any:
        return (value,) if isinstance(value, int | float) else value

    @field_validator("lr")
    @classmethod
    def _positive(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if not values or any(v <= 0 for v in values):
            raise ValueError(f"lr must be a positive number or a non-empty list of them, got {list(values)}")
        return tuple(dict.fromkeys(values))

    @model_validator(mode="before")
    @classmethod
    def _one_mitigation(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("class_weighted"):
            if data.get("mitigation", "none") not in ("none", "class_weighted"):
                raise ValueError("class_weighted is the mitigation 'class_weighted': give one mitigation, not two")
            data = {**data, "mitigation": "class_weighted"}
        return data

    @field_validator("mitigation")
    @classmethod
    def _known_mitigation(cls, value: str) -> str:
        from medpretrain.mitigations import MITIGATIONS

        if value not in MITIGATIONS:
            raise ValueError(f"unknown mitigation '{value}'; allowed: {', '.join(MITIGATIONS.names())}")
        return value

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: str) -> str:
        from medpretrain.train.trainer import PRECISIONS

        if value not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{value}'")
        return value

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < v < 1 for v in values):
            raise ValueError(f"milestones are fractions of training in (0, 1), got {list(values)}")
        return tuple(sorted(values))

    def recipe(self, hflip: float) -> ViewRecipe | None:
        """The training views (None when augmentation is off); intensity jitter is modality-aware."""
        if not self.augment:
            return None
        return ViewRecipe(
            crop_scale=(self.crop_scale_min, 1.0),
            hflip=hflip,
            rotation=self.rotation,
            brightness=self.jitter,
            contrast=self.jitter,
        )

    def augmentation(self, hflip: float) -> dict[str, Any]:
        """What the training views do, as stored per row: at least the flip probability."""
        if not self.augment:
            return {"hflip": 0.0, "crop_scale_min": 1.0, "rotation": 0.0, "jitter": 0.0}
        return {"hflip": hflip, "crop_scale_min": self.crop_scale_min, "rotation": self.rotation, "jitter": self.jitter}


@dataclass(frozen=True)
class StepPlan:
    """How long one fine-tuning run is and when it is validated, from the labelled-set size."""

    batch_size: int
    drop_last: bool
    steps_per_epoch: int
    total_steps: int
    eval_every: int  # in steps, a whole number of epochs
    warmup_steps: int

    @classmethod
    def of(cls, n_labeled: int, cfg: FinetuneConfig) -> StepPlan:
        batch_size = min(cfg.batch_size, n_labeled)
        # A trailing batch of one sample breaks batch norm in training mode; drop only that case.
        drop_last = n_labeled % batch_size == 1
        steps_per_epoch = max(1, n_labeled // batch_size if drop_last else math.ceil(n_labeled / batch_size))
        total = max(cfg.min_steps, cfg.epochs * steps_per_epoch)
        epochs_between = max(1, math.ceil(total / cfg.evals / steps_per_epoch))
        # Warm-up: `warmup_epochs` or `warmup_fraction` of training, whichever is longer, at most a quarter.
        warmup = max(round(cfg.warmup_epochs * steps_per_epoch), round(cfg.warmup_fraction * total))
        eval_every = epochs_between * steps_per_epoch
        return cls(batch_size, drop_last, steps_per_epoch, total, eval_every, min(warmup, total // 4))


__all__ = ["FinetuneConfig", "StepPlan"]
