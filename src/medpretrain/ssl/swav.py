"""SwAV (Caron et al., 2020): predict one crop's Sinkhorn cluster assignment from another crop (multi-crop)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from lightly.loss import SwaVLoss
from lightly.loss.memory_bank import MemoryBankModule
from lightly.models.modules.heads import SwaVProjectionHead, SwaVPrototypes
from pydantic import Field
from torch import nn

from medpretrain.augment import contrastive_recipe
from medpretrain.backbones import Backbone
from medpretrain.ssl.base import CropScale, Method, MethodConfig, StepOutput, register_method
from medpretrain.ssl.dino import local_crop_size
from medpretrain.ssl.memory_bank import checkpointed_bank

N_GLOBAL = 2


class SwaVConfig(MethodConfig):
    """The paper's batch-256 recipe (LARS, base lr 0.6, wd 1e-6, no warm-up, τ 0.1, Sinkhorn ε 0.05 × 3
    iterations, a 3840-feature queue per global crop from epoch 15, prototypes frozen for the first epoch;
    global crops (0.14, 1), local crops (0.05, 0.14)).

    Scaled for small datasets: 512 prototypes instead of 3000 (MedMNIST tasks have ≤ 11 classes; the paper
    shows SwAV is insensitive to the count as long as it is well above the class count) and 4 local crops
    instead of 6 to keep CPU runs affordable. The queue lets Sinkhorn's equipartition act on more samples
    than a small batch holds; set queue_length=0 to disable it for large batches.
    """

    optimizer: Literal["lars", "sgd", "adamw", "adam"] = "lars"
    lr: float = 0.6
    weight_decay: float = 1e-6
    warmup_epochs: int = 0
    hidden_dim: int = Field(2048, gt=0)
    output_dim: int = Field(128, gt=0)
    n_prototypes: int = Field(512, gt=0)
    temperature: float = Field(0.1, gt=0)
    sinkhorn_epsilon: float = Field(0.05, gt=0)
    sinkhorn_iterations: int = Field(3, ge=1)
    queue_length: int = Field(3840, ge=0)
    queue_start_epochs: int = Field(15, ge=0)
    freeze_prototypes_epochs: int = Field(1, ge=0)
    n_local_crops: int = Field(4, ge=0)
    global_crop_scale: CropScale = (0.14, 1.0)
    local_crop_scale: CropScale = (0.05, 0.14)


@register_method
class SwaV(Method):
    name: ClassVar[str] = "swav"
    description: ClassVar[str] = "SwAV: swapped prediction of Sinkhorn prototype assignments, multi-crop"
    family: ClassVar[str] = "contrastive"
    config_class: ClassVar[type[MethodConfig]] = SwaVConfig
    # The queue's start and the prototype freeze are epoch-based and read in `step`.
    tracks_position: ClassVar[bool] = True
    config: SwaVConfig
    queue_filled: torch.Tensor

    def __init__(self, backbone: Backbone, config: SwaVConfig, *, channels: int, image_size: int) -> None:
        super().__init__(backbone, config, channels=channels, image_size=image_size)
        self.projection_head = SwaVProjectionHead(backbone.num_features, config.hidden_dim, config.output_dim)
        self.prototypes = SwaVPrototypes(config.output_dim, n_prototypes=config.n_prototypes)
        self.criterion = SwaVLoss(
            temperature=config.temperature,
            sinkhorn_iterations=config.sinkhorn_iterations,
            sinkhorn_epsilon=config.sinkhorn_epsilon,
            sinkhorn_gather_distributed=True,
        )
        # One queue per global crop, local to each process as in the paper's code; checkpointed, so a resumed run
        # keeps its queued features.
        self.queues = nn.ModuleList(
            checkpointed_bank(MemoryBankModule(size=(config.queue_length, config.output_dim)))
            for _ in range(N_GLOBAL if config.queue_length > 0 else 0)
        )
        # The queue starts out random: it is used only once it holds real features (and the epoch allows).
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        base = contrastive_recipe(blur_p=0.5).with_(output_size=image_size, crop_scale=config.global_crop_scale)
        self.global_recipe = base
        self.local_recipe = base.with_(crop_scale=config.local_crop_scale, output_size=local_crop_size(image_size))

    def optimized_parameters(self) -> Iterable[nn.Parameter]:
        # Prototypes are switched off only while frozen; they must still be in the optimiser for later.
        prototypes = {id(p) for p in self.prototypes.parameters()}
        return (p for p in self.parameters() if p.requires_grad or id(p) in prototypes)

    def views(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        crops = [self.global_recipe(batch, generator=generator) for _ in range(N_GLOBAL)]
        crops += [self.local_recipe(batch, generator=generator) for _ in range(self.config.n_local_crops)]
        return crops

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return h, F.normalize(self.projection_head(h), dim=1)

    @torch.no_grad()
    def _queue_scores(self, z_global: list[torch.Tensor], epoch: float) -> list[torch.Tensor] | None:
        if not self.queues:
            return None
        update = z_global[0].requires_grad
        banks = [queue(z.detach().float(), update=update)[1] for queue, z in zip(self.queues, z_global, strict=True)]
        ready = int(self.queue_filled) >= self.config.queue_length and epoch >= self.config.queue_start_epochs
        if update:
            self.queue_filled.add_(z_global[0].shape[0])
        if not ready:
            return None
        # lightly returns the bank as (dim, length).
        return [self.prototypes(bank.t().to(z_global[0].dtype)).float() for bank in banks]

    def step(self, views: list[torch.Tensor]) -> StepOutput:
        # Without a clock (epoch length unknown) the epoch is infinite: both schedules count as finished.
        epoch = self.clock.epoch(self.steps_done)
        self.prototypes.requires_grad_(epoch >= self.config.freeze_prototypes_epochs)
        # Keeping prototypes on the unit sphere makes their scores cosine similarities, as Sinkhorn expects.
        self.prototypes.normalize()
        h_global, z = self._embed(torch.cat(views[:N_GLOBAL]))
        z_global = list(z.chunk(N_GLOBAL))
        z_local: list[torch.Tensor] = []
        if len(views) > N_GLOBAL:
            z_local = list(self._embed(torch.cat(views[N_GLOBAL:]))[1].chunk(len(views) - N_GLOBAL))
        high = [self.prototypes(x) for x in z_global]
        low = [self.prototypes(x) for x in z_local]
        queue = self._queue_scores(z_global, epoch)
        with torch.autocast(device_type=z.device.type, enabled=False):
            # Sinkhorn exponentiates scores / ε (ε = 0.05): that overflows in half precision.
            loss = self.criterion([s.float() for s in high], [s.float() for s in low], queue)
        return StepOutput(loss=loss.squeeze(), embedding=h_global[: views[0].shape[0]].detach())
