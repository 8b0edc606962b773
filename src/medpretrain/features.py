"""Frozen-feature extraction and its disk cache.

Features are keyed by (init, backbone, stem, dataset content, image size) and written once per split as
`.npy`; the linear probe, kNN and later the report's embedding maps all read the same arrays. An init kind
without a network (``noise``) supplies its features itself (`InitKind.features`): they are made here, at the
backbone's width, and cached like any other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import update_bn
from tqdm.auto import tqdm

from medpretrain.atomic import write_with
from medpretrain.backbones import DEFAULT_INPUT_NORM, Backbone, create_backbone
from medpretrain.data.base import SPLITS, Dataset
from medpretrain.inits import KINDS, InitSpec, build_model
from medpretrain.runtime import default_device

# Scratch features come from one fixed random network, so every linear/kNN cell on "scratch" probes the
# same weights and the feature arrays are extracted once (the seed is recorded in the row's config).
SCRATCH_FEATURE_SEED = 0


@torch.inference_mode()
def extract(
    model: Backbone,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    progress: bool = True,
    desc: str = "features",
) -> np.ndarray:
    """Pooled features of uint8 images (N×C×H×W) as float32 (N, D), in eval mode."""
    device = device or default_device()
    model = model.to(device).eval()
    use_amp = device.type == "cuda"
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        batch = images[start : start + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=use_amp):
            chunks.append(model(batch).float().cpu())
    return torch.cat(chunks).numpy()


class FeatureCache:
    """`<root>/features/<key>/<split>.npy`, written atomically so an interrupted run leaves no half file."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "features"

    def key(
        self,
        init: InitSpec,
        backbone: str,
        small_stem: bool,
        dataset: Dataset,
        bn_adapt: bool = False,
        input_norm: str = DEFAULT_INPUT_NORM,
    ) -> str:
        return self.key_of(init.key, backbone, small_stem, dataset.key, bn_adapt, input_norm)

    @staticmethod
    def key_of(
        init_key: str,
        backbone: str,
        small_stem: bool,
        dataset_key: str,
        bn_adapt: bool = False,
        input_norm: str = DEFAULT_INPUT_NORM,
    ) -> str:
        """The key from the strings a results row records (`init_key`, `dataset_key`): a reader needs no
        InitSpec (whose checkpoint may have moved) and no loaded data set to find the arrays."""
        stem = "-smallstem" if small_stem else ""
        adapted = "-bnadapt" if bn_adapt else ""
        norm = "" if input_norm == DEFAULT_INPUT_NORM else f"-norm{input_norm}"  # default: the keys of before
        return f"{init_key}-{backbone}{stem}{adapted}{norm}-{dataset_key}"

    def path(self, key: str, split: str) -> Path:
        """Where the array of one split of `key` lives (whether or not it was written)."""
        return self.root / key / f"{split}.npy"

    def load(self, key: str, split: str) -> np.ndarray | None:
        """The cached array, or None when it was never written. Read-only: unlike `get` it builds no model and
        extracts nothing, so the report can show what a run computed without computing anything itself."""
        path = self.path(key, split)
        return np.load(path) if path.exists() else None

    def get(
        self,
        init: InitSpec,
        backbone: str,
        small_stem: bool,
        dataset: Dataset,
        *,
        bn_adapt: bool = False,
        input_norm: str = DEFAULT_INPUT_NORM,
        progress: bool = True,
    ) -> dict[str, np.ndarray]:
        """Features of every split, from disk when cached, else extracted once and written atomically.

        `bn_adapt` first re-estimates the network's BatchNorm statistics on the dataset's training images (an init
        without a network has none to adapt).
        """
        key = self.key(init, backbone, small_stem, dataset, bn_adapt, input_norm)
        paths = {split: self.path(key, split) for split in SPLITS}
        if all(p.exists() for p in paths.values()):
            return {split: np.load(p) for split, p in paths.items()}
        generate = KINDS[init.kind].features
        if generate is not None:
            # Only the width comes from the backbone; the images are never looked at (only how many there are).
            width = create_backbone(backbone, small_stem=small_stem, img_size=dataset.image_size).num_features

            def compute(split: str) -> np.ndarray:
                return generate(init, width, split, len(dataset.images[split]))

        else:
            model, _ = build_model(
                backbone,
                init,
                small_stem=small_stem,
                seed=SCRATCH_FEATURE_SEED,
                img_size=dataset.image_size,
                input_norm=input_norm,
            )
            if bn_adapt:
                adapt_batchnorm(model, dataset.images["train"])

            def compute(split: str) -> np.ndarray:
                return extract(model, dataset.images[split], progress=progress, desc=f"features {split}")

        out = {}
        for split, path in paths.items():
            if path.exists():
                out[split] = np.load(path)
                continue
            out[split] = compute(split)
            write_with(path, lambda tmp, arr=out[split]: np.save(tmp, arr), suffix=".npy")
        return out


@torch.no_grad()
def adapt_batchnorm(model: Backbone, images: torch.Tensor, *, batch_size: int = 256) -> Backbone:
    """Re-estimate every BatchNorm's running statistics on `images` (uint8, no labels needed): one pass in
    train mode without gradients, torch's `update_bn` (as after SWA; AdaBN, Li et al. 2018, for domain shift).

    A network pre-trained elsewhere (ImageNet, another domain, SparK's masked views) normalises medical images
    with statistics of other images; re-estimating them on the domain's training images is label-free, so
    every budget may use it, and the frozen-feature protocols apply it to every init alike (`bn_adapt`).
    Networks without BatchNorm are left as they are.
    """
    device = default_device()
    model.to(device)
    update_bn(images.split(batch_size), model, device=device)
    return model.eval()
