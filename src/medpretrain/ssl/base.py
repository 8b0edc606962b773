"""What a self-supervised method is, and the registry that names them.

A method is a small `nn.Module` composed from lightly's pieces (heads, losses, memory banks, schedules)
around our `Backbone`: it makes its views of a uint8 batch on the training device, computes its loss,
updates its momentum encoders after each step, and says which optimiser its paper prescribes. The one
training loop (`medpretrain.train.pretrain`) does everything else: data, epochs, checkpoints, resume,
logging, AMP/DDP.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from lightly.models.utils import deactivate_requires_grad
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from medpretrain.augment import ViewRecipe
from medpretrain.backbones import Backbone
from medpretrain.errors import MedpretrainError
from medpretrain.train import warmup_cosine


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


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` for a momentum (key/target/teacher) encoder: lightly's `update_momentum`
    moves it, the optimiser never does."""
    twin = copy.deepcopy(module)
    deactivate_requires_grad(twin)
    return twin


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

    def __init__(self, backbone: Backbone, config: MethodConfig, *, channels: int, image_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.channels = channels
        self.image_size = image_size

    @abstractmethod
    def views(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Augmented views of a uint8 batch already on the training device (float in [0, 1])."""

    @abstractmethod
    def step(self, views: list[torch.Tensor]) -> StepOutput:
        """Forward pass and loss for one batch of views."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step: momentum-encoder updates, schedules. Default: nothing."""

    def finalize(self, images: torch.Tensor, device: torch.device) -> None:
        """Called once after the last epoch, before the checkpoint is written, with the (uint8) pre-training
        images and the device to use. Default: nothing."""

    def optimized_parameters(self) -> Iterable[nn.Parameter]:
        """Everything trainable except momentum (teacher) copies, which are updated by EMA."""
        return (p for p in self.parameters() if p.requires_grad)

    def configure_optimizers(self, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
        """The optimiser the method's paper prescribes, with linear warm-up and cosine decay per step."""
        cfg = self.config
        lr = cfg.lr * cfg.batch_size / 256
        decay, no_decay = [], []
        for p in self.optimized_parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise MedpretrainError(f"unknown method '{name}'", f"choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


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
