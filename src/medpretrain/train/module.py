"""The Lightning module of fine-tuning: on-device augmentation, periodic validation, best weights, early stop."""

from __future__ import annotations

import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from medpretrain.augment import ViewRecipe, to_float
from medpretrain.data.base import Task
from medpretrain.metrics import accuracy, auc, probabilities
from medpretrain.train.classifier import Classifier
from medpretrain.train.config import FinetuneConfig, StepPlan
from medpretrain.train.schedules import multistep, param_groups, warmup_cosine


def _eval_loss(logits: torch.Tensor, y: torch.Tensor, task: Task) -> float:
    """Plain (unweighted, unsmoothed) NLL, so train and validation losses are comparable."""
    if task is Task.MULTILABEL:
        return float(F.binary_cross_entropy_with_logits(logits, y.float()))
    return float(F.cross_entropy(logits, y.long()))


class FinetuneModule(pl.LightningModule):
    """Lightning wrapper: augmentation on the device, periodic evaluation, best-state tracking, early stop.

    Validation dataloader 0 is the validation split, dataloader 1 an un-augmented sample of the labelled
    training subset; both are scored in eval mode under no_grad.
    """

    def __init__(
        self,
        model: Classifier,
        task: Task,
        cfg: FinetuneConfig,
        *,
        lr: float,
        backbone_lr_scale: float,
        plan: StepPlan,
        recipe: ViewRecipe | None,
        class_weight: torch.Tensor | None,
        aug_seed: int,
        logit_offset: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model, self.task, self.cfg, self.plan, self.recipe = model, task, cfg, plan, recipe
        self.lr, self.backbone_lr_scale = lr, backbone_lr_scale
        if class_weight is not None:
            self.register_buffer("class_weight", class_weight)
        else:
            self.class_weight = None
        # τ·log prior added to the logits in the training loss only (Menon et al., ICLR 2021, logit-adjusted
        # softmax cross-entropy); validation and prediction use the plain logits.
        if logit_offset is not None:
            self.register_buffer("logit_offset", logit_offset)
        else:
            self.logit_offset = None
        self.aug_seed = aug_seed
        self._aug_gen: torch.Generator | None = None
        self.history: list[dict[str, float]] = []
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_step = 0
        # (best validation AUC, minus its validation loss): the key that picks the kept weights.
        self.best_score: tuple[float, float] = (-math.inf, -math.inf)
        self._evals_since_best = 0
        self._outputs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._train_loss_sum: torch.Tensor | float = 0.0
        self._train_batches = 0
        self._last_lr = lr
        self.steps_taken = 0  # optimiser steps of the finished run (set by train_module or a done file)
        self._clock = time.perf_counter()

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
        logits = logits.float() if self.logit_offset is None else logits.float() + self.logit_offset
        return F.cross_entropy(logits, y, weight=self.class_weight, label_smoothing=self.cfg.label_smoothing)

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
        train_loss, train_acc = self._score(1)[:2] if 1 in self._outputs else (math.nan, math.nan)
        step = int(self.global_step)
        row = {
            "step": step,
            "epoch": step // self.plan.steps_per_epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "val_auc": val_auc,
            "lr": self._last_lr,
            "train_loss_aug": float(self._train_loss_sum) / max(self._train_batches, 1),
            "seconds": time.perf_counter() - self._clock,
        }
        self._train_loss_sum, self._train_batches, self._clock = 0.0, 0, time.perf_counter()
        self.history.append(row)
        # Best validation AUC, ties (and NaN AUCs) decided by the lower validation loss.
        key = (val_auc if not math.isnan(val_auc) else -math.inf, -val_loss)
        if key > self.best_score:
            self.best_score, self.best_step, self._evals_since_best = key, step, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        else:
            self._evals_since_best += 1
            # Hand-written rather than Lightning's EarlyStopping: "better" must mean the same tie-broken key
            # that picks the kept weights, and EarlyStopping monitors a single logged scalar.
            if self.cfg.patience and self._evals_since_best >= self.cfg.patience:
                self.trainer.should_stop = True
        self.log_dict({"val_auc": val_auc, "val_acc": val_acc}, prog_bar=True)
        self._outputs = {}

    def progress_state(self) -> dict[str, Any]:
        """What a resumed or finished run needs beyond weights and optimiser: history, best weights, early-stop
        count and the augmentation generator (train.resume)."""
        return {
            "history": self.history,
            "best_state": self.best_state,
            "best_step": self.best_step,
            "best_score": self.best_score,
            "evals_since_best": self._evals_since_best,
            "aug_gen": self._aug_gen.get_state() if self._aug_gen is not None else None,
            "steps_taken": int(self.global_step),
            "train_loss_since_eval": (float(self._train_loss_sum), self._train_batches),
        }

    def load_progress_state(self, state: dict[str, Any]) -> None:
        self.history, self.best_state, self.best_step = state["history"], state["best_state"], state["best_step"]
        self.best_score, self._evals_since_best = tuple(state["best_score"]), state["evals_since_best"]
        if state["aug_gen"] is not None:
            self._aug_gen = torch.Generator()
            self._aug_gen.set_state(state["aug_gen"])
        self.steps_taken = state["steps_taken"]
        self._train_loss_sum, self._train_batches = state["train_loss_since_eval"]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medpretrain_progress"] = self.progress_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.load_progress_state(checkpoint["medpretrain_progress"])

    def configure_optimizers(self) -> Any:
        decay = self.cfg.weight_decay if self.cfg.optimizer == "adamw" else 0.0
        groups = [
            {**g, "lr": self.lr * scale}
            for part, scale in ((self.model.backbone, self.backbone_lr_scale), (self.model.head, 1.0))
            for g in param_groups(part, decay)
        ]
        optimizer = torch.optim.AdamW if self.cfg.optimizer == "adamw" else torch.optim.Adam
        opt = optimizer([g for g in groups if g["params"]], lr=self.lr)
        total = self.plan.total_steps
        if self.cfg.schedule == "multistep":
            factor = multistep(total, self.cfg.milestones, self.cfg.gamma)
        else:
            factor = warmup_cosine(total, self.plan.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


__all__ = ["FinetuneModule"]
