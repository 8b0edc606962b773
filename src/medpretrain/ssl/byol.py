"""BYOL (Grill et al., 2020): an online network predicts a momentum target network's projection of another view."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
from pydantic import Field
from torch import nn

from medpretrain.augment import byol_view_pair, contrastive_recipe
from medpretrain.backbones import Backbone
from medpretrain.ssl.base import MethodConfig, StepOutput, register_method
from medpretrain.ssl.momentum import MomentumMethod, momentum_copy


class BYOLConfig(MethodConfig):
    """Paper defaults (LARS, 0.2 × batch/256, wd 1.5e-6, 10 warm-up epochs, target momentum cosine → 1).

    For small backbones and datasets: projector/predictor hidden width 2048 instead of 4096 (ResNet-18 has
    512 features, ResNet-50 2048) with the paper's 256-d output, and a base target momentum of 0.99 instead of
    0.996, as BYOL's small-image reimplementations use — a few thousand steps need a faster-moving target.
    """

    optimizer: Literal["lars", "sgd", "adamw", "adam"] = "lars"
    lr: float = 0.2
    weight_decay: float = 1.5e-6
    warmup_epochs: int = 10
    ema_momentum: float = Field(0.99, ge=0, le=1)
    ema_momentum_end: float = Field(1.0, ge=0, le=1)
    hidden_dim: int = Field(2048, gt=0)
    output_dim: int = Field(256, gt=0)


@register_method
class BYOL(MomentumMethod):
    name: ClassVar[str] = "byol"
    description: ClassVar[str] = "BYOL: online predictor regresses a momentum target's projection (no negatives)"
    family: ClassVar[str] = "non-contrastive"
    config_class: ClassVar[type[MethodConfig]] = BYOLConfig
    config: BYOLConfig

    def __init__(self, backbone: Backbone, config: BYOLConfig, *, channels: int, image_size: int) -> None:
        super().__init__(backbone, config, channels=channels, image_size=image_size)
        nf = backbone.num_features
        self.projection_head = BYOLProjectionHead(nf, config.hidden_dim, config.output_dim)
        self.prediction_head = BYOLPredictionHead(config.output_dim, config.hidden_dim, config.output_dim)
        self.target_backbone = momentum_copy(backbone)
        self.target_head = momentum_copy(self.projection_head)
        # -cos differs from the paper's 2 - 2·cos only by an affine map; the gradients' direction is the same.
        self.criterion = NegativeCosineSimilarity()
        self.recipes = byol_view_pair(contrastive_recipe().with_(output_size=image_size))

    def momentum_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projection_head, self.target_head)]

    def views(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return [recipe(batch, generator=generator) for recipe in self.recipes]

    def step(self, views: list[torch.Tensor]) -> StepOutput:
        h0 = self.backbone(views[0])
        p0 = self.prediction_head(self.projection_head(h0))
        p1 = self.prediction_head(self.projection_head(self.backbone(views[1])))
        with torch.no_grad():
            t0 = self.target_head(self.target_backbone(views[0]))
            t1 = self.target_head(self.target_backbone(views[1]))
        with torch.autocast(device_type=p0.device.type, enabled=False):
            loss = 0.5 * (self.criterion(p0.float(), t1.float()) + self.criterion(p1.float(), t0.float()))
        return StepOutput(loss=loss, embedding=h0.detach())
