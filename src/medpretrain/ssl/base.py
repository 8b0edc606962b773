"""What a self-supervised method is, and the registry that names them.

A method is a small `nn.Module` composed from lightly's pieces (heads, losses, memory banks, schedules)
around our `Backbone`: it makes its views of a uint8 batch on the training device, computes its loss,
updates its momentum encoders after each step, and says which optimiser its paper prescribes. The one
training loop (`medpretrain.pretrain.PretrainModule`) does everything else: data, epochs, checkpoints,
resume, logging, AMP/DDP.

The loop hands a method the length of its run once, before the first step, as a `TrainingClock`
(`Method.start`); epoch-based schedules (DINO's teacher temperature and last-layer freeze, SwAV's queue and
prototype freeze, the VAE's KL warm-up) read `self.clock` instead of each capturing it on its own.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from torch import nn

from medpretrain.augment import ViewRecipe
from medpretrain.backbones import Backbone
from medpretrain.errors import MedpretrainError
from medpretrain.registry import Registry
from medpretrain.train import param_groups, warmup_cosine


def _crop_scale(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not 0 < low <= high <= 1:
        raise ValueError(f"a crop scale is (min, max) area fractions with 0 < min ≤ max ≤ 1, got {list(value)}")
    return value


# A random-resized-crop area range, checked where the study is validated: `ViewRecipe` would otherwise refuse a
# bad one only when the method is built, mid-study, after everything else had been accepted.
CropScale = Annotated[tuple[float, float], AfterValidator(_crop_scale)]


class MethodConfig(BaseModel):
    """Hyper-parameters every method has; each method subclasses this with its own fields and defaults.

    `lr` is the base learning rate for a batch of 256 and is scaled linearly with the batch size
    (Goyal et al., 2017), as the papers do.
    """

    model_config = ConfigDict(extra="forbid")

    batch_size: int = 256
    optimizer: Literal["lars", "sgd", "adamw", "adam"] = "sgd"
    lr: float = 0.06
    weight_decay: float = 5e-4
    momentum: float = 0.9  # SGD/LARS momentum
    beta2: float = Field(0.999, gt=0, lt=1, description="Adam/AdamW β₂")
    warmup_epochs: int = 1


@dataclass(frozen=True)
class TrainingClock:
    """The length of a training run in optimiser steps, handed to a method once before its first step.

    `steps_per_epoch == 0` means the length is unknown (a method driven outside the loop without `start`):
    epoch-based schedules then count as finished, so nothing stays frozen or warming up forever.
    """

    total_steps: int = 0
    steps_per_epoch: int = 0

    def steps(self, epochs: float) -> int:
        """Optimiser steps in `epochs` epochs (0 while the epoch length is unknown)."""
        return round(epochs * self.steps_per_epoch)

    def epoch(self, step: int) -> float:
        """Epochs completed after `step` optimiser steps (infinite while the epoch length is unknown)."""
        return step / self.steps_per_epoch if self.steps_per_epoch > 0 else math.inf


@dataclass
class StepOutput:
    """The loss to minimise and an embedding of the first view (N, D) for the collapse monitor."""

    loss: torch.Tensor
    embedding: torch.Tensor


class Method(nn.Module, ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    family: ClassVar[str]  # "contrastive", "non-contrastive", "distillation", "masked", "generative"
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    backbone_families: ClassVar[tuple[str, ...]] = ("resnet", "efficientnet", "vit")
    # True for methods whose `step` itself follows epoch-based schedules (DINO, SwAV): the optimiser steps done
    # are then a buffer, so a resumed run's first step continues those schedules where the interrupted run
    # stopped (the loop reports the step count only after a step, in `after_step`). The clock's epoch length is
    # recorded beside it: both have always been in these methods' resume checkpoints.
    tracks_position: ClassVar[bool] = False
    optimizer_steps: torch.Tensor
    steps_per_epoch: torch.Tensor

    def __init__(self, backbone: Backbone, config: MethodConfig, *, channels: int, image_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.channels = channels
        self.image_size = image_size
        self.clock = TrainingClock()  # unknown until `start`
        if self.tracks_position:
            self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.long))
            self.register_buffer("steps_per_epoch", torch.zeros((), dtype=torch.long))

    def set_hflip(self, probability: float) -> None:
        """Use `probability` for the horizontal flip of every view this method makes.

        Methods build their views with the usual 0.5; datasets whose classes mark laterality (left/right organs)
        need 0, or pre-training teaches the network to ignore the side that tells two classes apart. Done here
        once for every method rather than as a field of each config: the flip is the data's property, not a
        hyper-parameter of the method.
        """
        for name, value in list(vars(self).items()):
            if isinstance(value, ViewRecipe):
                setattr(self, name, value.with_(hflip=probability))
            elif isinstance(value, tuple | list) and value and all(isinstance(v, ViewRecipe) for v in value):
                setattr(self, name, type(value)(v.with_(hflip=probability) for v in value))

    def start(self, clock: TrainingClock) -> None:
        """Called by the training loop before the first step (again on resume) with the length of the run."""
        self.clock = clock
        if self.tracks_position:
            self.steps_per_epoch.fill_(clock.steps_per_epoch)

    @property
    def steps_done(self) -> int:
        """Optimiser steps completed so far (methods with `tracks_position` only)."""
        return int(self.optimizer_steps)

    @abstractmethod
    def views(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Augmented views of a uint8 batch already on the training device (float in [0, 1])."""

    @abstractmethod
    def step(self, views: list[torch.Tensor]) -> StepOutput:
        """Forward pass and loss for one batch of views."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step with the number of steps completed: momentum-encoder updates,
        schedules. Default: record the position (methods with `tracks_position`); overrides call this too."""
        if self.tracks_position:
            self.optimizer_steps.fill_(step)

    def finalize(self, images: torch.Tensor, device: torch.device) -> None:
        """Called once after the last epoch, before the checkpoint is written, with the (uint8) pre-training
        images and the device to use. Default: nothing."""

    def optimized_parameters(self) -> Iterable[nn.Parameter]:
        """Everything trainable except momentum (teacher) copies, which are updated by EMA."""
        return (p for p in self.parameters() if p.requires_grad)

    def configure_optimizers(self, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
        """The optimiser the method's paper prescribes, with linear warm-up and cosine decay per step.

        Builds the optimiser only: the run's length reaches the method through `start`, not as a side effect.
        """
        cfg = self.config
        lr = cfg.lr * cfg.batch_size / 256
        groups = param_groups(self.optimized_parameters(), cfg.weight_decay)
        optimizer: torch.optim.Optimizer
        if cfg.optimizer == "lars":
            from lightly.utils.lars import LARS

            # lightly's LARS leaves groups without weight decay (biases, norms) unadapted, as the papers do.
            optimizer = LARS(groups, lr=lr, momentum=cfg.momentum)
        elif cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
        elif cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, cfg.beta2))
        else:
            optimizer = torch.optim.Adam(groups, lr=lr, betas=(0.9, cfg.beta2))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(total_steps, cfg.warmup_epochs * steps_per_epoch)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class SymmetricTwoViewMethod(Method):
    """Two views through the same backbone and projection head, one loss between the projections.

    SimCLR, Barlow Twins and VICReg differ only in their head, their loss and their view recipes; subclasses
    set `projection_head`, `criterion` and `recipes` (one recipe per view).
    """

    projection_head: nn.Module
    criterion: nn.Module
    recipes: tuple[ViewRecipe, ViewRecipe]

    def views(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return [recipe(batch, generator=generator) for recipe in self.recipes]

    def step(self, views: list[torch.Tensor]) -> StepOutput:
        h0 = self.backbone(views[0])
        z0, z1 = self.projection_head(h0), self.projection_head(self.backbone(views[1]))
        # The loss runs in float32 even under AMP: low-precision similarities and correlations overflow.
        with torch.autocast(device_type=z0.device.type, enabled=False):
            loss = self.criterion(z0.float(), z1.float())
        return StepOutput(loss=loss, embedding=h0.detach())


METHODS: Registry[type[Method]] = Registry("method")
register_method = METHODS.decorator(lambda cls: cls)


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def method_config(name: str, overrides: dict[str, Any] | None = None) -> MethodConfig:
    """The method's defaults with `overrides` applied; an unknown or invalid key names the allowed ones."""
    cls = get_method(name)
    try:
        return cls.config_class(**(overrides or {}))
    except Exception as err:  # pydantic's ValidationError, reported as one line
        allowed = ", ".join(cls.config_class.model_fields)
        first = str(err).splitlines()
        raise MedpretrainError(
            f"invalid hyper-parameters for {name}: {' '.join(first[:3])}", f"allowed keys: {allowed}"
        ) from None
