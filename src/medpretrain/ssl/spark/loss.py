"""SparK's reconstruction loss: per-patch normalised pixels, squared error on masked patches only.

SparK (Tian et al., ICLR 2023, "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked
Modeling") regresses each masked patch normalised by its own mean and variance, like MAE's norm-pix loss
(He et al., 2022); visible patches do not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medpretrain.ssl.spark.geometry import patch_factor


def masked_patch_loss(pred: Tensor, target: Tensor, active: Tensor, eps: float = 1e-6) -> Tensor:
    """MSE between `pred` and per-patch-normalised `target` (both N×C×H×W), averaged over masked patches.

    Patches are the image regions of the mask grid's cells (`mask_at` at the image size); border patches
    of an image that is not a multiple of the patch size are smaller, and only their real pixels count.
    Each patch is normalised by its own mean and (unbiased) variance over channels and pixels, as in
    SparK and MAE's norm-pix loss, so the decoder learns local structure rather than brightness.
    """
    n, c, big_h, big_w = target.shape
    h, w = active.shape[-2:]
    fh, fw = patch_factor(big_h, h), patch_factor(big_w, w)
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


__all__ = ["masked_patch_loss"]
