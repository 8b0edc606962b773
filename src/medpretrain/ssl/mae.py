"""MAE (He et al., CVPR 2022): masked autoencoding for Vision Transformers, from lightly's modules.

75 % of the patch tokens are dropped; the encoder (the backbone's own timm ViT, wrapped by lightly's
`MaskedVisionTransformerTIMM`, which shares its modules) sees the class token and the visible tokens only.
A narrow transformer decoder gets the encoded tokens back in place, a learned mask token elsewhere, and
predicts the pixels of the masked patches; the target is each patch normalised by its own mean and
variance (norm-pix loss) and the MSE counts masked patches only.

With the project's `vit_tiny`: ``--small-stem`` (4-px patches) gives 7×7 tokens at 28 px and 16×16 at
64 px; without it (16-px patches) 28 px gives 2×2 tokens, which is rejected (at least 4×4 is needed).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
from pydantic import Field
from torch import Tensor, nn

from medpretrain.augment import ViewRecipe
from medpretrain.backbones import Backbone
from medpretrain.errors import MedpretrainError
from medpretrain.ssl.base import Method, MethodConfig, StepOutput, register_method

MIN_GRID = 4


class MAEConfig(MethodConfig):
    """Paper defaults: mask ratio 0.75, AdamW base lr 1.5e-4 × batch/256, wd 0.05, β₂ 0.95, norm-pix loss,
    random resized crop (0.2, 1) + flip. The paper warms up 40 of 800–1600 epochs; 5 keeps roughly that
    fraction for runs of ~50–100 epochs.

    The paper's decoder (512-d, 8 blocks) was sized for ViT-L and would be several times larger than
    vit_tiny (192-d, 12 blocks); the paper shows depth and width barely matter for the learned features, so a
    256-d, 4-block decoder keeps it lighter than the encoder.
    """

    optimizer: Literal["lars", "sgd", "adamw", "adam"] = "adamw"
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 5
    beta2: float = Field(0.95, gt=0, lt=1, description="AdamW β₂ (the papers' 0.95)")
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    decoder_dim: int = Field(256, gt=0)
    decoder_depth: int = Field(4, ge=1)
    decoder_heads: int = Field(8, ge=1)
    norm_pix_loss: bool = True
    crop_scale_min: float = Field(0.2, gt=0, le=1, description="random resized crop keeps ≥ this area")


@register_method
class MAE(Method):
    name: ClassVar[str] = "mae"
    description: ClassVar[str] = "MAE: masked autoencoder for ViTs (75 % of patches masked, pixel targets)"
    family: ClassVar[str] = "masked"
    config_class: ClassVar[type[MethodConfig]] = MAEConfig
    backbone_families: ClassVar[tuple[str, ...]] = ("vit",)
    config: MAEConfig

    def __init__(self, backbone: Backbone, config: MAEConfig, *, channels: int, image_size: int) -> None:
        super().__init__(backbone, config, channels=channels, image_size=image_size)
        if backbone.family != "vit":
            raise MedpretrainError(
                f"mae needs a Vision Transformer backbone, got {backbone.name}", "use vit_tiny (or spark for CNNs)"
            )
        if config.decoder_dim % config.decoder_heads:
            raise MedpretrainError(
                f"mae decoder_dim {config.decoder_dim} is not divisible by decoder_heads {config.decoder_heads}",
                "choose decoder_dim as a multiple of decoder_heads",
            )
        vit = backbone.model
        if vit.num_prefix_tokens != 1:
            raise MedpretrainError(
                f"mae expects a ViT with exactly one class token, {backbone.name} has {vit.num_prefix_tokens}",
                "use vit_tiny",
            )
        self.patch_size = int(vit.patch_embed.patch_size[0])
        gh, gw = vit.patch_embed.dynamic_feat_size((image_size, image_size))
        if min(gh, gw) < MIN_GRID:
            raise MedpretrainError(
                f"mae at {image_size} px with {self.patch_size}-px patches has only {gh}×{gw} tokens; it needs at "
                f"least {MIN_GRID}×{MIN_GRID}",
                "use --small-stem (4-px patches) or a larger --image-size",
            )
        self.grid = (int(gh), int(gw))
        # Both initialisations are skipped so the backbone keeps whatever init the run asked for (scratch,
        # ImageNet, a checkpoint); its learnable position embedding stays learnable (MAE reports fixed
        # sin-cos and learned embeddings perform alike). The wrapper shares the ViT's modules, it copies nothing.
        self.encoder = MaskedVisionTransformerTIMM(
            vit=vit, weight_initialization="skip", pos_embed_initialization="skip"
        )
        # The encoder-side mask token is only used by SimMIM-style masking, not by MAE, which drops tokens;
        # frozen so DDP does not wait for its gradient.
        self.encoder.mask_token.requires_grad_(False)
        self.decoder_embed = nn.Linear(vit.embed_dim, config.decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=gh * gw,
            embed_dim=config.decoder_dim,
            depth=config.decoder_depth,
            num_heads=config.decoder_heads,
            num_prefix_tokens=1,
        )
        self.decoder_pred = nn.Linear(config.decoder_dim, self.patch_size**2 * channels)
        self.recipe = ViewRecipe(crop_scale=(config.crop_scale_min, 1.0), hflip=0.5, output_size=image_size)

    def views(self, batch: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        return [self.recipe(batch, generator=generator)]

    def random_mask(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(idx_keep, idx_mask) over the class token + patch tokens; the class token is always kept."""
        return utils.random_token_mask((n, self.grid[0] * self.grid[1] + 1), self.config.mask_ratio, device=device)

    def targets(self, x: Tensor) -> Tensor:
        """Pixels of every patch (N, L, p²·C), from the view in [0, 1] with its native channels.

        timm pads an image that is not a multiple of the patch size on the right and bottom; so does this.
        """
        p = self.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return utils.patchify(x, p)

    def forward_masked(self, x: Tensor, idx_keep: Tensor, idx_mask: Tensor) -> StepOutput:
        """Loss and embedding for views `x` (N, C, H, W in [0, 1]) with the given token split."""
        n = x.shape[0]
        encoded = self.encoder.encode(self.backbone.prepare(x), idx_keep=idx_keep)  # (N, 1 + keep, D)
        tokens = self.decoder_embed(encoded)
        full = utils.repeat_token(self.decoder.mask_token, (n, self.decoder.sequence_length))
        full = utils.set_at_index(full, idx_keep, tokens.type_as(full))
        decoded = self.decoder.decode(self.decoder.add_pos_embed(full))
        pred = self.decoder_pred(utils.get_at_index(decoded, idx_mask))
        # Token 0 is the class token, so patch i is token i + 1.
        target = utils.get_at_index(self.targets(x), idx_mask - 1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            target = target.float()
            if self.config.norm_pix_loss:
                target = utils.normalize_mean_var(target, dim=-1)
            loss = F.mse_loss(pred.float(), target)
        # The class token of the visible tokens is what the backbone pools (global_pool="token").
        return StepOutput(loss=loss, embedding=encoded[:, 0].detach().float())

    def step(self, views: list[Tensor]) -> StepOutput:
        x = views[0]
        idx_keep, idx_mask = self.random_mask(x.shape[0], x.device)
        return self.forward_masked(x, idx_keep, idx_mask)
