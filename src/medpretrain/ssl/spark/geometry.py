"""SparK's mask geometry: where a patch of the mask grid lies on each feature map and on the image.

SparK (Tian et al., ICLR 2023, "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked
Modeling") masks patches on the grid of the backbone's *final* feature map, one patch per output position.
Every shallower map, and the image itself, is 2^k times finer; `mask_at` follows how stride-2 convolutions and
pools (output size ceil(H / 2)) map positions, so at 28 px with the ResNet small stem (maps of 28, 14, 7 and
4 px) a patch is 8 px and the last row and column of patches are 4 px wide.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def patch_factor(big: int, small: int) -> int:
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
    fh, fw = patch_factor(big_h, h), patch_factor(big_w, w)
    if math.ceil(big_h / fh) != h or math.ceil(big_w / fw) != w:
        # Not a chain of stride-2 stages (should not happen with the registered backbones): nearest neighbour.
        return F.interpolate(active.float(), size=(big_h, big_w), mode="nearest").bool()
    return active.repeat_interleave(fh, dim=2).repeat_interleave(fw, dim=3)[:, :, :big_h, :big_w]


__all__ = ["mask_at", "patch_factor"]
