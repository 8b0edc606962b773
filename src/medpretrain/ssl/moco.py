"""MoCo v2 (Chen et al., 2020): a query encoder contrasted against keys from a momentum encoder and a queue."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules.heads import MoCoProjectionHead
from lightly.models.utils import batch_shuffle_distributed, batch_unshuffle_distributed
from pydantic import Field
from torch import nn

from medpretrain.augment import contrastive_recipe
from medpretrain.backbones import Backbone
from medpretrain.ssl.base import MethodConfig, StepOutput, register_method
from medpretrain.ssl.memory_bank import checkpointed_bank
from medpretrain.ssl.momentum import MomentumMethod, momentum_copy


class MoCoConfig(MethodConfig):
    """Paper defaults (SGD, 0.03 × batch/256, wd 1e-4, τ 0.2, 2-layer MLP head → 128, no warm-up).

    Two changes for small medical datasets: the queue holds 4096 keys instead of 65536 (a 65536 queue is
    several epochs of a MedMNIST training split, so most keys would come from a stale encoder), and the
    key-encoder momentum starts at 0.99 instead of 0.999 and follows a cosine schedule to 1 — with a few
    thousand steps in total, 0.999 would leave the key encoder barely trained.
    """

    optimizer: Literal["lars", "sgd", "adamw", "adam"] = "sgd"
    lr: float = 0.03
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    temperature: float = Field(0.2, gt=0)
    queue_size: int = Field(4096, gt=0)
    ema_momentum: float = Field(0.99, ge=0, le=1)
    ema_momentum_end: float = Field(1.0, ge=0, le=1)
    hidden_dim: int | None = Field(None, gt=0, description="None: the backbone's feature width")
    output_dim: int = Field(128, gt=0)


@register_method
class MoCo(MomentumMethod):
    name: ClassVar[str] = "moco"
    description: ClassVar[str] = "MoCo v2: InfoNCE against a momentum key encoder and a queue of past keys"
    family: ClassVar[str] = "contrastive"
    config_class: ClassVar[type[MethodConfig]] = MoCoConfig
    config: MoCoConfig

    def __init__(self, backbone: Backbone, config: MoCoConfig, *, channels: int, image_size: int) -> None:
        super().__init__(backbone, config, channels=channels, image_size=image_size)
        nf = backbone.num_features
        self.projection_head = MoCoProjectionHead(nf, config.hidden_dim or nf, config.output_dim)
        self.key_backbone = momentum_copy(backbone)
        self.key_head = momentum_copy(self.projection_head)
        self.criterion = NTXentLoss(
            temperature=config.temperature,
            memory_bank_size=(config.queue_size, config.output_dim),
            gather_distributed=True,
        )
        # A resumed run must not restart from random negatives.
        checkpointed_bank(self.criterion.memory_bank)
        self.recipe = contrastive_recipe(blur_p=0.5).with_(output_size=image_size)

    def momentum_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.key_backbone), (self.projection_head, self.key_head)]

    def views(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return [self.recipe(batch, generator=generator) for _ in range(2)]

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        # Shuffling BN across GPUs stops the query and its key from sharing batch statistics (the paper's
        # "shuffle BN"); on a single device there is nothing to shuffle across.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            x, order = batch_shuffle_distributed(x)
            return batch_unshuffle_distributed(self.key_head(self.key_backbone(x)), order)
        return self.key_head(self.key_backbone(x))

    def step(self, views: list[torch.Tensor]) -> StepOutput:
        h = self.backbone(views[0])
        query = self.projection_head(h)
        key = self._keys(views[1])
        with torch.autocast(device_type=query.device.type, enabled=False):
            # NT-Xent with a memory bank is InfoNCE with the queue as negatives; it enqueues the keys itself.
            loss = self.criterion(query.float(), key.float())
        return StepOutput(loss=loss, embedding=h.detach())
