"""Full fine-tuning of backbone + linear head, in optimiser steps; lr and step chosen on validation AUC."""

from __future__ import annotations

from pydantic import ValidationError

from medpretrain.errors import MedpretrainError
from medpretrain.inits import build_model
from medpretrain.protocols.base import EvalContext, Prediction, Protocol, register_protocol
from medpretrain.train import FinetuneConfig, finetune, save_classifier


def finetune_config(params: dict) -> FinetuneConfig:
    try:
        return FinetuneConfig(**params)
    except (TypeError, ValidationError) as err:
        allowed = ", ".join(FinetuneConfig.model_fields) if hasattr(FinetuneConfig, "model_fields") else ""
        raise MedpretrainError(
            f"invalid fine-tuning parameters {params}: {err}".splitlines()[0], f"allowed: {allowed}"
        ) from None


@register_protocol
class FineTune(Protocol):
    name = "finetune"
    description = "full fine-tuning (AdamW, warm-up + cosine, ≥ min_steps); lr and step chosen on validation AUC"
    uses_features = False
    cost = 3
    cost_reason = "fine-tuning trains the whole network"
    version = 2  # 2: length in optimiser steps, lr grid, early stopping (1: a fixed number of epochs)

    def validate_params(self, params: dict) -> None:
        finetune_config(params)

    def run(self, ctx: EvalContext) -> Prediction:
        cfg = finetune_config(ctx.params)
        model, report = build_model(
            ctx.backbone,
            ctx.init,
            small_stem=ctx.small_stem,
            seed=ctx.seed,
            img_size=ctx.dataset.image_size,
            input_norm=ctx.input_norm,
        )
        result = finetune(
            model,
            ctx.dataset,
            ctx.train_idx,
            cfg,
            seed=ctx.seed,
            pretrained=ctx.pretrained,
            hflip=ctx.hflip,
            progress=ctx.progress,
            work_dir=ctx.work_dir,
        )
        if ctx.keep_model is not None:
            save_classifier(
                ctx.keep_model,
                result.model,
                image_size=ctx.dataset.image_size,
                task=ctx.dataset.task,
                classes=ctx.dataset.classes,
            )
        return Prediction(
            test_proba=result.test_proba,
            val_proba=result.val_proba,
            chosen={"lr": result.lr, "step": result.best_step, "epoch": result.best_epoch},
            history=result.history,
            extra={
                "overfitting": result.overfitting,
                "weights": report.summary(),
                "search": result.search,
                "plan": {k: result.config[k] for k in ("batch_size_used", "planned_steps", "eval_every")},
                "stopped_early": result.stopped_early,
            },
            steps=result.steps,
            augmentation=cfg.augmentation(ctx.hflip),
        )
