"""Barlow Twins (Zbontar et al., 2021): drive the cross-correlation of two views' embeddings to the identity."""

from __future__ import annotations

from typing import ClassVar, Literal

from lightly.loss import BarlowTwinsLoss
from lightly.models.modules.heads import BarlowTwinsProjectionHead
from pydantic import Field

from medpretrain.augment import contrastive_recipe
from medpretrain.backbones import Backbone
from medpretrain.ssl.base import MethodConfig, SymmetricTwoViewMethod, register_method


class BarlowTwinsConfig(MethodConfig):
    """Paper defaults (LARS, 0.2 × batch/256, wd 1.5e-6, 10 warm-up epochs, λ = 5e-3, BYOL's augmentation).

    The projector is 3 × 2048 instead of 3 × 8192: the cross-correlation is estimated from one batch, and with
    batches of a few hundred small images an 8192² matrix is mostly noise (and 16× the memory). The paper's
    lower bias/BN learning rate (0.0048) is not reproduced; every parameter shares `lr`.
    """

    optimizer: Literal["lars", "sgd", "adamw", "adam"] = "lars"
    lr: float = 0.2
    weight_decay: float = 1.5e-6
    warmup_epochs: int = 10
    hidden_dim: int = Field(2048, gt=0)
    output_dim: int = Field(2048, gt=0)
    lambda_offdiag: float = Field(5e-3, ge=0)


@register_method
class BarlowTwins(SymmetricTwoViewMethod):
    name: ClassVar[str] = "barlow_twins"
    description: ClassVar[str] = "Barlow Twins: cross-correlation of two views' embeddings pushed to identity"
    family: ClassVar[str] = "non-contrastive"
    config_class: ClassVar[type[MethodConfig]] = BarlowTwinsConfig
    config: BarlowTwinsConfig

    def __init__(self, backbone: Backbone, config: BarlowTwinsConfig, *, channels: int, image_size: int) -> None:
        super().__init__(backbone, config, channels=channels, image_size=image_size)
        self.projection_head = BarlowTwinsProjectionHead(backbone.num_features, config.hidden_dim, config.output_dim)
        # Under DDP the cross-correlation is summed over all GPUs, i.e. estimated on the global batch as in the paper.
        self.criterion = BarlowTwinsLoss(lambda_param=config.lambda_offdiag, gather_distributed=True)
        base = contrastive_recipe().with_(output_size=image_size)
        self.recipes = (base.with_(blur_p=1.0, solarize_p=0.0), base.with_(blur_p=0.1, solarize_p=0.2))
