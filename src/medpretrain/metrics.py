"""Point metrics of test-split predictions, for every task type; intervals and tests live in `stats`.

scikit-learn computes each metric; what is written here is only what it lacks: the task-aware glue
(binary vs multi-class vs ordinal vs multi-label), expected calibration error, and an AUC that scores many
weightings of the test images at once (the bootstrap's resamples).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    recall_score,
)

from medpretrain.data.base import Task

METRIC_NAMES: tuple[str, ...] = ("auc", "acc", "balanced_acc", "f1_macro", "kappa", "ece")


def probabilities(logits: torch.Tensor | np.ndarray, task: Task) -> np.ndarray:
    """Logits → probabilities: independent sigmoids for multi-label, softmax otherwise."""
    t = torch.as_tensor(logits).float()
    p = torch.sigmoid(t) if Task(task) is Task.MULTILABEL else torch.softmax(t, dim=1)
    return p.detach().cpu().numpy()


def predict_labels(proba: np.ndarray, task: Task) -> np.ndarray:
    return (proba >= 0.5).astype(int) if Task(task) is Task.MULTILABEL else proba.argmax(axis=1)


def _weighted_binary_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of one score column under B weightings of the samples at once: (B, n) weights → (B,) AUCs.

    Hand-written because scikit-learn scores one resample per call (≈15 ms on 3k images × 8 classes,
    15 s per 1000-resample bootstrap). Sorting once and summing weights per tied-score group gives the
    Mann-Whitney statistic with ties counted as half, identical to roc_auc_score for unit weights.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    pos = positive[order].astype(bool)
    w = weights[:, order]
    pos_per_group = np.add.reduceat(np.where(pos, w, 0), starts, axis=1)
    neg_per_group = np.add.reduceat(np.where(pos, 0, w), starts, axis=1)
    neg_below = np.cumsum(neg_per_group, axis=1) - neg_per_group
    wins = (pos_per_group * (neg_below + 0.5 * neg_per_group)).sum(axis=1)
    pairs = pos_per_group.sum(axis=1) * neg_per_group.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)


def weighted_auc(y: np.ndarray, proba: np.ndarray, task: Task, weights: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUC (MedMNIST's definition) for each row of `weights`; NaN where undefined."""
    task = Task(task)
    if task is Task.MULTILABEL:
        columns = [_weighted_binary_auc(proba[:, j], y[:, j], weights) for j in range(y.shape[1])]
    elif proba.shape[1] == 2:
        return _weighted_binary_auc(proba[:, 1], y == 1, weights)
    else:
        columns = [_weighted_binary_auc(proba[:, c], y == c, weights) for c in range(proba.shape[1])]
    stacked = np.stack(columns, axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (a single class present) stay NaN
        return np.nanmean(stacked, axis=1)


def weighted_balanced_accuracy(y: np.ndarray, proba: np.ndarray, task: Task, weights: np.ndarray) -> np.ndarray:
    """Balanced accuracy (mean per-class recall over the classes present; for multi-label the mean over labels
    of (TPR + TNR) / 2) under each row of `weights` (B, n) → (B,); identical to scikit-learn's
    balanced_accuracy_score for unit weights. Hand-written for the same reason as `weighted_auc`: the bootstrap
    scores a thousand weightings at once, scikit-learn one per call."""
    task = Task(task)
    y = np.asarray(y)
    pred = predict_labels(np.asarray(proba, dtype=np.float64), task)
    if task is Task.MULTILABEL:
        pos, hit = y.astype(float), (pred == y).astype(float)
        tpr = (weights @ (pos * hit)) / np.maximum(weights @ pos, 1e-300)
        tnr = (weights @ ((1 - pos) * hit)) / np.maximum(weights @ (1 - pos), 1e-300)
        return ((tpr + tnr) / 2).mean(axis=1)
    onehot = (y.reshape(-1, 1) == np.arange(np.asarray(proba).shape[1])).astype(float)
    support = weights @ onehot
    recall = (weights @ (onehot * (pred == y.reshape(-1))[:, None])) / np.where(support > 0, support, 1)
    return np.where(support > 0, recall, 0).sum(axis=1) / np.maximum((support > 0).sum(axis=1), 1)


def auc(y: np.ndarray, proba: np.ndarray, task: Task) -> float:
    """Macro one-vs-rest AUC; mean per label for multi-label; NaN when it is undefined."""
    return float(weighted_auc(np.asarray(y), np.asarray(proba, dtype=np.float64), task, np.ones((1, len(y))))[0])


def accuracy(y: np.ndarray, proba: np.ndarray, task: Task) -> float:
    """Accuracy; for multi-label the mean per-label accuracy at threshold 0.5 (MedMNIST's definition)."""
    pred = predict_labels(proba, task)
    if Task(task) is Task.MULTILABEL:
        return float((pred == y).mean())
    return float(accuracy_score(y, pred))


def _ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        total += in_bin.sum() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(total / len(conf))


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, task: Task, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width bins (Guo et al., 2017); for multi-label, the mean over labels of each
    label's binary ECE (confidence in the thresholded prediction).

    Hand-written because scikit-learn offers only the reliability curve, not the weighted error.
    """
    if Task(task) is Task.MULTILABEL:
        conf = np.where(proba >= 0.5, proba, 1 - proba)
        correct = (proba >= 0.5).astype(int) == y
        return float(np.mean([_ece(conf[:, j], correct[:, j], n_bins) for j in range(y.shape[1])]))
    return _ece(proba.max(axis=1), proba.argmax(axis=1) == y, n_bins)


def kappa_weighting(task: Task) -> str | None:
    """scikit-learn's `weights` for Cohen's kappa: quadratic for ordinal tasks, where the class order means
    something; unweighted otherwise, where a quadratic weight would depend on the arbitrary order of the classes."""
    return "quadratic" if Task(task) is Task.ORDINAL else None


def kappa_name(task: Task) -> str:
    return "quadratic-weighted κ" if Task(task) is Task.ORDINAL else "Cohen's κ (unweighted)"


def score(y: np.ndarray, proba: np.ndarray, task: Task) -> dict[str, float]:
    """All headline point metrics of one set of test predictions (intervals: `stats.cell_intervals`)."""
    task = Task(task)
    y = np.asarray(y)
    proba = np.asarray(proba, dtype=np.float64)
    if len(y) != len(proba):
        raise ValueError(f"{len(y)} labels but {len(proba)} predictions")
    pred = predict_labels(proba, task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined precision on absent classes is reported as 0, which is right
        if task is Task.MULTILABEL:
            balanced = np.mean([balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(y.shape[1])])
            f1 = f1_score(y, pred, average="macro", zero_division=0)
            kappas = [
                cohen_kappa_score(y[:, j], pred[:, j])
                if len(np.unique(np.concatenate([y[:, j], pred[:, j]]))) > 1
                else 1.0
                for j in range(y.shape[1])
            ]
            kappa = float(np.mean(kappas))
        else:
            balanced = balanced_accuracy_score(y, pred)
            f1 = f1_score(y, pred, average="macro", zero_division=0)
            agree = len(np.unique(np.concatenate([y, pred]))) > 1
            kappa = cohen_kappa_score(y, pred, weights=kappa_weighting(task)) if agree else 1.0
    return {
        "auc": auc(y, proba, task),
        "acc": accuracy(y, proba, task),
        "balanced_acc": float(balanced),
        "f1_macro": float(f1),
        "kappa": float(kappa),
        "ece": expected_calibration_error(y, proba, task),
    }


def per_class_recall(y: np.ndarray, proba: np.ndarray, task: Task) -> list[float]:
    """Recall of each class (each label, at threshold 0.5, for multi-label) on the test split; 0 for a class with
    no test image. Balanced accuracy is their mean for single-label tasks."""
    task = Task(task)
    y = np.asarray(y)
    pred = predict_labels(np.asarray(proba, dtype=np.float64), task)
    labels = None if task is Task.MULTILABEL else list(range(np.asarray(proba).shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recall = recall_score(y, pred, labels=labels, average=None, zero_division=0)
    return [float(v) for v in recall]
