"""Frozen-feature extraction and its disk cache.

Features are keyed by (init, backbone, stem, dataset content, image size) and written once per split as
`.npy`; the linear probe, kNN and later the report's embedding maps all read the same arrays.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medpretrain.backbones import Backbone
from medpretrain.data.base import SPLITS, Dataset
from medpretrain.inits import InitSpec, build_model
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

    def key(self, init: InitSpec, backbone: str, small_stem: bool, dataset: Dataset) -> str:
        stem = "-smallstem" if small_stem else ""
        return f"{init.key}-{backbone}{stem}-{dataset.key}"

    def get(
        self,
        init: InitSpec,
        backbone: str,
        small_stem: bool,
        dataset: Dataset,
        *,
        progress: bool = True,
    ) -> dict[str, np.ndarray]:
        folder = self.root / self.key(init, backbone, small_stem, dataset)
        paths = {split: folder / f"{split}.npy" for split in SPLITS}
        if all(p.exists() for p in paths.values()):
            return {split: np.load(p) for split, p in paths.items()}
        model, _ = build_model(
            backbone, init, small_stem=small_stem, seed=SCRATCH_FEATURE_SEED, img_size=dataset.image_size
        )
        folder.mkdir(parents=True, exist_ok=True)
        out = {}
        for split, path in paths.items():
            if path.exists():
                out[split] = np.load(path)
                continue
            out[split] = extract(model, dataset.images[split], progress=progress, desc=f"features {split}")
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp.npy")
            os.close(fd)
            np.save(tmp, out[split])
            os.replace(tmp, path)
        return out
