"""SparK (Tian et al., ICLR 2023): BERT-style masked image modelling for convolutional networks.

The image is cut into patches on the grid of the backbone's *final* feature map (one patch per output
position); 60 % of them are dropped. The encoder must see only the visible patches, as if it were a sparse
network: SparK replaces every convolution, pooling and BatchNorm with a sparse version. Here the timm
model stays dense and untouched and `sparse_encoding` emulates sparsity while it is active: every BatchNorm
normalises with statistics of visible positions only (and updates its running statistics from them) and
writes zeros at masked positions, and the output of every pooling layer is multiplied by the mask upsampled
to its resolution. In the registered CNNs every convolution feeds a BatchNorm, so masked positions are
exactly zero at every depth where a convolution reads them, and a visible position never reads anything
but zeros from a masked one (`test_spark_encoder_sees_only_visible_patches` checks this for each family).
Nothing is re-registered, so `backbone.model.state_dict()` keeps timm's keys.

A light UNet-style decoder fills the masked positions of each encoder scale with a learned mask token
("densify"), and upsamples from the deepest scale, adding the shallower ones, back to pixels. The target
is each patch normalised by its own mean and variance; the MSE counts masked patches only.

Which settings are valid: the mask lives on the final feature map, which must be at least 4×4 (a 1×1
or 2×2 grid leaves nothing to predict from). Final grid = ceil(image_size / 32) for the standard ResNet
stem and EfficientNet-Lite0, ceil(image_size / 8) for the ResNet small stem. So:

- resnet18 / resnet50 with ``--small-stem``: any image size ≥ 25 px (28 px → 4×4, 64 px → 8×8);
- resnet18 / resnet50 standard stem and efficientnet_lite0: image size ≥ 97 px (128 px → 4×4,
  224 px → 7×7, SparK's own setting); 28 and 64 px are rejected.

At 28 px with the small stem the stage maps are 28, 14, 7 and 4 px, so a patch is 8 px (the last row and
column of patches are 4 px wide); `mask_at` follows how the stride-2 convolutions (ceil) map positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import BatchNormAct2d
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

from medpretrain.augment import ViewRecipe
from medpretrain.backbones import Backbone
from medpretrain.errors import MedpretrainError
from medpretrain.ssl.base import Method, MethodConfig, StepOutput, register_method

# Encoder scales handed to the decoder, shallow → deep. For EfficientNet the stride-2 stage (blocks.0) is
# left out like SparK leaves out ResNet's stem, and the deepest scale is the map after conv_head + bn2,
# i.e. the map that gets pooled, so the whole feature extractor is trained.
STAGES: dict[str, tuple[str, ...]] = {
    "resnet": ("layer1", "layer2", "layer3", "layer4"),
    "efficientnet": ("blocks.1", "blocks.2", "blocks.4", "bn2"),
}
MIN_GRID = 4


def _factor(big: int, small: int) -> int:
    """The power of two f with ceil(big / f) == small for a chain of stride-2 stages: the smallest f·small ≥ big."""
    f = 1
    while f * small < big:
        f *= 2
    return f


def mask_at(active: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """The patch mask (N, 1, h, w; True = visible) at a map of `size` (H, W) ≥ (h, w).

    Stride-2 convolutions and pools with padding k // 2 map position j to j // 2 (output size ceil(H / 2)),
    so a map f = 2^k times finer than the grid belongs to patch j // f: repeat f times and crop.
    """
    h, w = active.shape[-2:]
    big_h, big_w = int(size[0]), int(size[1])
    if (big_h, big_w) == (h, w):
        return active
    fh, fw = _factor(big_h, h), _factor(big_w, w)
    if math.ceil(big_h / fh) != h or math.ceil(big_w / fw) != w:
        # Not a chain of stride-2 stages (should not happen with the registered backbones): nearest neighbour.
        return F.interpolate(active.float(), size=(big_h, big_w), mode="nearest").bool()
    return active.repeat_interleave(fh, dim=2).repeat_interleave(fw, dim=3)[:, :, :big_h, :big_w]


def sparse_batch_norm(bn: _BatchNorm, x: Tensor, active: Tensor) -> Tensor:
    """`bn` applied to the visible positions of `x` only (SparK's SparseBatchNorm2d); masked positions → 0.

    `active` is the mask at `x`'s resolution (N, 1, H, W). The module's own parameters and running
    buffers are used and updated exactly as `nn.BatchNorm2d.forward` would, but from visible positions,
    so the running statistics describe real image content rather than a majority of zeros.
    """
    factor = 0.0
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_buffers = not bn.training or bn.track_running_stats
    sel = active[:, 0]
    channels_last = x.permute(0, 2, 3, 1)
    visible = F.batch_norm(
        channels_last[sel],  # (M, C): one row per visible position
        bn.running_mean if use_buffers else None,
        bn.running_var if use_buffers else None,
        bn.weight,
        bn.bias,
        batch_stats,
        factor,
        bn.eps,
    )
    out = torch.zeros(channels_last.shape, dtype=visible.dtype, device=x.device)
    out[sel] = visible
    out = out.permute(0, 3, 1, 2).contiguous()
    if isinstance(bn, BatchNormAct2d):
        out = bn.act(bn.drop(out)) * active.to(out.dtype)  # re-masked: an activation need not map 0 to 0
    return out


@contextmanager
def sparse_encoding(model: nn.Module, active: Tensor) -> Iterator[Callable[[tuple[int, int] | torch.Size], Tensor]]:
    """While inside, `model` behaves as a sparse network that sees only the visible patches of `active`.

    Pooling outputs are re-masked by forward hooks; BatchNorm forwards are swapped, per instance, for
    `sparse_batch_norm`, which reads only visible positions and zeroes the others. Convolution outputs need
    no mask of their own because each feeds a BatchNorm (masking them as well cost a multiplication per
    convolution and its backward, about 5 % of a bf16 SparK step on CPU). Hooks and swaps are undone on
    exit, so the module tree, its state_dict keys and its behaviour outside the block are unchanged.
    Yields the mask-at-size function (cached per size).
    Maps smaller than the mask grid (none in the registered backbones) are left dense.
    """
    cache: dict[tuple[int, int], Tensor] = {}
    grid = active.shape[-2:]

    def at(size: tuple[int, int] | torch.Size) -> Tensor:
        key = (int(size[0]), int(size[1]))
        if key not in cache:
            cache[key] = mask_at(active, key)
        return cache[key]

    def too_small(t: Tensor) -> bool:
        return t.shape[-2] < grid[0] or t.shape[-1] < grid[1]

    def mask_output(_module: nn.Module, _args: Any, output: Tensor) -> Tensor | None:
        if too_small(output):
            return None
        return output * at(output.shape[-2:]).to(output.dtype)

    def sparse_bn_forward(bn: _BatchNorm, x: Tensor) -> Tensor:
        if too_small(x):
            return type(bn).forward(bn, x)
        return sparse_batch_norm(bn, x, at(x.shape[-2:]))

    handles = []
    patched: list[nn.Module] = []
    try:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                # An instance attribute shadows the class's forward; deleting it restores the original.
                module.forward = partial(sparse_bn_forward, module)
                patched.append(module)
            elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
                handles.append(module.register_forward_hook(mask_output))
        yield at
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward


def masked_patch_loss(pred: Tensor, target: Tensor, active: Tensor, eps: float = 1e-6) -> Tensor:
    """MSE between `pred` and per-patch-normalised `target` (both N×C×H×W), averaged over masked patches.

    Patches are the image regions of the mask grid's cells (`mask_at` at the image size); border patches
    of an image that is not a multiple of the patch size are smaller, and only their real pixels count.
    Each patch is normalised by its own mean and (unbiased) variance over channels and pixels, as in
    SparK and MAE's norm-pix loss, so the decoder learns local structure rather than brightness.
    """
    n, c, big_h, big_w = target.shape
    h, w = active.shape[-2:]
    fh, fw = _factor(big_h, h), _factor(big_w, w)
    pad = (0, fw * w - big_w, 0, fh * h - big_h)

    def patches(t: Tensor) -> Tensor:
        t = F.pad(t, pad)
        ch = t.shape[1]
        return t.reshape(t.shape[0], ch, h, fh, w, fw).permute(0, 2, 4, 1, 3, 5).reshape(t.shape[0], h * w, -1)

    pv = patches(torch.ones(1, c, big_h, big_w, device=target.device))  # (1, L, C·fh·fw): 1 = real pixel
    count = pv.sum(-1, keepdim=True)
    t = patches(target.float())
    mean = (t * pv).sum(-1, keepdim=True) / count
    var = ((t - mean) ** 2 * pv).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
    t = (t - mean) / (var + eps).sqrt()
    err = (((patches(pred.float()) - t) ** 2) * pv).sum(-1) / count.squeeze(-1)  # (N, L)
    masked = (~active.reshape(n, h * w)).float()
    return (err * masked).sum() / masked.sum().clamp(min=1)


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


class _UpBlock(nn.Module):
    """SparK's UNet block: upsample to the next scale, then two 3×3 conv–BN–ReLU6.

    Nearest-neighbour resizing replaces SparK's stride-2 transposed convolution because our scales are not
    always powers of two apart (28 → 14 → 7 → 4 px).
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class SparKConfig(MethodConfig):
    """Paper defaults: mask ratio 0.6, wd 0.04, β₂ 0.95, crop scale (0.67, 1); lr from the paper's, rescaled.

    SparK trains ResNets at lr 3.2e-3 (base 2e-4 × 4096/256) with batch 4096. Its linear rule gives 2e-4 at our
    batch of 256, 16× lower; for Adam-type optimisers the square-root rule holds instead (Malladi et al., 2022),
    which gives 8e-4. Measured on bloodmnist, 30 epochs (BENCHMARKS.md): with 8e-4 the linear probe's mean AUC
    over 3 seeds is above the random network's at 1% and 10% of the labels (0.890 vs 0.884, 0.951 vs 0.944), with
    2e-4 it ties; whether that margin is beyond seed-to-seed variation is not yet tested (see BENCHMARKS.md).
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
        if backbone.family not in STAGES:
            raise MedpretrainError(
                f"spark needs a convolutional backbone, got {backbone.name}",
                "use resnet18, resnet50 or efficientnet_lite0 (or mae for vit_tiny)",
            )
        self.stage_names = STAGES[backbone.family]
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
        targets = [size for _, size in deep_first[1:]]
        cur = deep_first[-1][1]
        while cur[0] < image_size or cur[1] < image_size:
            cur = (min(cur[0] * 2, image_size), min(cur[1] * 2, image_size))
            targets.append(cur)
        if len(targets) == len(deep_first) - 1:
            # The shallowest scale is already full size: one more block so its skip is convolved, not
            # only projected to pixels.
            targets.append(deep_first[-1][1])
        self.targets = targets
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
        self.blocks = nn.ModuleList(_UpBlock(widths[k], widths[k + 1]) for k in range(len(targets)))
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
