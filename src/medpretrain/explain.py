"""What a network looks at and how its features arrange the test set: Grad-CAM maps and UMAP embeddings.

pytorch-grad-cam computes the maps and umap-learn the embedding; this module only adapts our networks and
feature arrays to them (input scaling, the ViT token grid, a fixed seed, an exact neighbour graph).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from medpretrain.runtime import torch_threads
from medpretrain.train import Classifier

UMAP_NEIGHBORS = 15


def _vit_reshape(model: Classifier, image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Tokens (N, prefix + h·w, D) → (N, D, h, w), the layout Grad-CAM expects of a feature map."""
    vit = model.backbone.model
    h, w = vit.patch_embed.dynamic_feat_size((image_size, image_size))
    prefix = int(vit.num_prefix_tokens)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens[:, prefix:]
        return grid.transpose(1, 2).reshape(grid.shape[0], grid.shape[2], h, w)

    return reshape


def gradcam_maps(model: Classifier, images: torch.Tensor, targets: list[int]) -> np.ndarray:
    """Grad-CAM heat maps (N, H, W) in [0, 1] of a few `images` (uint8 N×C×H×W), one output index per image."""
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    reshape = _vit_reshape(model, x.shape[-1]) if model.backbone.spec.token_grid else None
    with (
        torch_threads(1),
        GradCAM(model=model, target_layers=[model.backbone.gradcam_layer], reshape_transform=reshape) as cam,
    ):
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return np.nan_to_num(np.asarray(maps, dtype=np.float32))


def feature_grid(model: Classifier, image: torch.Tensor) -> tuple[int, int]:
    """Height and width of the last feature map for one image (1×1 means Grad-CAM cannot localise)."""
    with torch_threads(1), torch.no_grad():
        maps = model.backbone.forward_maps(image[None] if image.ndim == 3 else image[:1])
    return int(maps.shape[-2]), int(maps.shape[-1])


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """One uint8 C×H×W image (C = 1 or 3) with its heat map blended in, as RGB uint8 H×W×3."""
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
    return show_cam_on_image(rgb.transpose(1, 2, 0).astype(np.float32) / 255.0, heat, use_rgb=True)


def _numba_without_openmp() -> None:
    """Keep numba (under UMAP) off OpenMP unless the user chose a threading layer.

    numba's OpenMP layer shares libgomp with torch: after one UMAP it had reset torch's thread count and left
    spinning workers that made every later torch call in the process 20-50× slower (measured on 2 cores:
    Grad-CAM of 8 images 0.1 s → 5.5 s). The workqueue layer has no such coupling. A layer already started
    in this process stays as it is; setting the option then has no effect.
    """
    if "NUMBA_THREADING_LAYER" not in os.environ:
        import numba

        numba.config.THREADING_LAYER = "workqueue"


def umap_embedding(features: np.ndarray, *, seed: int = 0, n_neighbors: int = UMAP_NEIGHBORS) -> np.ndarray:
    """2-D UMAP of feature vectors (N, D), reproducible for a given seed.

    Features are standardised first (as for the linear probe), so no single feature dimension dominates
    the distances. The k-nearest-neighbour graph is computed exactly with scikit-learn and handed to UMAP:
    for the few thousand points a report shows that is fast, and it skips compiling umap's parallel
    neighbour search, which costs ~8 s per process on 2 cores.
    """
    _numba_without_openmp()
    import umap  # imported here: umap-learn and numba take seconds to import, only this function needs them

    x = StandardScaler().fit_transform(np.asarray(features, dtype=np.float32))
    k = max(2, min(n_neighbors, len(x) - 1))
    dist, idx = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    # 200 epochs (umap-learn's own choice above 10k points) rather than its 500 for small sets: the layout of
    # a few thousand points has settled by then, at 2.5× less time per panel (1.0 s vs 2.8 s for 2000 points).
    reducer = umap.UMAP(n_neighbors=k, n_epochs=200, random_state=seed, precomputed_knn=(idx, dist, None))
    with warnings.catch_warnings():
        # "n_jobs overridden by setting random_state": the fixed seed is what we want, serial is the price.
        warnings.filterwarnings("ignore", message=".*n_jobs.*", category=UserWarning)
        # Without an NNDescent index UMAP cannot `transform` new points; we never do.
        warnings.filterwarnings("ignore", message=".*knn_search_index.*", category=UserWarning)
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)
