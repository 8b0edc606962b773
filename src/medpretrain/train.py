"""The one PyTorch-Lightning training loop: supervised fine-tuning here, self-supervised pre-training later.

`make_trainer` owns every Trainer decision (device, precision, DDP, progress bar, checkpointing) so
both uses run the same way. `finetune` trains backbone + linear head on the labelled subset, scores
validation every epoch, keeps the weights of the epoch with the best validation AUC and only then
predicts the test split — the test split is never looked at during training.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medpretrain.augment import ViewRecipe, to_float
from medpretrain.backbones import Backbone, create_backbone
from medpretrain.data.base import Dataset, Task
from medpretrain.errors import MedpretrainError
from medpretrain.metrics import accuracy, auc, probabilities

# Loggers whose INFO lines ("GPU available: False", "`Trainer.fit` stopped", "Seed set to") are noise
# for a toolkit that reports its own progress.
_NOISY_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info logs and advisory warnings for the duration; errors still surface."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # "does not have many workers", "LitLogger"/tensorboard hints and similar advice: we use
            # in-memory tensors, where worker processes would only add overhead.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*num_workers.*")
            warnings.filterwarnings("ignore", message=".*litlogger.*", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*tensorboardX.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning vs newer torch, harmless
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


def default_precision() -> str:
    """Mixed precision on CUDA (bf16 where the GPU supports it), full fp32 elsewhere."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def resolve_precision(precision: str = "auto") -> str:
    """The Lightning precision for a user's choice; "auto" is `default_precision()`.

    fp32 stays the CPU default because bf16 pays only where convolutions dominate: on CPUs with bf16
    matrix units (AMX), a SparK step on the small-stem ResNet-18 at 28 px ran 2.8× faster in bf16-mixed,
    but a SimCLR step on the standard stem at 28 px (tiny maps, casts dominate) ran 7% slower (BENCHMARKS.md).
    """
    if precision not in PRECISIONS:
        raise MedpretrainError(f"unknown precision '{precision}'", f"choose one of: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return default_precision()
    if precision == "16-mixed" and not torch.cuda.is_available():
        raise MedpretrainError("16-mixed (float16) precision needs a CUDA GPU", "use bf16-mixed or 32-true on CPU")
    return precision


def make_trainer(
    *,
    max_epochs: int,
    max_time: float | None = None,
    devices: int | str = "auto",
    precision: str | None = None,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    callbacks: Sequence[pl.Callback] = (),
    gradient_clip_val: float | None = None,
    num_sanity_val_steps: int = 0,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """A Trainer configured the one way this toolkit trains.

    `devices="auto"` takes every visible GPU (DDP when more than one) or the CPU; `max_time` is in
    seconds. Checkpoints (last + every epoch's latest) are written only when `checkpoint_dir` is
    given; there is no Lightning logger — callers record their own history.
    """
    cuda = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if cuda else 0
    if devices == "auto":
        devices = max(n_gpus, 1)
    multi = cuda and isinstance(devices, int) and devices > 1
    cbs = list(callbacks)
    if checkpoint_dir is not None:
        cbs.append(pl.callbacks.ModelCheckpoint(dirpath=Path(checkpoint_dir), save_last=True, save_top_k=0))
    with quiet_lightning():
        return pl.Trainer(
            accelerator="gpu" if cuda else "cpu",
            devices=devices,
            strategy="ddp" if multi else "auto",
            precision=resolve_precision(precision or "auto"),  # type: ignore[arg-type]
            max_epochs=max_epochs,
            max_time=timedelta(seconds=max_time) if max_time else None,
            logger=False,
            enable_checkpointing=checkpoint_dir is not None,
            default_root_dir=str(checkpoint_dir) if checkpoint_dir is not None else None,
            enable_progress_bar=progress,
            enable_model_summary=False,
            num_sanity_val_steps=num_sanity_val_steps,
            gradient_clip_val=gradient_clip_val,
            benchmark=cuda,
            callbacks=cbs,
            **trainer_kwargs,
        )


def warmup_cosine(total_steps: int, warmup_steps: int) -> Any:
    """LR multiplier per optimiser step: linear warm-up to 1, then cosine decay to 0 at `total_steps`."""
    total_steps = max(total_steps, 1)
    warmup_steps = min(max(warmup_steps, 0), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases and normalisation parameters (1-d tensors), as is standard."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class FinetuneConfig(BaseModel):
    """Fine-tuning hyper-parameters. Defaults reach ≥ 0.90 test ACC on BloodMNIST from scratch at 28 px.

    `warmup_epochs` may be fractional. `max_time` (seconds) stops training early; the best epoch so
    far is still the one kept. `min_steps` lengthens training for tiny label budgets, where
    `epochs` × batches per epoch would otherwise be a handful of optimiser steps (0 = off).
    The augmentation strength (`crop_scale_min`, `rotation`, `jitter`) feeds `finetune_recipe`-like
    views; `train_eval_max` caps the un-augmented pass over the labelled subset that measures the
    train side of the overfitting gap.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: int = Field(128, ge=2)
    warmup_epochs: float = Field(1.0, ge=0)
    class_weighted: bool = False
    augment: bool = True
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    num_workers: int = Field(0, ge=0)
    max_time: float | None = Field(None, gt=0)
    min_steps: int = Field(0, ge=0)
    crop_scale_min: float = Field(0.8, gt=0, le=1)
    rotation: float = Field(10.0, ge=0, le=180)
    jitter: float = Field(0.1, ge=0, lt=1)
    eval_batch_size: int = Field(512, ge=1)
    train_eval_max: int = Field(5_000, ge=1)

    def recipe(self) -> ViewRecipe | None:
        """The training views (None when augmentation is off); intensity jitter is modality-aware."""
        if not self.augment:
            return None
        return ViewRecipe(
            crop_scale=(self.crop_scale_min, 1.0),
            hflip=0.5,
            rotation=self.rotation,
            brightness=self.jitter,
            contrast=self.jitter,
        )


class Classifier(nn.Module):
    """Backbone + linear head; outputs one logit per class (per label for multi-label)."""

    def __init__(self, backbone: Backbone, num_outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


CLASSIFIER_FORMAT = "medpretrain-classifier/1"


def save_classifier(path: str | Path, model: Classifier, *, image_size: int, task: Task, classes: list[str]) -> Path:
    """Keep a fine-tuned network (for the report's Grad-CAM panels); written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CLASSIFIER_FORMAT,
        "backbone_name": model.backbone.name,
        "small_stem": model.backbone.small_stem,
        "image_size": int(image_size),
        "task": Task(task).value,
        "classes": list(classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_classifier(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """A network written by `save_classifier`, in eval mode on the CPU, and its metadata."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CLASSIFIER_FORMAT:
        raise MedpretrainError(f"{path} is not a medpretrain fine-tuned model", "re-run the study to write it")
    backbone = create_backbone(
        payload["backbone_name"], small_stem=payload["small_stem"], img_size=payload["image_size"]
    )
    model = Classifier(backbone, len(payload["classes"]))
    model.load_state_dict(payload["state_dict"])
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.eval(), meta


@dataclass
class FinetuneResult:
    """Predictions of the selected epoch's weights, the per-epoch history and the overfitting gap.

    `history[i]["epoch"]` is 1-based and `best_epoch` refers to it. `model` holds the best weights,
    on the CPU, in eval mode.
    """

    test_proba: np.ndarray
    val_proba: np.ndarray
    history: list[dict[str, float]]
    best_epoch: int
    overfitting: dict[str, float]
    model: Classifier
    fit_seconds: float = 0.0
    stopped_early: bool = False
    config: dict[str, Any] = field(default_factory=dict)


def _eval_loss(logits: torch.Tensor, y: torch.Tensor, task: Task) -> float:
    """Plain (unweighted, unsmoothed) NLL, so train and validation losses are comparable."""
    if task is Task.MULTILABEL:
        return float(F.binary_cross_entropy_with_logits(logits, y.float()))
    return float(F.cross_entropy(logits, y.long()))


class FinetuneModule(pl.LightningModule):
    """Lightning wrapper: augmentation on the device, per-epoch evaluation, best-state tracking.

    Validation dataloader 0 is the validation split, dataloader 1 (when present) an un-augmented
    sample of the labelled training subset — both scored in eval mode under no_grad.
    """

    def __init__(
        self,
        model: Classifier,
        task: Task,
        cfg: FinetuneConfig,
        *,
        total_steps: int,
        warmup_steps: int,
        class_weight: torch.Tensor | None,
        aug_seed: int,
    ) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.cfg = cfg
        self.recipe = cfg.recipe()
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        if class_weight is not None:
            self.register_buffer("class_weight", class_weight)
        else:
            self.class_weight = None
        self.aug_seed = aug_seed
        self._aug_gen: torch.Generator | None = None
        self.history: list[dict[str, float]] = []
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch = 0
        self._best_key = (-math.inf, -math.inf)
        self._outputs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._train_loss_sum: torch.Tensor | float = 0.0
        self._train_batches = 0
        self._last_lr = cfg.lr
        self._epoch_start = time.perf_counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        if self.trainer.training and self.recipe is not None:
            if self._aug_gen is None:
                # Per-rank stream so DDP ranks draw different views.
                self._aug_gen = torch.Generator().manual_seed(self.aug_seed + 1000 * self.global_rank)
            return self.recipe(x, generator=self._aug_gen), y
        return to_float(x), y

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task is Task.MULTILABEL:
            target = y.float()
            if self.cfg.label_smoothing > 0:
                target = target * (1 - self.cfg.label_smoothing) + 0.5 * self.cfg.label_smoothing
            return F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=self.class_weight)
        return F.cross_entropy(logits.float(), y, weight=self.class_weight, label_smoothing=self.cfg.label_smoothing)

    def on_train_epoch_start(self) -> None:
        self._train_loss_sum, self._train_batches = 0.0, 0
        self._epoch_start = time.perf_counter()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self._loss(self(x), y)
        # Kept on the device: a float() here would force a GPU sync every step.
        self._train_loss_sum = self._train_loss_sum + loss.detach()
        self._train_batches += 1
        self._last_lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._outputs = {}

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self._outputs.setdefault(dataloader_idx, []).append((self(x).float().cpu(), y.cpu()))

    def _score(self, idx: int) -> tuple[float, float, float]:
        logits = torch.cat([o[0] for o in self._outputs[idx]])
        y = torch.cat([o[1] for o in self._outputs[idx]])
        proba = probabilities(logits, self.task)
        y_np = y.numpy()
        return _eval_loss(logits, y, self.task), accuracy(y_np, proba, self.task), auc(y_np, proba, self.task)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or 0 not in self._outputs:
            return
        val_loss, val_acc, val_auc = self._score(0)
        if 1 in self._outputs:
            train_loss, train_acc, _ = self._score(1)
        else:
            train_loss, train_acc = math.nan, math.nan
        epoch = self.current_epoch + 1
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "val_auc": val_auc,
            "lr": self._last_lr,
            "train_loss_aug": float(self._train_loss_sum) / max(self._train_batches, 1),
            "seconds": time.perf_counter() - self._epoch_start,
        }
        self.history.append(row)
        # Best validation AUC, ties (and NaN AUCs) decided by the lower validation loss.
        key = (val_auc if not math.isnan(val_auc) else -math.inf, -val_loss)
        if key > self._best_key:
            self._best_key = key
            self.best_epoch = epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.log_dict({"val_auc": val_auc, "val_acc": val_acc}, prog_bar=True)
        self._outputs = {}

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(param_groups(self.model, self.cfg.weight_decay), lr=self.cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.total_steps, self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _class_weight(labels: np.ndarray, task: Task, num_classes: int) -> torch.Tensor:
    """Inverse-frequency CE weights (mean 1 over the sample), or neg/pos `pos_weight` for multi-label."""
    if task is Task.MULTILABEL:
        pos = labels.sum(axis=0).astype(np.float64)
        neg = len(labels) - pos
        return torch.tensor(np.clip(neg / np.maximum(pos, 1.0), 0.0, 100.0), dtype=torch.float32)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


def _labels_tensor(y: np.ndarray, task: Task) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y))
    return t.float() if task is Task.MULTILABEL else t.long().view(-1)


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Logits of `model` (eval mode) over uint8 images, batched, on the model's device; CPU float out."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model(to_float(images[i : i + batch_size].to(device))).float().cpu() for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def _check_inputs(dataset: Dataset, train_idx: np.ndarray) -> np.ndarray:
    idx = np.asarray(train_idx)
    n_train = len(dataset.images["train"])
    if idx.ndim != 1 or len(idx) == 0:
        raise MedpretrainError("fine-tuning needs at least one labelled training image", "use a larger budget")
    if not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= n_train:
        raise MedpretrainError(
            f"training indices must be integers in [0, {n_train})", "select them with budgets.select"
        )
    if len(idx) < 2:
        raise MedpretrainError("fine-tuning needs at least two labelled images (batch norm)", "use a larger budget")
    for split in ("val", "test"):
        if split not in dataset.images or len(dataset.images[split]) == 0:
            raise MedpretrainError(f"dataset '{dataset.name}' has no {split} split", "fine-tuning selects on val")
    return idx.astype(np.int64)


def finetune(
    backbone: Backbone,
    dataset: Dataset,
    train_idx: np.ndarray,
    cfg: FinetuneConfig,
    *,
    seed: int,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune a copy of `backbone` + a linear head on `dataset.train[train_idx]` (the caller's
    backbone is left untouched); select the epoch on validation AUC; predict val and test with it.

    Binary and ordinal tasks use softmax cross-entropy over their classes, multi-label independent
    sigmoids (BCE). Validation and test are always scored in full.
    """
    idx = _check_inputs(dataset, train_idx)
    task = Task(dataset.task)
    pl.seed_everything(seed, workers=True, verbose=False)
    model = Classifier(copy.deepcopy(backbone), dataset.num_classes)

    y_all = dataset.labels["train"]
    x_train = dataset.images["train"][torch.as_tensor(idx)]
    y_train_np = y_all[idx]
    y_train = _labels_tensor(y_train_np, task)
    batch_size = min(cfg.batch_size, len(idx))
    # A trailing batch of one sample breaks batch norm in training mode; drop only that case.
    drop_last = len(idx) % batch_size == 1
    steps_per_epoch = len(idx) // batch_size if drop_last else math.ceil(len(idx) / batch_size)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch)) if cfg.min_steps else cfg.epochs
    total_steps = epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    pin = torch.cuda.is_available()
    loader_kw: dict[str, Any] = {"num_workers": cfg.num_workers, "pin_memory": pin}
    if cfg.num_workers > 0:
        loader_kw["persistent_workers"] = True
    train_loader = DataLoader(
        TensorDataset(x_train, y_train),
        batch_size=batch_size,
        shuffle=True,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        **loader_kw,
    )
    val_set = TensorDataset(dataset.images["val"], _labels_tensor(dataset.labels["val"], task))
    # Train side of the overfitting gap: an un-augmented eval-mode pass over (a fixed sample of) the subset.
    rng = np.random.default_rng(seed)
    sub = (
        np.sort(rng.choice(len(idx), size=cfg.train_eval_max, replace=False)) if len(idx) > cfg.train_eval_max else None
    )
    train_eval_set = (
        TensorDataset(x_train[torch.as_tensor(sub)], y_train[torch.as_tensor(sub)])
        if sub is not None
        else TensorDataset(x_train, y_train)
    )
    val_loaders = [
        DataLoader(val_set, batch_size=cfg.eval_batch_size, shuffle=False, **loader_kw),
        DataLoader(train_eval_set, batch_size=cfg.eval_batch_size, shuffle=False, **loader_kw),
    ]

    weight = _class_weight(y_train_np, task, dataset.num_classes) if cfg.class_weighted else None
    module = FinetuneModule(
        model,
        task,
        cfg,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        class_weight=weight,
        aug_seed=seed,
    )
    # One device: validation metrics and best-state tracking are exact only without DDP's padded sharding,
    # and fine-tuning at MedMNIST scale does not need more.
    trainer = make_trainer(max_epochs=epochs, max_time=cfg.max_time, devices=1, progress=progress)
    start = time.perf_counter()
    with quiet_lightning():
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loaders)
    fit_seconds = time.perf_counter() - start

    history = module.history
    if not history or module.best_state is None:
        raise MedpretrainError(
            "fine-tuning stopped before the first epoch finished, so no epoch could be selected",
            "raise max_time or lower the budget",
        )
    model = module.model.cpu()
    model.load_state_dict(module.best_state)
    model.eval()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    val_proba = probabilities(predict_logits(model, dataset.images["val"], batch_size=cfg.eval_batch_size), task)
    test_proba = probabilities(predict_logits(model, dataset.images["test"], batch_size=cfg.eval_batch_size), task)
    model.cpu()

    best = next(h for h in history if h["epoch"] == module.best_epoch)
    last = history[-1]
    overfitting = {
        "gap_loss_best": best["train_loss"] - best["val_loss"],
        "gap_acc_best": best["train_acc"] - best["val_acc"],
        "gap_loss_last": last["train_loss"] - last["val_loss"],
        "gap_acc_last": last["train_acc"] - last["val_acc"],
    }
    return FinetuneResult(
        test_proba=test_proba,
        val_proba=val_proba,
        history=history,
        best_epoch=module.best_epoch,
        overfitting=overfitting,
        model=model,
        fit_seconds=fit_seconds,
        stopped_early=len(history) < epochs,
        config={**cfg.model_dump(), "epochs_run": len(history), "steps_per_epoch": steps_per_epoch},
    )


__all__ = [
    "Classifier",
    "FinetuneConfig",
    "FinetuneModule",
    "FinetuneResult",
    "default_precision",
    "finetune",
    "load_classifier",
    "make_trainer",
    "param_groups",
    "predict_logits",
    "quiet_lightning",
    "resolve_precision",
    "save_classifier",
    "warmup_cosine",
]
