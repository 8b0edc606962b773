"""Linear probe: logistic regression on frozen features, regularisation chosen on validation."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from medpretrain.data.base import Task
from medpretrain.metrics import auc
from medpretrain.protocols.base import (
    EvalContext,
    Prediction,
    Protocol,
    choose_on_validation,
    params_or_default,
    register_protocol,
)

# bn_adapt: BatchNorm statistics re-estimated on the training images before extraction, for every init alike
# (features.adapt_batchnorm); the features are cached under their own key.
DEFAULTS: dict[str, Any] = {"C": [0.001, 0.01, 0.1, 1.0, 10.0], "max_iter": 1000, "bn_adapt": False}


def full_proba(model: Any, x: np.ndarray, n_classes: int, task: Task) -> np.ndarray:
    """predict_proba with one column per class of the dataset, even for classes absent from the fit."""
    proba = model.predict_proba(x)
    if task is Task.MULTILABEL:
        return proba
    out = np.zeros((len(x), n_classes))
    out[:, model.classes_] = proba
    return out


def standardised(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scale with statistics of all training images: they need no labels, so every budget may use them."""
    scaler = StandardScaler().fit(features["train"])
    return {split: scaler.transform(x).astype(np.float32) for split, x in features.items()}


@register_protocol
class LinearProbe(Protocol):
    name = "linear"
    description = "logistic regression on frozen features; C chosen on validation AUC"
    uses_features = True
    cost = 1
    cost_reason = "a linear probe trains no network"
    defaults = DEFAULTS

    def run(self, ctx: EvalContext) -> Prediction:
        params = params_or_default(ctx.params, DEFAULTS, self.name)
        task, n_classes = ctx.dataset.task, ctx.dataset.num_classes
        x = standardised(ctx.features())
        y_train = ctx.dataset.labels["train"][ctx.train_idx]
        y_val = ctx.dataset.labels["val"]

        def fit_and_score(c: float) -> tuple[float, Any]:
            model: Any = LogisticRegression(C=c, max_iter=params["max_iter"])
            if task is Task.MULTILABEL:
                model = OneVsRestClassifier(model)
            # One BLAS thread: these fits are small, and several threads on a busy machine made them 50×
            # slower (spin-waiting), measured on 2 cores.
            with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
                # Strong regularisation on a few images may stop early; its validation score says how much that matters.
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x["train"][ctx.train_idx], y_train)
            return auc(y_val, full_proba(model, x["val"], n_classes, task), task), model

        best_c, model, trace = choose_on_validation(list(params["C"]), fit_and_score)
        return Prediction(
            test_proba=full_proba(model, x["test"], n_classes, task),
            val_proba=full_proba(model, x["val"], n_classes, task),
            chosen={"C": best_c},
            extra={"search": trace},
        )
