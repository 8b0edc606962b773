"""Batched augmentation and the fine-tuning loop (real PneumoniaMNIST subset, synthetic multi-label)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from medpretrain.augment import ViewRecipe, contrastive_recipe, finetune_recipe, to_float
from medpretrain.backbones import create_backbone
from medpretrain.data import load_dataset
from medpretrain.data.base import Dataset, Task
from medpretrain.errors import MedpretrainError
from medpretrain.metrics import auc
from medpretrain.train import FinetuneConfig, StepPlan, finetune, multistep, predict_logits, warmup_cosine

STRONG = contrastive_recipe(blur_p=0.5, solarize_p=0.5).with_(rotation=30.0, gamma=0.3)


def _batch(channels: int, n: int = 16, size: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("recipe", [finetune_recipe(), STRONG], ids=["finetune", "strong"])
def test_augment_keeps_shape_and_range(channels: int, recipe: ViewRecipe) -> None:
    x = _batch(channels)
    out = recipe(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape  # 1 channel in → 1 channel out
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.allclose(out, to_float(x))  # it did augment
    resized = recipe.with_(output_size=20)(x)
    assert resized.shape == (16, channels, 20, 20)


def test_augment_is_deterministic_with_a_seed() -> None:
    x = _batch(3)
    a = STRONG(x, generator=torch.Generator().manual_seed(7))
    b = STRONG(x, generator=torch.Generator().manual_seed(7))
    c = STRONG(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_identity_recipe_returns_the_image() -> None:
    x = _batch(3)
    identity = ViewRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0)
    torch.testing.assert_close(identity(x), to_float(x), atol=1e-5, rtol=0)
    flipped = ViewRecipe(crop_scale=None, hflip=1.0)(x)
    torch.testing.assert_close(flipped, to_float(x).flip(3))


def test_colour_jitter_never_colours_gray_images() -> None:
    gray = _batch(1)
    colour = ViewRecipe(crop_scale=None, hflip=0.0, saturation=0.9, hue=0.5, grayscale_p=1.0, brightness=0.3)
    out = colour(gray, generator=torch.Generator().manual_seed(0))
    assert out.shape[1] == 1
    # A gray image replicated to RGB stays gray: saturation and hue leave equal channels equal.
    rgb = colour(gray.expand(-1, 3, -1, -1), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rgb[:, 0], rgb[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(rgb[:, 1], rgb[:, 2], atol=1e-5, rtol=0)
    # ... whereas a colour image does change hue.
    rgb_in = _batch(3)
    no_hue = ViewRecipe(crop_scale=None, hflip=0.0)(rgb_in)
    assert not torch.allclose(ViewRecipe(crop_scale=None, hflip=0.0, hue=0.5)(rgb_in), no_hue)


def test_recipe_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        ViewRecipe(crop_scale=(0.9, 0.5))
    with pytest.raises(ValueError):
        ViewRecipe(hflip=1.5)
    with pytest.raises(ValueError):
        finetune_recipe()(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))


def test_warmup_then_cosine() -> None:
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    values = [f(s) for s in range(100)]
    assert values[0] < values[5] < values[9] <= 1.0
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))
    assert values[-1] < 0.01


def _stratified(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def test_finetune_pneumoniamnist_subset() -> None:
    ds = load_dataset("pneumoniamnist")
    idx = _stratified(ds.labels["train"], 100, seed=0)
    torch.manual_seed(0)
    backbone = create_backbone("resnet18")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    cfg = FinetuneConfig(epochs=2, batch_size=32, warmup_epochs=0.5, min_steps=0, lr=1e-3)
    result = finetune(backbone, ds, idx, cfg, seed=0, progress=False)

    assert [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr"):
            assert math.isfinite(h[key]), key
    assert result.best_epoch in (1, 2)
    n_val, n_test = len(ds.labels["val"]), len(ds.labels["test"])
    assert result.test_proba.shape == (n_test, 2)
    assert result.val_proba.shape == (n_val, 2)
    np.testing.assert_allclose(result.test_proba.sum(axis=1), 1.0, atol=1e-5)
    assert set(result.overfitting) == {"gap_loss_best", "gap_acc_best", "gap_loss_last", "gap_acc_last"}
    last = result.history[-1]
    assert result.overfitting["gap_acc_last"] == pytest.approx(last["train_acc"] - last["val_acc"])

    # The returned model carries the selected epoch's weights: its validation AUC is the recorded one.
    best = result.history[result.best_epoch - 1]
    assert best["val_auc"] == max(h["val_auc"] for h in result.history)
    assert auc(ds.labels["val"], result.val_proba, ds.task) == pytest.approx(best["val_auc"], abs=1e-6)
    assert best["val_auc"] > 0.6  # learned something, from 200 images in 2 epochs
    assert not result.model.training
    again = torch.softmax(predict_logits(result.model, ds.images["test"]), dim=1).numpy()
    np.testing.assert_allclose(again, result.test_proba, atol=1e-5)
    # The caller's backbone is not trained in place.
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def _synthetic_multilabel(n: dict[str, int], seed: int = 0) -> Dataset:
    """Label j present ⇔ a bright square in quadrant j of a dark 16 px grayscale image."""
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    for split, count in n.items():
        y = rng.integers(0, 2, size=(count, 3))
        x = rng.integers(0, 40, size=(count, 1, 16, 16)).astype(np.uint8)
        for j, (r, c) in enumerate([(0, 0), (0, 8), (8, 0)]):
            x[y[:, j] == 1, :, r : r + 8, c : c + 8] = 220
        images[split], labels[split] = torch.from_numpy(x), y.astype(np.int64)
    return Dataset(
        name="synthetic",
        task=Task.MULTILABEL,
        classes=["a", "b", "c"],
        images=images,
        labels=labels,
        key="synthetic-16",
        source="test",
        size=16,
        image_size=16,
    )


def test_finetune_multilabel_synthetic() -> None:
    ds = _synthetic_multilabel({"train": 64, "val": 32, "test": 24})
    torch.manual_seed(0)
    cfg = FinetuneConfig(
        epochs=2, batch_size=16, class_weighted=True, label_smoothing=0.1, warmup_epochs=0, min_steps=0, lr=1e-3
    )
    result = finetune(create_backbone("resnet18"), ds, np.arange(64), cfg, seed=1, progress=False)
    assert result.test_proba.shape == (24, 3)
    assert ((result.test_proba >= 0) & (result.test_proba <= 1)).all()
    assert len(result.history) == 2 and result.best_epoch in (1, 2)
    assert all(0.0 <= h["train_acc"] <= 1.0 for h in result.history)


def test_finetune_rejects_bad_inputs() -> None:
    ds = _synthetic_multilabel({"train": 8, "val": 4, "test": 4})
    backbone = create_backbone("resnet18")
    with pytest.raises(MedpretrainError):
        finetune(backbone, ds, np.array([], dtype=np.int64), FinetuneConfig(), seed=0, progress=False)
    with pytest.raises(MedpretrainError):
        finetune(backbone, ds, np.array([0, 99]), FinetuneConfig(), seed=0, progress=False)
    with pytest.raises(ValueError):  # pydantic's ValidationError: unknown keys are an error, not ignored
        FinetuneConfig(epoch=3)


def test_step_plan_trains_small_budgets_long_enough() -> None:
    """Length is max(min_steps, epochs × batches): 119 labels get 500 steps, not 10 (one per epoch)."""
    small = StepPlan.of(119, FinetuneConfig())
    assert small.batch_size == 119 and small.steps_per_epoch == 1
    assert small.total_steps == 500
    assert 20 <= small.total_steps / small.eval_every <= 21  # about `evals` validations, not 500
    large = StepPlan.of(11959, FinetuneConfig())
    assert large.steps_per_epoch == 94 and large.total_steps == 940 and large.eval_every == 94
    assert StepPlan.of(129, FinetuneConfig()).drop_last  # a trailing batch of one would break batch norm
    assert FinetuneConfig(lr=0.01).lr == (0.01,)
    with pytest.raises(ValueError):
        FinetuneConfig(lr=[])


def test_multistep_schedule() -> None:
    f = multistep(100, (0.5, 0.75), 0.1)
    assert [f(0), f(49), f(50), f(74), f(75), f(99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_finetune_steps_early_stopping_and_lr_grid() -> None:
    """On a task learnt in a few steps, patience stops training early; every lr of the grid is tried and the
    kept one has the best validation AUC; the steps taken are reported."""
    ds = _synthetic_multilabel({"train": 48, "val": 32, "test": 24}, seed=3)
    cfg = FinetuneConfig(min_steps=60, batch_size=16, evals=30, patience=3, lr=[1e-2, 1e-6], warmup_epochs=0)
    result = finetune(create_backbone("resnet18"), ds, np.arange(48), cfg, seed=0, progress=False)
    assert [s["lr"] for s in result.search] == [1e-2, 1e-6]
    best = max(result.search, key=lambda s: s["val_auc"])
    assert result.lr == best["lr"] == 1e-2  # 1e-6 cannot learn the squares in 60 steps
    assert result.steps == result.search[0]["steps"] < 60 and result.stopped_early
    assert [h["step"] for h in result.history] == list(range(3, result.steps + 1, 3))
    assert result.best_step == result.history[-1 - cfg.patience]["step"]
