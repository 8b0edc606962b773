"""SparK, the method: random patch masks, the sparse encoder's scales, the decoder and the loss, per step.

SparK (Tian et al., ICLR 2023, "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked
Modeling"): 60 % of the patches on the final feature map's grid are dropped, the encoder sees only the visible
ones (`medpretrain.ssl.spark.sparse`), the UNet-style decoder (`medpretrain.ssl.spark.decoder`) fills and
upsamples its scales back to pixels, and the loss (`medpretrain.ssl.spark.loss`) counts masked patches only.
The package docstring (`medpretrain.ssl.spark`) lists which backbone, stem and image size combinations work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from medpretrain.augment import ViewRecipe
from medpretrain.backbones import Backbone
from medpretrain.errors import MedpretrainError
from medpretrain.ssl.base import Method, MethodConfig, StepOutput, register_method
from medpretrain.ssl.spark.decoder import UpBlock, decoder_targets
from medpretrain.ssl.spark.geometry import mask_at
from medpretrain.ssl.spark.loss import masked_patch_loss
from medpretrain.ssl.spark.sparse import sparse_batch_norm, sparse_encoding

MIN_GRID = 4


@contextmanager
def _capture(model: nn.Module, names: tuple[str, ...]) -> Iterator[list[Tensor]]:
    """Collects the outputs of the named submodules during the block, in the order of `names`."""
    found: list[Tensor] = []
    outputs: dict[str, Tensor] = {}

    def hook(name: str, _module: nn.Module, _args: Any, output: Tensor) -> None:
        outputs[name] = output

    handles = [model.get_submodule(n).register_forward_hook(partial(hook, n)) for n in names]
    try:
        yield found
        found.extend(outputs[n] for n in names)
    finally:
        for handle in handles:
            handle.remove()


class SparKConfig(MethodConfig):
    """Paper defaults: mask ratio 0.6, wd 0.04, β₂ 0.95, crop scale (0.67, 1); lr from the paper's, rescaled.

    SparK trains ResNets at lr 3.2e-3 (base 2e-4 × 4096/256) with batch 4096. Its linear rule gives 2e-4 at our
    batch of 256, 16× lower; for Adam-type optimisers the square-root rule holds instead (Malladi et al., 2022),
    which gives 8e-4. Measured on bloodmnist, 30 epochs (BENCHMARKS.md): with 8e-4 the linear probe's mean AUC
    over 3 seeds is above the random network's at 1% and 10% of the labels (0.895 vs 0.884, 0.953 vs 0.944;
    significant in the seed-aware test, p < 0.001 at both), with 2e-4 it tied.
    SparK uses LAMB for ResNets; AdamW with the same β₂ is the closest optimiser the loop offers. The paper
    warms up 40 of 800–1600 epochs; 5 keeps roughly that fraction for runs of ~50–100 epochs. Its decoder
    starts at 768 channels on a 7×7 map (ResNet-50, 224 px) and costs about four encoders; with the small
    stem every scale is 4× larger in area, so 512 keeps the decoder at about one encoder's cost.
    """

    optimizer: Literal["lars", "sgd", "adamw", "adam"] = "adamw"
    lr: float = 8e-4
    weight_decay: float = 0.04
    warmup_epochs: int = 5
    beta2: float = Field(0.95, gt=0, lt=1, description="AdamW β₂ (the papers' 0.95)")
    mask_ratio: float = Field(0.6, gt=0, lt=1)
    decoder_width: int = Field(512, ge=16, description="decoder channels at the deepest scale, halved per scale")
    crop_scale_min: float = Field(0.67, gt=0, le=1, description="random resized crop keeps ≥ this area")
    dense_bn_stats: bool = Field(
        True, description="re-estimate the encoder's BatchNorm statistics on whole (unmasked) images at the end"
    )


@register_method
class SparK(Method):
    name: ClassVar[str] = "spark"
    description: ClassVar[str] = "SparK: masked image modelling for CNNs (sparse encoder, hierarchical decoder)"
    family: ClassVar[str] = "masked"
    config_class: ClassVar[type[MethodConfig]] = SparKConfig
    backbone_families: ClassVar[tuple[str, ...]] = ("resnet", "efficientnet")
    config: SparKConfig

    def __init__(self, backbone: Backbone, config: SparKConfig, *, channels: int, image_size: int) -> None:
        super().__init__(backbone, config, channels=channels, image_size=image_size)
        # Encoder scales handed to the decoder, shallow → deep: the backbone's own spec says which.
        if not backbone.spec.spark_stages:
            raise MedpretrainError(
                f"spark needs a convolutional backbone, got {backbone.name}",
                "use resnet18, resnet50 or efficientnet_lite0 (or mae for vit_tiny)",
            )
        self.stage_names = backbone.spec.spark_stages
        chans, sizes = self._probe(image_size)
        self.grid: tuple[int, int] = sizes[-1]
        if min(self.grid) < MIN_GRID:
            if backbone.small_stem:
                hint = f"use --image-size ≥ {MIN_GRID * 8 - 7} (the small stem's final map is image size / 8)"
            elif backbone.family == "resnet":
                hint = f"use --small-stem (final map = image size / 8) or --image-size ≥ {MIN_GRID * 32 - 31}"
            else:
                hint = f"use --image-size ≥ {MIN_GRID * 32 - 31} (e.g. 128 or 224), or a ResNet with --small-stem"
            raise MedpretrainError(
                f"spark masks patches on the final feature map, which is only {self.grid[0]}×{self.grid[1]} for "
                f"{backbone.name}{' (small stem)' if backbone.small_stem else ''} at {image_size} px; it needs at "
                f"least {MIN_GRID}×{MIN_GRID}",
                hint,
            )
        self.stage_sizes = sizes
        deep_first = list(zip(reversed(chans), reversed(sizes), strict=True))
        self.targets = targets = decoder_targets([size for _, size in deep_first], image_size)
        widths = [max(config.decoder_width >> k, 16) for k in range(len(targets) + 1)]

        self.mask_tokens = nn.ParameterList()
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        for k, (c, _) in enumerate(deep_first):
            token = nn.Parameter(torch.zeros(1, c, 1, 1))
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            self.densify_norms.append(nn.BatchNorm2d(c))
            kernel = 1 if k == 0 else 3
            self.densify_projs.append(
                nn.Identity()
                if k == 0 and c == widths[0]
                else nn.Conv2d(c, widths[k], kernel, padding=kernel // 2, bias=True)
            )
        self.blocks = nn.ModuleList(UpBlock(widths[k], widths[k + 1]) for k in range(len(targets)))
        self.proj = nn.Conv2d(widths[len(targets)], channels, 1)
        self.recipe = ViewRecipe(crop_scale=(config.crop_scale_min, 1.0), hflip=0.5, output_size=image_size)

    def _probe(self, image_size: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Channels and spatial sizes of the encoder scales at `image_size`, from one dummy forward."""
        model = self.backbone.model
        was_training = model.training
        ref = next(model.parameters())
        try:
            model.eval()  # a probe must not move BatchNorm running statistics
            with torch.no_grad(), _capture(model, self.stage_names) as found:
                model.forward_features(torch.zeros(1, 3, image_size, image_size, device=ref.device, dtype=ref.dtype))
        finally:
            model.train(was_training)
        return [int(f.shape[1]) for f in found], [(int(f.shape[2]), int(f.shape[3])) for f in found]

    def views(self, batch: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        return [self.recipe(batch, generator=generator)]

    def finalize(self, images: Tensor, device: torch.device) -> None:
        """The encoder's running BatchNorm statistics were gathered from visible positions of masked images,
        whose convolutions read zeros across every mask edge; the checkpoint is used as a dense network
        (frozen under the linear probe and kNN), so they are re-estimated on whole training images: one pass
        in train mode without gradients (torch's `update_bn`, as after SWA). On bloodmnist, 30 epochs, this
        moved the linear probe at 1% labels from 0.605 to 0.616 test ACC (BENCHMARKS.md)."""
        if not self.config.dense_bn_stats:
            return
        self.backbone.to(device)
        with torch.no_grad():
            update_bn(images.split(self.config.batch_size), self.backbone, device=device)

    def random_mask(self, n: int, device: torch.device) -> Tensor:
        """Per image, exactly round(L · (1 − ratio)) visible patches (True) of the L on the grid."""
        h, w = self.grid
        length = h * w
        keep = max(1, round(length * (1 - self.config.mask_ratio)))
        idx = torch.rand(n, length, device=device).argsort(dim=1)[:, :keep]
        active = torch.zeros(n, length, dtype=torch.bool, device=device).scatter_(1, idx, True)
        return active.view(n, 1, h, w)

    def encode(self, x: Tensor, active: Tensor) -> list[Tensor]:
        """Sparse encoder features of the visible patches at every scale, shallow → deep."""
        model = self.backbone.model
        with _capture(model, self.stage_names) as found, sparse_encoding(model, active) as at:
            inp = self.backbone.prepare(x)
            model.forward_features(inp * at(inp.shape[-2:]).to(inp.dtype))
        return found

    def decode(self, feats: list[Tensor], active: Tensor) -> Tensor:
        """Pixels (N, C, H, W) from the shallow → deep sparse features: densify each scale, UNet upwards."""
        dense = []
        for k, feat in enumerate(reversed(feats)):
            m = mask_at(active, feat.shape[-2:])
            feat = sparse_batch_norm(self.densify_norms[k], feat, m)
            feat = torch.where(m, feat, self.mask_tokens[k].to(feat.dtype))
            dense.append(self.densify_projs[k](feat))
        x = dense[0]
        for k, (block, size) in enumerate(zip(self.blocks, self.targets, strict=True)):
            x = block(x, size)
            if k + 1 < len(dense):
                x = x + dense[k + 1]
        return self.proj(x)

    def forward_masked(self, x: Tensor, active: Tensor) -> StepOutput:
        """Loss and embedding for views `x` (N, C, H, W in [0, 1]) under the patch mask `active`."""
        feats = self.encode(x, active)
        pred = self.decode(feats, active)
        if pred.shape[-2:] != x.shape[-2:]:
            pred = F.interpolate(pred, size=x.shape[-2:], mode="bilinear", align_corners=False)
        # float32: per-patch variances of near-flat medical patches underflow in half precision.
        with torch.autocast(device_type=x.device.type, enabled=False):
            loss = masked_patch_loss(pred.float(), x.float(), active)
        # The collapse monitor gets the visible-only average of the final map: free, unlike a dense pass.
        last = feats[-1].detach().float()
        m = mask_at(active, last.shape[-2:]).float()
        embedding = (last * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp(min=1)
        return StepOutput(loss=loss, embedding=embedding)

    def step(self, views: list[Tensor]) -> StepOutput:
        x = views[0]
        return self.forward_masked(x, self.random_mask(x.shape[0], x.device))


__all__ = ["MIN_GRID", "SparK", "SparKConfig"]
