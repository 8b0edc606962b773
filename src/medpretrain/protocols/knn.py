"""k-nearest-neighbour classification on frozen features (cosine), k chosen on validation."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

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
from medpretrain.protocols.linear import full_proba

# `k` may be one value (MedMNIST+ uses k = 11) or a list chosen on validation; bn_adapt as for the linear probe.
DEFAULTS: dict[str, Any] = {"k": [1, 3, 5, 10, 20, 50, 100], "weights": "distance", "bn_adapt": False}


def _knn_proba(model: KNeighborsClassifier, x: np.ndarray, n_classes: int, task: Task) -> np.ndarray:
    if task is not Task.MULTILABEL:
        return full_proba(model, x, n_classes, task)
    # scikit-learn returns one (N, 2) array per label for multi-output targets; keep P(label = 1).
    per_label = model.predict_proba(x)
    return np.stack([p[:, -1] if p.shape[1] == 2 else np.zeros(len(x)) for p in per_label], axis=1)


@register_protocol
class KNNProbe(Protocol):
    name = "knn"
    description = "cosine k-nearest neighbours on frozen features; k chosen on validation AUC"
    uses_features = True
    cost = 0
    cost_reason = "kNN on frozen features fits nothing"
    defaults = DEFAULTS

    def run(self, ctx: EvalContext) -> Prediction:
        params = params_or_default(ctx.params, DEFAULTS, self.name)
        task, n_classes = ctx.dataset.task, ctx.dataset.num_classes
        features = ctx.features()
        x_train = features["train"][ctx.train_idx]
        y_train = ctx.dataset.labels["train"][ctx.train_idx]
        ks = params["k"] if isinstance(params["k"], list | tuple) else [params["k"]]
        candidates = sorted({min(int(k), len(x_train)) for k in ks})

        def fit_and_score(k: int) -> tuple[float, Any]:
            model = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights=params["weights"])
            model.fit(x_train, y_train)
            return auc(ctx.dataset.labels["val"], _knn_proba(model, features["val"], n_classes, task), task), model

        best_k, model, trace = choose_on_validation(candidates, fit_and_score)
        return Prediction(
            test_proba=_knn_proba(model, features["test"], n_classes, task),
            val_proba=_knn_proba(model, features["val"], n_classes, task),
            chosen={"k": best_k},
            extra={"search": trace},
        )
