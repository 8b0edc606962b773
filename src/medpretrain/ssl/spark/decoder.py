"""SparK's light UNet-style decoder: densify each encoder scale, then upsample from the deepest back to pixels.

SparK (Tian et al., ICLR 2023, "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked
Modeling") fills the masked positions of each sparse encoder scale with a learned mask token ("densify") and
decodes hierarchically: from the deepest scale upwards, each block upsamples and the next shallower densified
scale is added. The method (`medpretrain.ssl.spark.method.SparK`) owns the decoder's parameters directly, so
their state_dict keys are those of the method; this module holds the block and the geometry of the stack.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def decoder_targets(deep_first_sizes: list[tuple[int, int]], image_size: int) -> list[tuple[int, int]]:
    """Output size of each decoder block: the shallower encoder scales, then doublings up to the image size.

    `deep_first_sizes` are the encoder scales' (H, W), deepest first.
    """
    targets = list(deep_first_sizes[1:])
    cur = deep_first_sizes[-1]
    while cur[0] < image_size or cur[1] < image_size:
        cur = (min(cur[0] * 2, image_size), min(cur[1] * 2, image_size))
        targets.append(cur)
    if len(targets) == len(deep_first_sizes) - 1:
        # The shallowest scale is already full size: one more block so its skip is convolved, not
        # only projected to pixels.
        targets.append(deep_first_sizes[-1])
    return targets


class UpBlock(nn.Module):
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


__all__ = ["UpBlock", "decoder_targets"]
