"""Linear probe: logistic regression on frozen features, regularisation chosen on validation.

`mitigation` (medpretrain.mitigations) changes the fit for imbalanced classes: class weights, oversampling, or the
post-hoc logit adjustment of Menon et al. (ICLR 2021) with `tau`; C is chosen on the predictions it makes.
"""

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
from medpretrain.errors import MedpretrainError
from medpretrain.metrics import auc
from medpretrain.mitigations import get_mitigation
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
DEFAULTS: dict[str, Any] = {
    "C": [0.001, 0.01, 0.1, 1.0, 10.0],
    "max_iter": 1000,
    "bn_adapt": False,
    "mitigation": "none",
    "tau": 1.0,
}


def full_proba(model: Any, x: np.ndarray, n_classes: int, task: Task, offset: np.ndarray | None = None) -> np.ndarray:
    """predict_proba with one column per class of the dataset, even for classes absent from the fit; with
    `offset`, the softmax of the logits minus offset (post-hoc logit adjustment, single-label only)."""
    if offset is None:
        proba = model.predict_proba(x)
    else:
        logits = model.decision_function(x)
        if logits.ndim == 1:  # binary: the log-odds of classes_[1], i.e. logits (0, d)
            logits = np.column_stack([np.zeros_like(logits), logits])
        logits = logits - offset[model.classes_]
        proba = np.exp(logits - logits.max(axis=1, keepdims=True))
        proba /= proba.sum(axis=1, keepdims=True)
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

    def validate_params(self, params: dict[str, Any]) -> None:
        merged = params_or_default(params, DEFAULTS, self.name)
        get_mitigation(merged["mitigation"])
        if not isinstance(merged["tau"], int | float) or merged["tau"] < 0:
            raise MedpretrainError(f"tau {merged['tau']!r} must be a number ≥ 0", "use e.g. tau: 1.0 (Menon et al.)")

    def run(self, ctx: EvalContext) -> Prediction:
        self.validate_params(ctx.params)
        params = params_or_default(ctx.params, DEFAULTS, self.name)
        task, n_classes = ctx.dataset.task, ctx.dataset.num_classes
        mitigation = get_mitigation(params["mitigation"])
        mitigation.check(task)
        x = standardised(ctx.features())
        y_train = ctx.dataset.labels["train"][ctx.train_idx]
        y_val = ctx.dataset.labels["val"]
        fit_rows = np.arange(len(y_train))
        repeats = mitigation.oversample(y_train, n_classes, ctx.seed)
        if repeats is not None:
            fit_rows = repeats
        offset = mitigation.logit_offset(y_train, n_classes, float(params["tau"]))

        def fit_and_score(c: float) -> tuple[float, Any]:
            model: Any = LogisticRegression(
                C=c, max_iter=params["max_iter"], class_weight=mitigation.sklearn_class_weight
            )
            if task is Task.MULTILABEL:
                model = OneVsRestClassifier(model)
            # One BLAS thread: these fits are small, and several threads on a busy machine made them 50×
            # slower (spin-waiting), measured on 2 cores.
            with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
                # Strong regularisation on a few images may stop early; its validation score says how much that matters.
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x["train"][ctx.train_idx][fit_rows], y_train[fit_rows])
            return auc(y_val, full_proba(model, x["val"], n_classes, task, offset), task), model

        best_c, model, trace = choose_on_validation(list(params["C"]), fit_and_score)
        return Prediction(
            test_proba=full_proba(model, x["test"], n_classes, task, offset),
            val_proba=full_proba(model, x["val"], n_classes, task, offset),
            chosen={"C": best_c},
            extra={"search": trace, "mitigation": mitigation.name, "fitted_on": len(fit_rows)},
        )
