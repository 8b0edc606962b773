"""Batched, on-device image augmentation for whole uint8 batches (N×C×H×W).

Every random parameter is drawn per sample in one vectorised call and applied with tensor ops
(one affine grid for crop + flip + rotation, broadcast arithmetic for intensity, one grouped
convolution for blur), so a batch costs a handful of kernel launches wherever it lives. Parameters
are drawn on the CPU from the given `torch.Generator` and then moved to the batch's device, so a
seed gives the same views on CPU and GPU.

Modality awareness: a 1-channel batch only ever gets brightness/contrast/gamma (and blur and
solarisation); saturation, hue and random-grayscale apply to 3-channel batches only, so grayscale
modalities (X-ray, CT, ultrasound) never acquire colour and keep their single channel.

`ViewRecipe` is the composable unit: the supervised preset is mild (`finetune_recipe()`); the
self-supervised methods build stronger ones (`contrastive_recipe()` or `dataclasses.replace`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights, the same as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# RGB → YIQ and back; a hue shift is a rotation of the (I, Q) chroma plane, which keeps luma fixed
# and is a pure 3×3 matrix product (no HSV round trip, no branches).
_RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] → float32 in [0, 1]; float input is assumed to be in [0, 1] already."""
    if batch.dtype == torch.uint8:
        return batch.float().div_(255.0)
    return batch.float()


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def _bernoulli(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


@dataclass(frozen=True)
class ViewRecipe:
    """One random view of an image batch; `recipe(batch, generator=g)` → float batch in [0, 1].

    Geometry (one bilinear resample): `crop_scale` (area fraction) and `crop_ratio` (aspect) of a
    random resized crop — None disables the crop; `hflip`/`vflip` probabilities; `rotation` in
    degrees (uniform ±). `output_size` resizes the view (None keeps the input size).
    Intensity, applied with probability `jitter_p` per sample, factors uniform in [1 − v, 1 + v]:
    `brightness`, `contrast`, `gamma`; 3-channel only: `saturation` and `hue` (fraction of a full
    turn, uniform ±). `grayscale_p` (3-channel only) converts to luma.
    `blur_p` with sigma uniform in `blur_sigma` pixels *at 224 px*, scaled to the image side, so a
    recipe means the same at 28 and 224 px. `solarize_p` inverts pixels above `solarize_threshold`.
    """

    crop_scale: tuple[float, float] | None = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    rotation: float = 0.0
    padding_mode: str = "reflection"
    output_size: int | None = None
    jitter_p: float = 1.0
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        for name in ("hflip", "vflip", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")
        for name in ("brightness", "contrast", "gamma", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")

    def with_(self, **changes: object) -> ViewRecipe:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def __call__(self, batch: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"expected an N×C×H×W batch with C in {{1, 3}}, got shape {tuple(batch.shape)}")
        x = to_float(batch)
        if x.shape[0] == 0:
            return x
        x = self._geometry(x, generator)
        x = self._intensity(x, generator)
        if self.blur_p > 0:
            x = self._blur(x, generator)
        if self.solarize_p > 0:
            apply = _bernoulli(x.shape[0], self.solarize_p, generator).to(x.device).view(-1, 1, 1, 1)
            x = torch.where(apply & (x >= self.solarize_threshold), 1.0 - x, x)
        return x.clamp_(0.0, 1.0)

    def _geometry(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        n, c, h, w = x.shape
        out_h, out_w = (self.output_size, self.output_size) if self.output_size else (h, w)
        needs_resample = (
            self.crop_scale is not None or self.rotation > 0 or (out_h, out_w) != (h, w)
        )  # flips alone are an index flip, not a resample
        if not needs_resample:
            if self.hflip > 0:
                flip = _bernoulli(n, self.hflip, g).to(x.device).view(-1, 1, 1, 1)
                x = torch.where(flip, x.flip(3), x)
            if self.vflip > 0:
                flip = _bernoulli(n, self.vflip, g).to(x.device).view(-1, 1, 1, 1)
                x = torch.where(flip, x.flip(2), x)
            return x
        # Crop size as fractions of the side, from (area, log-aspect) like torchvision's
        # RandomResizedCrop; clipping to 1 replaces its rejection loop.
        if self.crop_scale is not None:
            area = _uniform(n, *self.crop_scale, g)
            log_r = _uniform(n, math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), g)
            ratio = torch.exp(log_r)
            sw = torch.sqrt(area * ratio).clamp(max=1.0)
            sh = torch.sqrt(area / ratio).clamp(max=1.0)
            # Centre in normalised [-1, 1] coordinates such that the crop stays inside the image.
            cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - sw)
            cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - sh)
        else:
            sw = sh = torch.ones(n)
            cx = cy = torch.zeros(n)
        angle = _uniform(n, -self.rotation, self.rotation, g) * (math.pi / 180.0)
        fx = torch.where(_bernoulli(n, self.hflip, g), -1.0, 1.0)
        fy = torch.where(_bernoulli(n, self.vflip, g), -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # theta maps output grid coordinates to input coordinates: R(angle) · diag(sw·fx, sh·fy) + centre.
        theta = torch.stack(
            [
                torch.stack([cos * sw * fx, -sin * sh * fy, cx], dim=1),
                torch.stack([sin * sw * fx, cos * sh * fy, cy], dim=1),
            ],
            dim=1,
        ).to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False)

    def _intensity(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        n, c = x.shape[:2]
        colour = c == 3
        strengths = (self.brightness, self.contrast, self.gamma)
        colour_strengths = (self.saturation, self.hue) if colour else (0.0, 0.0)
        if any(v > 0 for v in (*strengths, *colour_strengths)) and self.jitter_p > 0:
            dev, dt = x.device, x.dtype
            apply = _bernoulli(n, self.jitter_p, g)

            def factor(strength: float) -> torch.Tensor:
                f = _uniform(n, 1.0 - strength, 1.0 + strength, g)
                return torch.where(apply, f, torch.ones(n)).to(device=dev, dtype=dt).view(-1, 1, 1, 1)

            if self.brightness > 0:
                x = (x * factor(self.brightness)).clamp_(0.0, 1.0)
            if self.contrast > 0:
                mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
                x = ((x - mean) * factor(self.contrast) + mean).clamp_(0.0, 1.0)
            if self.gamma > 0:
                x = x.clamp(min=1e-6).pow(factor(self.gamma)).clamp_(0.0, 1.0)
            if colour and self.saturation > 0:
                gray = _luma(x)
                x = ((x - gray) * factor(self.saturation) + gray).clamp_(0.0, 1.0)
            if colour and self.hue > 0:
                turn = _uniform(n, -self.hue, self.hue, g) * (2 * math.pi)
                turn = torch.where(apply, turn, torch.zeros(n))
                x = _rotate_hue(x, turn.to(device=dev, dtype=dt)).clamp_(0.0, 1.0)
        if colour and self.grayscale_p > 0:
            to_gray = _bernoulli(n, self.grayscale_p, g).to(x.device).view(-1, 1, 1, 1)
            x = torch.where(to_gray, _luma(x).expand_as(x), x)
        return x

    def _blur(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        n, c, h, w = x.shape
        scale = min(h, w) / 224.0
        sigma = _uniform(n, *self.blur_sigma, g) * scale
        apply = _bernoulli(n, self.blur_p, g)
        radius = max(1, min(math.ceil(3 * float(sigma.max())), (min(h, w) - 1) // 2))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.clamp(min=1e-3).view(-1, 1) ** 2))
        kernel = kernel / kernel.sum(dim=1, keepdim=True)
        # One grouped convolution over all N·C planes; each sample's channels share its kernel.
        k = kernel.repeat_interleave(c, dim=0).to(device=x.device, dtype=x.dtype)
        planes = x.reshape(1, n * c, h, w)
        planes = F.pad(planes, (radius, radius, radius, radius), mode="reflect")
        planes = F.conv2d(planes, k.view(n * c, 1, 1, -1), groups=n * c)
        planes = F.conv2d(planes, k.view(n * c, 1, -1, 1), groups=n * c)
        blurred = planes.view(n, c, h, w)
        return torch.where(apply.to(x.device).view(-1, 1, 1, 1), blurred, x)


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _rotate_hue(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    to_yiq = torch.tensor(_RGB2YIQ, device=x.device, dtype=x.dtype)
    from_yiq = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(turn), torch.sin(turn)
    one, zero = torch.ones_like(turn), torch.zeros_like(turn)
    rot = torch.stack(
        [
            torch.stack([one, zero, zero], 1),
            torch.stack([zero, cos, -sin], 1),
            torch.stack([zero, sin, cos], 1),
        ],
        dim=1,
    )  # (N, 3, 3)
    m = from_yiq.unsqueeze(0) @ rot @ to_yiq.unsqueeze(0)
    return torch.einsum("nij,njhw->nihw", m, x)


def finetune_recipe() -> ViewRecipe:
    """Mild label-preserving views for supervised fine-tuning (any modality)."""
    return ViewRecipe(crop_scale=(0.8, 1.0), hflip=0.5, rotation=10.0, brightness=0.1, contrast=0.1)


def contrastive_recipe(*, blur_p: float = 0.5, solarize_p: float = 0.0) -> ViewRecipe:
    """SimCLR-style strong views, toned down for medical images (crop ≥ 0.2 of the area, weaker colour)."""
    return ViewRecipe(
        crop_scale=(0.2, 1.0),
        hflip=0.5,
        rotation=0.0,
        jitter_p=0.8,
        brightness=0.4,
        contrast=0.4,
        gamma=0.0,
        saturation=0.4,
        hue=0.1,
        grayscale_p=0.2,
        blur_p=blur_p,
        solarize_p=solarize_p,
    )


def byol_view_pair(base: ViewRecipe | None = None) -> tuple[ViewRecipe, ViewRecipe]:
    """BYOL's asymmetric pair of views (Grill et al., 2020), from `base` (default `contrastive_recipe()`):
    the first always blurred and never solarised, the second rarely blurred (0.1) and sometimes solarised
    (0.2). DINO (Caron et al., 2021) takes its two global crops the same way."""
    base = base if base is not None else contrastive_recipe()
    return base.with_(blur_p=1.0, solarize_p=0.0), base.with_(blur_p=0.1, solarize_p=0.2)


def eval_view(batch: torch.Tensor) -> torch.Tensor:
    """What evaluation sees: the image as it is, as float in [0, 1]."""
    return to_float(batch)


__all__ = ["ViewRecipe", "byol_view_pair", "contrastive_recipe", "eval_view", "finetune_recipe", "to_float"]
