"""Supervised fine-tuning of backbone + linear head, measured in optimiser steps.

Training length is a number of optimiser steps, not epochs: `max(min_steps, epochs × batches per epoch)`.
A fixed epoch count makes the step count grow with the budget (10 epochs at 1% of bloodmnist were 10 steps,
and fine-tuning from scratch scored below a linear probe on the same random network), so small budgets were
under-trained and every comparison at small budgets was biased towards inits that need little training.

Validation is scored at about `evals` evenly spaced points (whole epochs); the weights with the best
validation AUC are kept, training stops after `patience` evaluations without improvement, and only then is
the test split predicted. Every learning rate of the grid `lr` is tried with the same schedule and the one
with the best validation AUC is kept (the same grid for every init: equal tuning effort). The test split is
never looked at during training or selection.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from medpretrain.backbones import Backbone
from medpretrain.data.base import Dataset, Task
from medpretrain.errors import MedpretrainError
from medpretrain.metrics import probabilities
from medpretrain.mitigations import get_mitigation
from medpretrain.runtime import default_device, training_device
from medpretrain.train.classifier import Classifier, predict_logits
from medpretrain.train.config import FinetuneConfig, StepPlan
from medpretrain.train.module import FinetuneModule
from medpretrain.train.resume import EpochCheckpoint, load_finished, run_paths, save_finished
from medpretrain.train.trainer import make_trainer, quiet_lightning


@dataclass
class FinetuneResult:
    """Predictions of the selected weights, the chosen run's history, and the overfitting gap.

    `history[i]` is one validation point (`step`, `epoch`, losses, accuracies, AUC); `best_step` refers to
    it. `search` has one entry per learning rate tried. `model` holds the best weights, CPU, eval mode.
    """

    test_proba: np.ndarray
    val_proba: np.ndarray
    history: list[dict[str, float]]
    best_epoch: int
    best_step: int
    steps: int
    lr: float
    search: list[dict[str, Any]]
    overfitting: dict[str, float]
    model: Classifier
    fit_seconds: float = 0.0
    stopped_early: bool = False
    config: dict[str, Any] = field(default_factory=dict)


def _labels_tensor(y: np.ndarray, task: Task) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y))
    return t.float() if task is Task.MULTILABEL else t.long().view(-1)


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


def _batches(
    tensors: tuple[torch.Tensor, ...],
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool = False,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> DataLoader:
    """Whole batches by one fancy index each (a BatchSampler feeding `TensorDataset[list]`), not one
    `__getitem__` and a collate per image: the same batches as `DataLoader(shuffle=...)` draws with the same
    generator, at a fraction of the Python overhead, and cheap on tensors that live on the GPU. With `weights`,
    images are drawn with replacement in proportion to them (the balanced sampler), as many per epoch as there are."""
    dataset = TensorDataset(*tensors)
    generator = torch.Generator().manual_seed(seed)
    order: Sampler[int]
    if weights is not None:
        order = WeightedRandomSampler(weights.tolist(), len(dataset), replacement=True, generator=generator)
    else:
        order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last), batch_size=None)


def _loaders(
    dataset: Dataset, idx: np.ndarray, task: Task, plan: StepPlan, cfg: FinetuneConfig, seed: int
) -> tuple[DataLoader, list[DataLoader]]:
    # On a GPU the labelled subset and the validation split are moved there once (MedMNIST-scale data fits
    # many times over), so no step waits for a host-to-device copy.
    device = training_device()
    x_train = dataset.images["train"][torch.as_tensor(idx)].to(device)
    y_train = _labels_tensor(dataset.labels["train"][idx], task).to(device)
    weights = get_mitigation(cfg.mitigation).sampling_weights(dataset.labels["train"][idx], dataset.num_classes)
    train_loader = _batches(
        (x_train, y_train), plan.batch_size, shuffle=True, drop_last=plan.drop_last, seed=seed, weights=weights
    )
    # Train side of the overfitting gap: an un-augmented eval-mode pass over (a fixed sample of) the subset.
    sub = torch.arange(len(idx))
    if len(idx) > cfg.train_eval_max:
        sub = torch.as_tensor(np.sort(np.random.default_rng(seed).choice(len(idx), cfg.train_eval_max, replace=False)))
    val = (dataset.images["val"].to(device), _labels_tensor(dataset.labels["val"], task).to(device))
    sub = sub.to(device)
    evals = [
        _batches(val, cfg.eval_batch_size, shuffle=False),
        _batches((x_train[sub], y_train[sub]), cfg.eval_batch_size, shuffle=False),
    ]
    return train_loader, evals


def train_module(
    module: FinetuneModule,
    plan: StepPlan,
    cfg: FinetuneConfig,
    train_loader: DataLoader,
    eval_loaders: list[DataLoader],
    *,
    progress: bool,
    checkpoint: Path | None = None,
) -> FinetuneModule:
    """Run one module for `plan.total_steps` steps, validated every `plan.eval_every` (the one loop that
    fine-tuning and DVME share); the module keeps its history and its best weights.

    With `checkpoint`, the run is saved there at epoch ends (train.resume) and, when the file exists, resumed
    from it instead of starting over."""
    callbacks = []
    if checkpoint is not None:
        generator = getattr(getattr(train_loader.sampler, "sampler", None), "generator", None)
        callbacks.append(EpochCheckpoint(checkpoint, generator))
    # One device: validation metrics and best-state tracking are exact only without DDP's padded sharding,
    # and fine-tuning at MedMNIST scale does not need more. Validation every `eval_every` global steps,
    # across epoch boundaries (check_val_every_n_epoch=None), so a 1-batch epoch is not validated 500 times.
    trainer = make_trainer(
        max_epochs=-1,
        max_steps=plan.total_steps,
        max_time=cfg.max_time,
        precision=cfg.precision,
        devices=1,
        progress=progress,
        val_check_interval=plan.eval_every,
        check_val_every_n_epoch=None,
        callbacks=callbacks,
    )
    resume = str(checkpoint) if checkpoint is not None and checkpoint.exists() else None
    with quiet_lightning():
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=eval_loaders, ckpt_path=resume)
    module.steps_taken = int(module.global_step)
    if not module.history or module.best_state is None:
        raise MedpretrainError(
            "training stopped before its first validation, so no weights could be selected",
            "raise max_time or lower the budget",
        )
    return module


def _fit_one(
    backbone: Backbone,
    dataset: Dataset,
    idx: np.ndarray,
    cfg: FinetuneConfig,
    *,
    lr: float,
    backbone_lr_scale: float,
    hflip: float,
    seed: int,
    progress: bool,
    work_dir: Path | None = None,
) -> FinetuneModule:
    """One full training run at one learning rate; the module holds its history and best weights. With
    `work_dir`, a finished run stored there is restored instead of trained, an unfinished one resumed."""
    task = Task(dataset.task)
    pl.seed_everything(seed, workers=True, verbose=False)
    plan = StepPlan.of(len(idx), cfg)
    train_loader, eval_loaders = _loaders(dataset, idx, task, plan, cfg, seed)
    mitigation, y = get_mitigation(cfg.mitigation), dataset.labels["train"][idx]
    weight = mitigation.loss_weights(y, task, dataset.num_classes)
    offset = mitigation.logit_offset(y, dataset.num_classes, cfg.tau)  # None but for logit_adjustment
    module = FinetuneModule(
        Classifier(copy.deepcopy(backbone), dataset.num_classes),
        task,
        cfg,
        lr=lr,
        backbone_lr_scale=backbone_lr_scale,
        plan=plan,
        recipe=cfg.recipe(hflip),
        class_weight=None if weight is None else torch.tensor(weight, dtype=torch.float32),
        logit_offset=None if offset is None else torch.tensor(offset, dtype=torch.float32),
        aug_seed=seed,
    )
    if work_dir is None:
        return train_module(module, plan, cfg, train_loader, eval_loaders, progress=progress)
    checkpoint, done = run_paths(work_dir, lr)
    finished = load_finished(done)
    if finished is not None:
        module.load_progress_state(finished)
        return module
    train_module(module, plan, cfg, train_loader, eval_loaders, progress=progress, checkpoint=checkpoint)
    save_finished(module.progress_state(), done)
    checkpoint.unlink(missing_ok=True)
    return module


def finetune(
    backbone: Backbone,
    dataset: Dataset,
    train_idx: np.ndarray,
    cfg: FinetuneConfig,
    *,
    seed: int,
    pretrained: bool = False,
    hflip: float = 0.5,
    progress: bool = True,
    work_dir: Path | None = None,
) -> FinetuneResult:
    """Fine-tune copies of `backbone` + a linear head on `dataset.train[train_idx]` at every lr of the grid
    (the caller's backbone is left untouched); keep the run and step with the best validation AUC; predict
    val and test with it.

    `pretrained` applies `cfg.pretrained_backbone_lr_scale`; `hflip` is the flip probability of the views.
    Binary and ordinal tasks use softmax cross-entropy over their classes, multi-label independent sigmoids.
    Validation and test are scored in full. `work_dir` (a folder private to this call) makes the grid
    resumable: each lr's run is checkpointed there and restored after a kill (train.resume); the folder is
    removed once the result is computed.
    """
    idx = _check_inputs(dataset, train_idx)
    task = Task(dataset.task)
    get_mitigation(cfg.mitigation).check(task)
    scale = cfg.pretrained_backbone_lr_scale if pretrained else 1.0
    start = time.perf_counter()
    best: tuple[tuple[float, float], float, FinetuneModule] | None = None
    search = []
    for lr in cfg.lr:
        module = _fit_one(
            backbone,
            dataset,
            idx,
            cfg,
            lr=lr,
            backbone_lr_scale=scale,
            hflip=hflip,
            seed=seed,
            progress=progress,
            work_dir=work_dir,
        )
        steps = module.steps_taken
        search.append({"lr": lr, "val_auc": module.best_score[0], "best_step": module.best_step, "steps": steps})
        if best is None or module.best_score > best[0]:
            best = (module.best_score, lr, module)  # only the chosen run's module (and weights) is kept
    assert best is not None
    _, lr, module = best
    plan = module.plan
    model = module.model.cpu()
    model.load_state_dict(module.best_state)  # type: ignore[arg-type]
    device = default_device()
    model.eval().to(device)
    val_proba = probabilities(predict_logits(model, dataset.images["val"], batch_size=cfg.eval_batch_size), task)
    test_proba = probabilities(predict_logits(model, dataset.images["test"], batch_size=cfg.eval_batch_size), task)
    model.cpu()

    history = module.history
    chosen = next(h for h in history if h["step"] == module.best_step)
    last = history[-1]
    overfitting = {
        "gap_loss_best": chosen["train_loss"] - chosen["val_loss"],
        "gap_acc_best": chosen["train_acc"] - chosen["val_acc"],
        "gap_loss_last": last["train_loss"] - last["val_loss"],
        "gap_acc_last": last["train_acc"] - last["val_acc"],
    }
    steps = module.steps_taken
    if work_dir is not None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return FinetuneResult(
        test_proba=test_proba,
        val_proba=val_proba,
        history=history,
        best_epoch=int(chosen["epoch"]),
        best_step=module.best_step,
        steps=steps,
        lr=lr,
        search=search,
        overfitting=overfitting,
        model=model,
        fit_seconds=time.perf_counter() - start,
        stopped_early=steps < plan.total_steps,
        config={
            **cfg.model_dump(),
            "batch_size_used": plan.batch_size,
            "planned_steps": plan.total_steps,
            "steps_per_epoch": plan.steps_per_epoch,
            "eval_every": plan.eval_every,
            "backbone_lr_scale": scale,
        },
    )


__all__ = ["FinetuneResult", "finetune", "train_module"]
