"""SparK, MAE and VAE on real MedMNIST batches: training steps, masking semantics, checkpoint keys."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medpretrain.backbones import Backbone, create_backbone
from medpretrain.errors import MedpretrainError
from medpretrain.ssl import Method, get_method, method_config
from medpretrain.ssl.base import TrainingClock
from medpretrain.ssl.mae import MAE, MAEConfig
from medpretrain.ssl.spark import SparK, SparKConfig, mask_at, masked_patch_loss, sparse_encoding
from medpretrain.ssl.vae import VAE, VAEConfig


def _images(root: Path, flag: str, n: int) -> torch.Tensor:
    arr = np.load(root / f"{flag}.npz")["train_images"][:n]
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


@pytest.fixture(scope="module")
def blood(data_root: Path) -> torch.Tensor:
    return _images(data_root, "bloodmnist", 32)  # uint8 32×3×28×28


@pytest.fixture(scope="module")
def pneumonia(data_root: Path) -> torch.Tensor:
    return _images(data_root, "pneumoniamnist", 8)  # uint8 8×1×28×28


def _resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True).round().to(torch.uint8)


def _train_two_steps(method: Method, batch: torch.Tensor, name: str, *, small_stem: bool) -> list[float]:
    """Two optimiser steps as the training loop runs them; checks gradients, updates and the checkpoint keys."""
    before = {k: v.clone() for k, v in method.backbone.model.state_dict().items()}
    method.start(TrainingClock(total_steps=2, steps_per_epoch=1))
    conf = method.configure_optimizers(2, 1)
    opt, schedule = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    losses = []
    for i in range(2):
        out = method.step(method.views(batch, torch.Generator().manual_seed(i)))
        assert torch.isfinite(out.loss), out.loss
        assert out.embedding.shape[0] == batch.shape[0] and out.embedding.ndim == 2
        assert torch.isfinite(out.embedding).all() and not out.embedding.requires_grad
        opt.zero_grad()
        out.loss.backward()
        grads = [p.grad for p in method.backbone.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), "the backbone received no gradient"
        opt.step()
        schedule.step()
        method.after_step(i, 2)
        losses.append(float(out.loss.detach()))
    after = method.backbone.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the backbone did not change"
    # What a checkpoint stores loads strictly into a fresh backbone: no wrapper or renamed keys.
    fresh = create_backbone(name, small_stem=small_stem, img_size=method.image_size)
    fresh.model.load_state_dict(method.backbone.model.state_dict(), strict=True)
    assert set(fresh.model.state_dict()) == set(before)
    # Nothing of the sparse emulation outlives a step.
    for module in method.backbone.model.modules():
        assert not module._forward_hooks and "forward" not in module.__dict__
    return losses


def _spark(name: str, size: int, *, small_stem: bool, channels: int = 3, **cfg: object) -> SparK:
    return SparK(create_backbone(name, small_stem=small_stem), SparKConfig(**cfg), channels=channels, image_size=size)


def test_registry_and_paper_defaults() -> None:
    assert get_method("spark") is SparK and get_method("mae") is MAE and get_method("vae") is VAE
    spark, mae, vae = method_config("spark"), method_config("mae"), method_config("vae")
    assert isinstance(spark, SparKConfig) and (spark.mask_ratio, spark.lr, spark.weight_decay) == (0.6, 8e-4, 0.04)
    assert isinstance(mae, MAEConfig) and (mae.mask_ratio, mae.lr, mae.weight_decay) == (0.75, 1.5e-4, 0.05)
    assert isinstance(vae, VAEConfig) and (vae.optimizer, vae.lr, vae.beta) == ("adam", 1e-3, 1.0)
    with pytest.raises(MedpretrainError, match="allowed keys"):
        method_config("spark", {"mask_ratio": 1.5})


def test_spark_resnet18_small_stem_28px(blood: torch.Tensor) -> None:
    torch.manual_seed(0)
    method = _spark("resnet18", 28, small_stem=True, decoder_width=64)
    # Small stem at 28 px: stages at 28, 14, 7, 4 px, so the mask grid is 4×4 (nominal stride 8).
    assert method.grid == (4, 4)
    assert method.stage_sizes == [(28, 28), (14, 14), (7, 7), (4, 4)]
    assert method.proj.out_channels == 3
    _train_two_steps(method, blood, "resnet18", small_stem=True)


def test_spark_finalize_re_estimates_batch_norm_on_whole_images(blood: torch.Tensor) -> None:
    torch.manual_seed(0)
    method = _spark("resnet18", 28, small_stem=True, decoder_width=32)
    out = method.step(method.views(blood))  # running statistics from visible positions of masked views
    out.loss.backward()
    bn1 = method.backbone.model.bn1
    sparse_mean = bn1.running_mean.clone()
    method.finalize(blood, torch.device("cpu"))
    with torch.no_grad():
        dense = method.backbone.model.conv1(method.backbone.prepare(blood)).float()
    torch.testing.assert_close(bn1.running_mean, dense.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn1.running_var, dense.var(dim=(0, 2, 3)), rtol=1e-3, atol=1e-5)
    assert not torch.allclose(sparse_mean, bn1.running_mean)
    assert method.backbone.training and bn1.momentum == 0.1  # modes and momenta restored

    kept = _spark("resnet18", 28, small_stem=True, decoder_width=32, dense_bn_stats=False)
    kept.step(kept.views(blood))
    before = kept.backbone.model.bn1.running_mean.clone()
    kept.finalize(blood, torch.device("cpu"))
    assert torch.equal(kept.backbone.model.bn1.running_mean, before)


def test_spark_efficientnet_needs_128px(blood: torch.Tensor) -> None:
    torch.manual_seed(0)
    with pytest.raises(MedpretrainError, match=r"2×2.*image-size"):
        _spark("efficientnet_lite0", 64, small_stem=False)
    method = _spark("efficientnet_lite0", 128, small_stem=False, decoder_width=32)
    assert method.grid == (4, 4)
    _train_two_steps(method, _resize(blood[:4], 128), "efficientnet_lite0", small_stem=False)


def test_spark_rejects_a_one_by_one_grid() -> None:
    with pytest.raises(MedpretrainError, match=r"1×1.*--small-stem"):
        _spark("resnet18", 28, small_stem=False)


def test_spark_one_channel_input(pneumonia: torch.Tensor) -> None:
    torch.manual_seed(0)
    method = _spark("resnet18", 28, small_stem=True, channels=1, decoder_width=32)
    assert method.proj.out_channels == 1
    _train_two_steps(method, pneumonia, "resnet18", small_stem=True)


def test_mask_at_follows_stride_two_stages() -> None:
    active = torch.tensor([[True, False, False, True]]).view(1, 1, 2, 2)
    # A 7-px map on a 4-cell grid maps j → j // 2, like a stride-2 conv with padding 1 (7 → 4).
    active4 = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    active4[0, 0, 1, 2] = True
    m7 = mask_at(active4, (7, 7))
    assert m7[0, 0].nonzero().tolist() == [[2, 4], [2, 5], [3, 4], [3, 5]]
    assert mask_at(active, (4, 4))[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert mask_at(active, (2, 2)) is active


def test_spark_loss_counts_masked_patches_only() -> None:
    torch.manual_seed(0)
    n, c, size = 3, 3, 28  # 28 px on a 4×4 grid: 8-px patches, the last row/column 4 px wide
    active = torch.rand(n, 1, 4, 4) < 0.4
    active[:, :, 0, 0], active[:, :, 3, 3] = True, False  # some of each, incl. a partial border patch
    visible_px = mask_at(active, (size, size)).expand(n, c, size, size)
    target = torch.rand(n, c, size, size)
    pred = torch.randn(n, c, size, size, requires_grad=True)
    loss = masked_patch_loss(pred, target, active)
    perturbed = target + 5.0 * torch.rand_like(target) * visible_px
    assert torch.allclose(masked_patch_loss(pred, perturbed, active), loss, rtol=0, atol=1e-6)
    changed = target + 5.0 * torch.rand_like(target) * ~visible_px
    assert not torch.allclose(masked_patch_loss(pred, changed, active), loss)
    loss.backward()
    assert pred.grad is not None
    assert (pred.grad[visible_px] == 0).all() and (pred.grad[~visible_px] != 0).any()
    # A perfect prediction of the per-patch normalised target costs nothing (border patch: 4×4 real pixels).
    perfect = torch.zeros(n, c, size, size)
    for i in range(4):
        for j in range(4):
            sl = (slice(None), slice(None), slice(8 * i, min(8 * i + 8, size)), slice(8 * j, min(8 * j + 8, size)))
            patch = target[sl]
            mean = patch.mean(dim=(1, 2, 3), keepdim=True)
            var = patch.var(dim=(1, 2, 3), keepdim=True)
            perfect[sl] = (patch - mean) / (var + 1e-6).sqrt()
    assert masked_patch_loss(perfect, target, active) < 1e-8
    assert masked_patch_loss(perfect + 1.0, target, active) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(("name", "size", "small_stem"), [("resnet18", 28, True), ("efficientnet_lite0", 128, False)])
def test_spark_encoder_sees_only_visible_patches(blood: torch.Tensor, name: str, size: int, small_stem: bool) -> None:
    torch.manual_seed(0)
    method = _spark(name, size, small_stem=small_stem)
    x = _resize(blood[:4], size).float() / 255
    active = method.random_mask(4, x.device)
    assert (active.flatten(1).sum(1) == round(16 * 0.4)).all()
    feats = method.encode(x, active)
    assert len(feats) == 4
    for feat in feats:
        visible = mask_at(active, feat.shape[-2:]).expand_as(feat)
        assert (feat[~visible] == 0).all(), "a masked position is not empty"
        assert (feat[visible] != 0).float().mean() > 0.05, "visible positions carry no signal"
    # Sparse convolution: what is under the mask cannot reach any visible position, at any depth.
    noise = torch.rand_like(x) * ~mask_at(active, x.shape[-2:])
    again = method.encode((x + noise).clamp(0, 1), active)
    for a, b in zip(feats, again, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    dense = method.backbone.model.forward_features(method.backbone.prepare((x + noise).clamp(0, 1)))
    assert not torch.allclose(dense, method.backbone.model.forward_features(method.backbone.prepare(x)), atol=1e-5)


def test_sparse_batch_norm_statistics_come_from_visible_positions() -> None:
    torch.manual_seed(0)
    backbone: Backbone = create_backbone("resnet18", small_stem=True)
    model = backbone.model.train()
    bn = model.bn1
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    active = torch.rand(4, 1, 4, 4) < 0.5
    active[:, :, 0, 0] = True
    m = mask_at(active, (28, 28))
    x = torch.randn(4, 64, 28, 28)
    x = torch.where(m, x, torch.full_like(x, 1000.0))  # masked positions would dominate dense statistics
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    with sparse_encoding(model, active):
        y = bn(x)
    vis = x.permute(1, 0, 2, 3)[:, m[:, 0]]  # (C, M)
    mean, var = vis.mean(1), vis.var(1, unbiased=False)
    expected = (x - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + bn.eps).sqrt()
    expected = (expected * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)) * m
    assert torch.allclose(y, expected, atol=1e-4)
    assert (y[~m.expand_as(y)] == 0).all()
    assert torch.allclose(bn.running_mean, 0.9 * old_mean + 0.1 * mean, atol=1e-5)
    assert torch.allclose(bn.running_var, 0.9 * old_var + 0.1 * vis.var(1, unbiased=True), atol=1e-4)
    assert int(bn.num_batches_tracked) == 1
    # Outside the block the module is an ordinary BatchNorm again, and dense statistics see the 1000s.
    assert "forward" not in bn.__dict__
    bn(x)
    assert bn.running_mean.max() > 50


def test_mae_vit_tiny_small_stem_28px(blood: torch.Tensor) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny", small_stem=True, img_size=28)
    method = MAE(backbone, MAEConfig(), channels=3, image_size=28)
    assert method.grid == (7, 7) and method.patch_size == 4
    _train_two_steps(method, blood, "vit_tiny", small_stem=True)


def test_mae_encoder_sees_visible_patches_and_loss_targets_masked_ones(blood: torch.Tensor) -> None:
    torch.manual_seed(0)
    method = MAE(create_backbone("vit_tiny", small_stem=True, img_size=28), MAEConfig(), channels=3, image_size=28)
    x = blood[:4].float() / 255
    idx_keep, idx_mask = method.random_mask(4, x.device)
    assert idx_keep.shape == (4, 1 + 12) and idx_mask.shape == (4, 49 - 12) and (idx_keep[:, 0] == 0).all()
    hidden = torch.ones(4, 49, dtype=torch.bool)
    hidden.scatter_(1, idx_keep[:, 1:] - 1, False)
    pixel_hidden = hidden.view(4, 1, 7, 7).repeat_interleave(4, 2).repeat_interleave(4, 3).expand_as(x)
    y = (x + 0.5 * torch.rand_like(x) * pixel_hidden).clamp(0, 1)
    enc = method.encoder.encode(method.backbone.prepare(x), idx_keep=idx_keep)
    assert enc.shape == (4, 13, 192)
    assert torch.allclose(enc, method.encoder.encode(method.backbone.prepare(y), idx_keep=idx_keep), atol=1e-5)
    # Same encoder input, different pixels under the mask: only the target changed, and the loss with it.
    assert not torch.isclose(
        method.forward_masked(x, idx_keep, idx_mask).loss, method.forward_masked(y, idx_keep, idx_mask).loss
    )


def test_mae_64px_and_invalid_settings(blood: torch.Tensor) -> None:
    torch.manual_seed(0)
    method = MAE(create_backbone("vit_tiny", small_stem=True, img_size=64), MAEConfig(), channels=3, image_size=64)
    assert method.grid == (16, 16)
    out = method.step(method.views(_resize(blood[:4], 64)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and method.backbone.model.patch_embed.proj.weight.grad is not None
    with pytest.raises(MedpretrainError, match=r"2×2.*--small-stem"):
        MAE(create_backbone("vit_tiny", img_size=28), MAEConfig(), channels=3, image_size=28)
    with pytest.raises(MedpretrainError, match="Vision Transformer"):
        MAE(create_backbone("resnet18"), MAEConfig(), channels=3, image_size=28)


def test_vae_resnet18_28px(blood: torch.Tensor) -> None:
    torch.manual_seed(0)
    method = VAE(create_backbone("resnet18"), VAEConfig(), channels=3, image_size=28)
    assert float(method.kl_weight) == 0.0 and "kl_weight" in method.state_dict()
    _train_two_steps(method, blood, "resnet18", small_stem=False)
    # A clock of 2 steps, 1 per epoch: KL warm-up over one epoch → full weight after step 0.
    assert float(method.kl_weight) == 1.0
    method.start(TrainingClock(total_steps=8, steps_per_epoch=4))
    method.after_step(0, 8)
    assert float(method.kl_weight) == pytest.approx(0.25)
    with torch.no_grad():
        recon = torch.sigmoid(method.decode_logits(torch.randn(2, 128)))
    assert recon.shape == (2, 3, 28, 28)


def test_vae_reconstruction_improves_on_a_fixed_batch(blood: torch.Tensor) -> None:
    # The decoder is wired to the images it reconstructs: a few optimiser steps on one fixed batch lower the
    # reconstruction error well below where it started (a detached or mis-shaped target would not).
    torch.manual_seed(0)
    method = VAE(create_backbone("resnet18"), VAEConfig(), channels=3, image_size=28)
    method.kl_weight.fill_(0.0)  # the loss is then the reconstruction term alone
    x = blood[:8].float() / 255
    optimizer = method.configure_optimizers(5, 5)["optimizer"]

    def reconstruction_loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same posterior sample at every evaluation
        return method.step([x]).loss

    first = float(reconstruction_loss().detach())
    for _ in range(5):
        optimizer.zero_grad()
        reconstruction_loss().backward()
        optimizer.step()
    assert float(reconstruction_loss().detach()) < 0.9 * first


def test_vae_loss_is_the_negative_elbo(blood: torch.Tensor) -> None:
    torch.manual_seed(0)
    method = VAE(create_backbone("resnet18"), VAEConfig(beta=2.0), channels=3, image_size=28)
    method.kl_weight.fill_(0.5)
    x = blood[:8].float() / 255
    torch.manual_seed(1)
    loss = method.step([x]).loss
    torch.manual_seed(1)
    mu, logvar = method.encode(x)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    p = torch.sigmoid(method.decode_logits(z))
    rec = -(x * p.log() + (1 - x) * (1 - p).log()).sum(dim=(1, 2, 3)).mean()
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1).mean()
    assert float(loss.detach()) == pytest.approx(float((rec + 2.0 * 0.5 * kl).detach()), rel=1e-4)
    assert math.isfinite(float(kl.detach())) and float(kl.detach()) > 0


def test_vae_one_channel_input(pneumonia: torch.Tensor) -> None:
    torch.manual_seed(0)
    method = VAE(create_backbone("resnet18"), VAEConfig(), channels=1, image_size=28)
    assert method.decode_logits(torch.zeros(1, 128)).shape == (1, 1, 28, 28)
    _train_two_steps(method, pneumonia, "resnet18", small_stem=False)
