"""VICReg (Bardes et al., 2022): invariance + variance + covariance regularisation between two views."""

from __future__ import annotations

from typing import ClassVar, Literal

from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from pydantic import Field

from medpretrain.augment import contrastive_recipe
from medpretrain.backbones import Backbone
from medpretrain.ssl.base import MethodConfig, SymmetricTwoViewMethod, register_method


class VICRegConfig(MethodConfig):
    """Paper defaults (LARS, 0.2 × batch/256, wd 1e-6, 10 warm-up epochs, λ = μ = 25, ν = 1, BYOL's
    augmentation). The expander is 3 × 2048 instead of 3 × 8192: the covariance term is estimated from one
    batch of a few hundred images, too few for 8192 dimensions."""

    optimizer: Literal["lars", "sgd", "adamw", "adam"] = "lars"
    lr: float = 0.2
    weight_decay: float = 1e-6
    warmup_epochs: int = 10
    hidden_dim: int = Field(2048, gt=0)
    output_dim: int = Field(2048, gt=0)
    num_layers: int = Field(3, ge=2)
    sim_coeff: float = Field(25.0, ge=0, description="λ, invariance")
    std_coeff: float = Field(25.0, ge=0, description="μ, variance")
    cov_coeff: float = Field(1.0, ge=0, description="ν, covariance")


@register_method
class VICReg(SymmetricTwoViewMethod):
    name: ClassVar[str] = "vicreg"
    description: ClassVar[str] = "VICReg: invariance, per-dimension variance and decorrelation between two views"
    family: ClassVar[str] = "non-contrastive"
    config_class: ClassVar[type[MethodConfig]] = VICRegConfig
    config: VICRegConfig

    def __init__(self, backbone: Backbone, config: VICRegConfig, *, channels: int, image_size: int) -> None:
        super().__init__(backbone, config, channels=channels, image_size=image_size)
        self.projection_head = VICRegProjectionHead(
            backbone.num_features, config.hidden_dim, config.output_dim, config.num_layers
        )
        # Under DDP variance and covariance are estimated on the global batch, as in the paper.
        self.criterion = VICRegLoss(
            lambda_param=config.sim_coeff,
            mu_param=config.std_coeff,
            nu_param=config.cov_coeff,
            gather_distributed=True,
        )
        base = contrastive_recipe().with_(output_size=image_size)
        self.recipes = (base.with_(blur_p=1.0, solarize_p=0.0), base.with_(blur_p=0.1, solarize_p=0.2))
