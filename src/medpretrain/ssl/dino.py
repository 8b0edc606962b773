"""DINO (Caron et al., 2021): a student matches a momentum teacher's centred, sharpened output across crops."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
from lightly.loss import DINOLoss
from lightly.models.modules.heads import DINOProjectionHead
from lightly.utils.scheduler import linear_warmup_schedule
from pydantic import Field, model_validator
from torch import nn

from medpretrain.augment import byol_view_pair, contrastive_recipe
from medpretrain.backbones import Backbone
from medpretrain.ssl.base import CropScale, MethodConfig, StepOutput, register_method
from medpretrain.ssl.momentum import MomentumMethod, momentum_copy

# Multi-crop papers take 96 px local crops of 224 px images; below 12 px a CNN's 32× downsampling leaves
# nothing to pool, so 28 px images get 12 px local crops.
LOCAL_CROP_FRACTION = 96 / 224
MIN_LOCAL_CROP = 12


def local_crop_size(image_size: int) -> int:
    """Side of a multi-crop local view for images of side `image_size`."""
    return min(image_size, max(MIN_LOCAL_CROP, round(LOCAL_CROP_FRACTION * image_size)))


class DINOConfig(MethodConfig):
    """Paper defaults (AdamW, 5e-4 × batch/256, wd 0.04, 10 warm-up epochs; teacher momentum 0.996 → 1
    (cosine); teacher temperature 0.04 → 0.07 over 30 epochs, student 0.1, centre momentum 0.9; last layer
    frozen for the first epoch; global crops (0.4, 1), local crops (0.05, 0.4)).

    Scaled for small backbones and datasets: 2048 output dimensions instead of 65536 (a handful of classes,
    ≤ 10⁵ images) and 4 local crops instead of 10 so a CPU run stays affordable. The paper's weight-decay ramp
    to 0.4 is not reproduced (the optimiser has one constant weight decay). DINO's own ResNet-50 recipe used
    SGD (lr 0.03, wd 1e-4): set optimizer/lr/weight_decay for that.
    """

    optimizer: Literal["lars", "sgd", "adamw", "adam"] = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.04
    warmup_epochs: int = 10
    hidden_dim: int = Field(2048, gt=0)
    bottleneck_dim: int = Field(256, gt=0)
    output_dim: int = Field(2048, gt=0)
    head_batch_norm: bool = False
    norm_last_layer: bool = True
    freeze_last_layer_epochs: int = Field(1, ge=0)
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.07, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_epochs: int = Field(30, ge=0)
    center_momentum: float = Field(0.9, ge=0, le=1)
    ema_momentum: float = Field(0.996, ge=0, le=1)
    ema_momentum_end: float = Field(1.0, ge=0, le=1)
    n_local_crops: int = Field(4, ge=0)
    global_crop_scale: CropScale = (0.4, 1.0)
    local_crop_scale: CropScale = (0.05, 0.4)

    @model_validator(mode="after")
    def _temperatures(self) -> DINOConfig:
        if self.warmup_teacher_temp > self.teacher_temp:
            raise ValueError("warmup_teacher_temp must not exceed teacher_temp (the warm-up sharpens less over time)")
        return self


def _parametrized_last_layer(head: DINOProjectionHead) -> None:
    """Swap lightly's legacy weight_norm hook for the equivalent parametrisation.

    The legacy hook caches a non-leaf weight tensor, which makes the whole method impossible to deep-copy
    (pytorch#103001); the parametrisation computes the same g·v/‖v‖ and copies fine.
    """
    layer = head.last_layer
    g_trainable = layer.weight_g.requires_grad
    nn.utils.remove_weight_norm(layer)
    nn.utils.parametrizations.weight_norm(layer)
    layer.parametrizations.weight.original0.requires_grad_(g_trainable)


@register_method
class DINO(MomentumMethod):
    name: ClassVar[str] = "dino"
    description: ClassVar[str] = "DINO: self-distillation from a momentum teacher with multi-crop views"
    family: ClassVar[str] = "distillation"
    config_class: ClassVar[type[MethodConfig]] = DINOConfig
    # Epoch-based schedules (teacher temperature, last-layer freeze) need the position in training in `step`.
    tracks_position: ClassVar[bool] = True
    config: DINOConfig

    def __init__(self, backbone: Backbone, config: DINOConfig, *, channels: int, image_size: int) -> None:
        super().__init__(backbone, config, channels=channels, image_size=image_size)
        self.student_head = DINOProjectionHead(
            backbone.num_features,
            config.hidden_dim,
            config.bottleneck_dim,
            config.output_dim,
            batch_norm=config.head_batch_norm,
            norm_last_layer=config.norm_last_layer,
        )
        _parametrized_last_layer(self.student_head)
        self.teacher_backbone = momentum_copy(backbone)
        self.teacher_head = momentum_copy(self.student_head)
        # The loss owns the teacher centre (a buffer, so it is checkpointed); the temperature schedule is
        # driven per step below rather than by lightly's per-epoch fallback.
        self.criterion = DINOLoss(
            output_dim=config.output_dim,
            warmup_teacher_temp=config.warmup_teacher_temp,
            teacher_temp=config.teacher_temp,
            student_temp=config.student_temp,
            center_momentum=config.center_momentum,
        )
        base = contrastive_recipe().with_(output_size=image_size, crop_scale=config.global_crop_scale)
        self.global_recipes = byol_view_pair(base)
        self.local_recipe = base.with_(
            crop_scale=config.local_crop_scale, output_size=local_crop_size(image_size), blur_p=0.5
        )

    def _last_layer_direction(self) -> nn.Parameter:
        return self.student_head.last_layer.parametrizations.weight.original1

    def momentum_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.student_head, self.teacher_head)]

    def optimized_parameters(self) -> Iterable[nn.Parameter]:
        teacher = self.momentum_parameter_ids()
        # The last layer is switched off only while frozen; it must still be in the optimiser for later.
        direction = self._last_layer_direction()
        return (p for p in self.parameters() if id(p) not in teacher and (p.requires_grad or p is direction))

    def views(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        crops = [recipe(batch, generator=generator) for recipe in self.global_recipes]
        crops += [self.local_recipe(batch, generator=generator) for _ in range(self.config.n_local_crops)]
        return crops

    def step(self, views: list[torch.Tensor]) -> StepOutput:
        cfg, step = self.config, self.steps_done
        # Without a clock (epoch length unknown) both schedules count as finished: steps(...) is 0.
        frozen = step < self.clock.steps(cfg.freeze_last_layer_epochs)
        self._last_layer_direction().requires_grad_(not frozen)
        teacher_temp = linear_warmup_schedule(
            step, self.clock.steps(cfg.warmup_teacher_temp_epochs), cfg.warmup_teacher_temp, cfg.teacher_temp
        )
        n_global = len(self.global_recipes)
        # Crops of one size go through together, as in the paper's implementation (one BN batch per resolution).
        global_batch = torch.cat(views[:n_global])
        h_global = self.backbone(global_batch)
        student = list(self.student_head(h_global).chunk(n_global))
        if len(views) > n_global:
            local = self.student_head(self.backbone(torch.cat(views[n_global:])))
            student += list(local.chunk(len(views) - n_global))
        with torch.no_grad():
            teacher = list(self.teacher_head(self.teacher_backbone(global_batch)).chunk(n_global))
        with torch.autocast(device_type=global_batch.device.type, enabled=False):
            loss = self.criterion([t.float() for t in teacher], [s.float() for s in student], teacher_temp=teacher_temp)
        return StepOutput(loss=loss, embedding=h_global[: views[0].shape[0]].detach())
