"""SimCLR (Chen et al., 2020): two strongly augmented views, NT-Xent over the other 2N − 2 views in the batch."""

from __future__ import annotations

from typing import ClassVar, Literal

from lightly.loss import NTXentLoss
from lightly.models.modules.heads import SimCLRProjectionHead
from pydantic import Field

from medpretrain.augment import contrastive_recipe
from medpretrain.backbones import Backbone
from medpretrain.ssl.base import MethodConfig, SymmetricTwoViewMethod, register_method


class SimCLRConfig(MethodConfig):
    """Paper defaults (LARS, 0.3 × batch/256, wd 1e-6, 10 warm-up epochs). τ = 0.5 follows the paper's
    small-image (CIFAR) setting, which suits batches of a few hundred better than ImageNet's 0.1 at 4096.
    The head keeps the paper's shape: hidden width = backbone width, 128-d output."""

    optimizer: Literal["lars", "sgd", "adamw", "adam"] = "lars"
    lr: float = 0.3
    weight_decay: float = 1e-6
    warmup_epochs: int = 10
    temperature: float = Field(0.5, gt=0)
    hidden_dim: int | None = Field(None, gt=0, description="None: the backbone's feature width")
    output_dim: int = Field(128, gt=0)


@register_method
class SimCLR(SymmetricTwoViewMethod):
    name: ClassVar[str] = "simclr"
    description: ClassVar[str] = "SimCLR: contrastive NT-Xent between two views, in-batch negatives"
    family: ClassVar[str] = "contrastive"
    config_class: ClassVar[type[MethodConfig]] = SimCLRConfig
    config: SimCLRConfig

    def __init__(self, backbone: Backbone, config: SimCLRConfig, *, channels: int, image_size: int) -> None:
        super().__init__(backbone, config, channels=channels, image_size=image_size)
        nf = backbone.num_features
        self.projection_head = SimCLRProjectionHead(nf, config.hidden_dim or nf, config.output_dim)
        # Gathering is a no-op on one process; under DDP it restores the paper's global-batch negatives.
        self.criterion = NTXentLoss(temperature=config.temperature, gather_distributed=True)
        recipe = contrastive_recipe(blur_p=0.5).with_(output_size=image_size)
        self.recipes = (recipe, recipe)
