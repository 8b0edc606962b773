"""SimSiam (Chen & He, 2021): a Siamese predictor with a stop-gradient, no negatives and no momentum encoder."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import SimSiamPredictionHead, SimSiamProjectionHead
from pydantic import Field

from medpretrain.augment import contrastive_recipe
from medpretrain.backbones import Backbone
from medpretrain.ssl.base import Method, MethodConfig, StepOutput, register_method


class SimSiamConfig(MethodConfig):
    """Paper defaults (SGD, 0.05 × batch/256, wd 1e-4, no warm-up; 3-layer 2048-d projector, 512-d predictor
    bottleneck). 2048 is already the paper's width and costs little next to a ResNet-18, so it is kept."""

    optimizer: Literal["lars", "sgd", "adamw", "adam"] = "sgd"
    lr: float = 0.05
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    hidden_dim: int = Field(2048, gt=0)
    output_dim: int = Field(2048, gt=0)
    predictor_hidden_dim: int = Field(512, gt=0)


@register_method
class SimSiam(Method):
    name: ClassVar[str] = "simsiam"
    description: ClassVar[str] = "SimSiam: predictor + stop-gradient between two views (no negatives, no EMA)"
    family: ClassVar[str] = "non-contrastive"
    config_class: ClassVar[type[MethodConfig]] = SimSiamConfig
    config: SimSiamConfig

    def __init__(self, backbone: Backbone, config: SimSiamConfig, *, channels: int, image_size: int) -> None:
        super().__init__(backbone, config, channels=channels, image_size=image_size)
        self.projection_head = SimSiamProjectionHead(backbone.num_features, config.hidden_dim, config.output_dim)
        self.prediction_head = SimSiamPredictionHead(config.output_dim, config.predictor_hidden_dim, config.output_dim)
        self.criterion = NegativeCosineSimilarity()
        # SimSiam uses MoCo v2's augmentation.
        self.recipe = contrastive_recipe(blur_p=0.5).with_(output_size=image_size)

    def views(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return [self.recipe(batch, generator=generator) for _ in range(2)]

    def step(self, views: list[torch.Tensor]) -> StepOutput:
        h0, h1 = self.backbone(views[0]), self.backbone(views[1])
        z0, z1 = self.projection_head(h0), self.projection_head(h1)
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        with torch.autocast(device_type=z0.device.type, enabled=False):
            # The stop-gradient on the targets is what keeps SimSiam from collapsing.
            loss = 0.5 * (
                self.criterion(p0.float(), z1.detach().float()) + self.criterion(p1.float(), z0.detach().float())
            )
        return StepOutput(loss=loss, embedding=h0.detach())
