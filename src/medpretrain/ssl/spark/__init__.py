"""SparK (Tian et al., ICLR 2023, "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked
Modeling"): BERT-style masked image modelling for convolutional networks.

The image is cut into patches on the grid of the backbone's *final* feature map (one patch per output
position); 60 % of them are dropped. The encoder must see only the visible patches, as if it were a sparse
network; here the timm model stays dense and `sparse_encoding` emulates sparsity while it is active. A light
UNet-style decoder fills the masked positions of each encoder scale with a learned mask token ("densify"), and
upsamples from the deepest scale, adding the shallower ones, back to pixels. The target is each patch
normalised by its own mean and variance; the MSE counts masked patches only.

The package holds one piece a module: `geometry` (where a patch lies on each map: `mask_at`), `sparse` (the
sparse-encoder emulation), `loss` (`masked_patch_loss`), `decoder` (the UNet block) and `method` (`SparK`
and its config, registered as "spark").

Which settings are valid: the mask lives on the final feature map, which must be at least 4×4 (a 1×1
or 2×2 grid leaves nothing to predict from). Final grid = ceil(image_size / 32) for the standard ResNet
stem and EfficientNet-Lite0, ceil(image_size / 8) for the ResNet small stem. So:

- resnet18 / resnet50 with ``--small-stem``: any image size ≥ 25 px (28 px → 4×4, 64 px → 8×8);
- resnet18 / resnet50 standard stem and efficientnet_lite0: image size ≥ 97 px (128 px → 4×4,
  224 px → 7×7, SparK's own setting); 28 and 64 px are rejected.

At 28 px with the small stem the stage maps are 28, 14, 7 and 4 px, so a patch is 8 px (the last row and
column of patches are 4 px wide); `mask_at` follows how the stride-2 convolutions (ceil) map positions.
"""

from medpretrain.ssl.spark.geometry import mask_at
from medpretrain.ssl.spark.loss import masked_patch_loss
from medpretrain.ssl.spark.method import MIN_GRID, SparK, SparKConfig
from medpretrain.ssl.spark.sparse import sparse_batch_norm, sparse_encoding

__all__ = [
    "MIN_GRID",
    "SparK",
    "SparKConfig",
    "mask_at",
    "masked_patch_loss",
    "sparse_batch_norm",
    "sparse_encoding",
]
