"""A convolutional variational autoencoder (Kingma & Welling, 2014) whose encoder is the backbone.

The backbone's pooled features feed two linear maps, the posterior mean μ and log-variance log σ²; a sample
z = μ + σ·ε (reparameterisation) is decoded by a small transposed-convolution decoder into pixels in
[0, 1]. The loss per image is the reconstruction term (Bernoulli cross-entropy or squared error, summed
over pixels and channels) plus β times the KL divergence to N(0, I), averaged over the batch; β can be
ramped up from 0 over the first epochs (KL warm-up) to keep the posterior from collapsing early.

The representation of a VAE is μ. Evaluation (linear probe, kNN, fine-tuning) uses the backbone's pooled
features h, of which μ = W·h + b is a linear function: a linear probe on h can express anything a linear
probe on μ can, so h is at least as good a feature as μ under our protocols, and it is the same
interface every other method is evaluated through.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from medpretrain.augment import ViewRecipe
from medpretrain.backbones import Backbone
from medpretrain.ssl.base import Method, MethodConfig, StepOutput, register_method

START_SIZE = 4  # the decoder's first feature map is about 4×4, then doubles up to the image size


class VAEConfig(MethodConfig):
    """Defaults: Adam, lr 1e-3 at batch 256 (scaled linearly), no weight decay or warm-up, β = 1 (the
    evidence lower bound proper), KL warm-up over the first epoch, 128-d latent, Bernoulli likelihood.
    Views are the images with random horizontal flips only: a VAE models the data distribution itself."""

    optimizer: Literal["lars", "sgd", "adamw", "adam"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    latent_dim: int = Field(128, gt=0)
    beta: float = Field(1.0, ge=0)
    kl_warmup_epochs: float = Field(1.0, ge=0, description="ramp β linearly from 0 over this many epochs (0 = off)")
    reconstruction: Literal["bce", "mse"] = "bce"
    decoder_channels: int = Field(256, ge=8, description="channels of the decoder's first map, halved per doubling")


@register_method
class VAE(Method):
    name: ClassVar[str] = "vae"
    description: ClassVar[str] = "VAE: variational autoencoder, backbone encoder + conv decoder (ELBO)"
    family: ClassVar[str] = "generative"
    config_class: ClassVar[type[MethodConfig]] = VAEConfig
    config: VAEConfig

    def __init__(self, backbone: Backbone, config: VAEConfig, *, channels: int, image_size: int) -> None:
        super().__init__(backbone, config, channels=channels, image_size=image_size)
        nf = backbone.num_features
        self.fc_mu = nn.Linear(nf, config.latent_dim)
        self.fc_logvar = nn.Linear(nf, config.latent_dim)
        doublings = max(0, math.ceil(math.log2(image_size / START_SIZE)))
        self.start_size = math.ceil(image_size / 2**doublings)
        width = config.decoder_channels
        self.fc_dec = nn.Linear(config.latent_dim, width * self.start_size**2)
        layers: list[nn.Module] = [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        for _ in range(doublings):
            out = max(width // 2, 32)
            layers += [nn.ConvTranspose2d(width, out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(out)]
            layers.append(nn.ReLU(inplace=True))
            width = out
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.decoder = nn.Sequential(*layers)
        self.recipe = ViewRecipe(crop_scale=None, hflip=0.5, output_size=image_size)
        # A buffer, so a resumed run continues the ramp where it stopped instead of restarting it.
        self.register_buffer("kl_weight", torch.tensor(0.0 if config.kl_warmup_epochs > 0 else 1.0))

    def views(self, batch: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        return [self.recipe(batch, generator=generator)]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance (N, latent_dim) of views in [0, 1]."""
        h = self.backbone(x)
        # Clamped so that exp(log σ²) cannot overflow in the first steps of a scratch network.
        return self.fc_mu(h), self.fc_logvar(h).clamp(-30.0, 20.0)

    def decode_logits(self, z: Tensor) -> Tensor:
        """Pixel logits (N, C, H, W); `torch.sigmoid` of them is the reconstruction in [0, 1]."""
        x = self.fc_dec(z).view(z.shape[0], -1, self.start_size, self.start_size)
        logits = self.decoder(x)
        if logits.shape[-1] != self.image_size:
            logits = F.interpolate(
                logits, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return logits

    def step(self, views: list[Tensor]) -> StepOutput:
        x = views[0]
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = self.decode_logits(z)
        # float32: sums over whole images overflow half precision.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits, target, mu, logvar = logits.float(), x.float(), mu.float(), logvar.float()
            if self.config.reconstruction == "bce":
                rec = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            else:
                rec = (torch.sigmoid(logits) - target) ** 2
            rec = rec.flatten(1).sum(1).mean()
            kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)).mean()
            loss = rec + self.config.beta * self.kl_weight * kl
        return StepOutput(loss=loss, embedding=mu.detach())

    def after_step(self, step: int, total_steps: int) -> None:
        super().after_step(step, total_steps)
        # An unknown epoch length (no clock) disables the ramp: steps(...) is 0.
        warm = self.clock.steps(self.config.kl_warmup_epochs)
        self.kl_weight.fill_(min(1.0, (step + 1) / warm) if warm > 0 else 1.0)
