"""Protocols over several inits' frozen features: `concat` (the simple baseline) and `dvme` (attention fusion).

A fusion cell's sources are its own init followed by `ctx.sources`; each source's features come from the one
feature cache, standardised with the statistics of all training images (as the linear probe does), so every
source enters on the same scale whatever its backbone statistics.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from medpretrain.data.base import Task
from medpretrain.errors import MedpretrainError
from medpretrain.protocols.base import EvalContext, Prediction, Protocol, params_or_default, register_protocol
from medpretrain.protocols.linear import DEFAULTS as LINEAR_DEFAULTS
from medpretrain.protocols.linear import LinearProbe, standardised
from medpretrain.train.config import FinetuneConfig

# DVME's hyper-parameters. Training length and selection follow fine-tuning's step plan (min_steps, evals,
# patience): the same optimiser budget at every label budget. The lr grid is tried in full, chosen on validation.
DVME_DEFAULTS: dict[str, Any] = {
    "width": 512,
    "heads": 4,
    "layers": 1,
    "dropout": 0.1,
    "input_dropout": 0.5,
    "lr": [1e-3, 1e-4],
    "weight_decay": 0.05,
    "epochs": 30,
    "min_steps": 500,
    "batch_size": 128,
    "evals": 20,
    "patience": 6,
    "bn_adapt": False,
    "precision": "auto",
}
_TRAINING_KEYS = ("lr", "weight_decay", "epochs", "min_steps", "batch_size", "evals", "patience", "precision")


def source_features(ctx: EvalContext) -> list[dict[str, np.ndarray]]:
    """Each source's standardised features, the cell's own init first; fusion needs at least two sources."""
    if not ctx.sources:
        raise MedpretrainError(
            "a fusion protocol needs at least two sources", "give two or more --source (or `sources:` in the study)"
        )
    return [standardised(ctx.features())] + [standardised(ctx.features(spec)) for spec in ctx.sources]


class FusionProtocol(Protocol):
    """Marks protocols whose cells combine several inits (the planner makes one cell per set of sources)."""

    uses_features = True
    fuses = True


@register_protocol
class ConcatProbe(FusionProtocol):
    """The sources' standardised features side by side, then the linear probe (its C grid, chosen on
    validation): the baseline a learned fusion has to beat."""

    name = "concat"
    description = "linear probe on the sources' frozen features concatenated; C chosen on validation AUC"
    cost = 1
    cost_reason = "concatenation plus a linear probe trains no network"
    defaults = LINEAR_DEFAULTS

    def run(self, ctx: EvalContext) -> Prediction:
        params_or_default(ctx.params, LINEAR_DEFAULTS, self.name)
        parts = source_features(ctx)
        joined = {split: np.concatenate([p[split] for p in parts], axis=1) for split in parts[0]}
        # Already standardised per source; standardising the joined array again changes nothing.
        prediction = LinearProbe().run(replace(ctx, features=lambda init=None: joined))
        prediction.extra["widths"] = [int(p["train"].shape[1]) for p in parts]
        return prediction


@register_protocol
class DVMEProtocol(FusionProtocol):
    """Dynamic visual meta-embedding (`medpretrain.fusion`): self-attention across the sources' embeddings,
    trained on the labelled budget; lr and step chosen on validation. Rows keep the per-sample test attention
    weights and each source's mean weight (`extra.attention`)."""

    name = "dvme"
    description = "attention over the sources' frozen embeddings (DVME); lr and step chosen on validation AUC"
    cost = 2
    cost_reason = "DVME trains a small attention network on frozen features, not the backbones"
    defaults = DVME_DEFAULTS

    def validate_params(self, params: dict[str, Any]) -> None:
        merged = params_or_default(params, DVME_DEFAULTS, self.name)
        self._config(merged)
        if merged["width"] % merged["heads"]:
            raise MedpretrainError(
                f"dvme width {merged['width']} is not divisible by heads {merged['heads']}", "e.g. width 512, heads 4"
            )

    @staticmethod
    def _config(params: dict[str, Any]) -> FinetuneConfig:
        try:
            return FinetuneConfig(augment=False, **{k: params[k] for k in _TRAINING_KEYS})
        except ValueError as err:
            raise MedpretrainError(f"invalid dvme parameter: {err}", "see the dvme defaults in the README") from None

    def run(self, ctx: EvalContext) -> Prediction:
        from medpretrain.fusion import fit_dvme  # torch-heavy; only a dvme cell needs it

        params = params_or_default(ctx.params, DVME_DEFAULTS, self.name)
        self.validate_params(ctx.params)
        cfg = self._config(params)
        task = Task(ctx.dataset.task)
        parts = source_features(ctx)
        labelled = [{**p, "train": p["train"][ctx.train_idx]} for p in parts]
        labels = {"train": ctx.dataset.labels["train"][ctx.train_idx], "val": ctx.dataset.labels["val"]}
        fit = fit_dvme(
            labelled,
            labels,
            task,
            ctx.dataset.num_classes,
            cfg,
            width=params["width"],
            heads=params["heads"],
            layers=params["layers"],
            dropout=params["dropout"],
            input_dropout=params["input_dropout"],
            seed=ctx.seed,
            progress=ctx.progress,
        )
        attention = fit["attention"]
        return Prediction(
            test_proba=fit["test_proba"],
            val_proba=fit["val_proba"],
            chosen={"lr": fit["lr"], "best_step": fit["best_step"]},
            history=fit["history"],
            steps=fit["steps"],
            extra={
                "search": fit["search"],
                # In the order of the cell's sources (config: init_key, then source_keys).
                "attention": {
                    "mean": [round(float(v), 4) for v in attention.mean(axis=0)],
                    "test": np.round(attention, 4).tolist(),
                },
            },
        )


__all__ = ["DVME_DEFAULTS", "ConcatProbe", "DVMEProtocol", "FusionProtocol", "source_features"]
