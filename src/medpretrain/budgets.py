"""Label budgets: which training images keep their labels.

Subsets are stratified and nested: for one seed each class's training images are put in one random
order, and every budget takes a prefix of that order, so the 1% subset lies inside the 10% subset.
scikit-learn's splitters draw each size independently and cannot nest, hence this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medpretrain.data.base import Task
from medpretrain.errors import MedpretrainError


@dataclass(frozen=True)
class Budget:
    """Either a fraction of the training labels or a number of labeled images per class."""

    fraction: float | None = None
    shots: int | None = None
    imbalance: float | None = None  # ratio between the most and the least frequent class in the subset

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.shots is None):
            raise MedpretrainError("a budget needs exactly one of fraction or shots", "use --fraction or --shots")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise MedpretrainError(
                f"fraction {self.fraction} is outside (0, 1]", "use e.g. --fraction 0.01 for 1% of the labels"
            )
        if self.shots is not None and self.shots < 1:
            raise MedpretrainError(f"shots {self.shots} must be at least 1", "use e.g. --shots 10")
        if self.imbalance is not None and self.imbalance < 1:
            raise MedpretrainError(
                f"imbalance ratio {self.imbalance} must be ≥ 1", "use e.g. --imbalance 10 for a 10:1 subset"
            )

    @property
    def label(self) -> str:
        base = f"{self.fraction:g}" if self.fraction is not None else f"{self.shots}-shot"
        return base + (f" imb{self.imbalance:g}" if self.imbalance else "")


def _round_up(x: float) -> float:
    """x rounded up to two significant digits, so a suggested budget is both readable and valid."""
    scale = 10 ** (1 - math.floor(math.log10(x)))
    return math.ceil(x * scale) / scale


def _class_order(labels: np.ndarray, n_classes: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(n_classes)]


def _imbalanced_counts(counts: np.ndarray, ratio: float) -> np.ndarray:
    """Scale class counts geometrically so that max/min = ratio; the most frequent class keeps its count
    and classes keep their frequency rank (class c gets count_max * ratio^(-rank/(C-1)))."""
    n = len(counts)
    rank = np.empty(n, dtype=int)
    rank[np.argsort(-counts, kind="stable")] = np.arange(n)
    target = counts.max() * ratio ** (-rank / max(n - 1, 1))
    return np.minimum(counts, np.maximum(1, np.round(target))).astype(int)


def select(labels: np.ndarray, task: Task, budget: Budget, seed: int, classes: list[str] | None = None) -> np.ndarray:
    """Indices into the training split that keep their labels under `budget` for `seed` (sorted)."""
    labels = np.asarray(labels)
    if Task(task) is Task.MULTILABEL:
        return _select_multilabel(labels, budget, seed)
    n_classes = int(labels.max()) + 1 if classes is None else len(classes)
    names = classes or [str(c) for c in range(n_classes)]
    order = _class_order(labels, n_classes, seed)
    available = np.array([len(o) for o in order])
    if (available == 0).any():
        missing = names[int(np.flatnonzero(available == 0)[0])]
        raise MedpretrainError(f"class '{missing}' has no training images", "every class needs labeled images")
    if budget.fraction is not None:
        take = np.floor(budget.fraction * available + 0.5).astype(int)
        if (take < 1).any():
            worst = int(np.argmin(available))
            smallest = _round_up(0.5 / available[worst])
            raise MedpretrainError(
                f"fraction {budget.fraction:g} leaves class '{names[worst]}' ({available[worst]} training images)"
                " with no labeled image",
                f"the smallest valid fraction is {smallest:g}, or use --shots 1",
            )
    else:
        take = np.minimum(budget.shots, available)
    if budget.imbalance:
        take = _imbalanced_counts(take, budget.imbalance)
    return np.sort(np.concatenate([o[:k] for o, k in zip(order, take, strict=True)]))


def _select_multilabel(labels: np.ndarray, budget: Budget, seed: int) -> np.ndarray:
    """Multi-label data has no single stratum per image: take a prefix of one random order and require
    every label to keep at least one positive image."""
    if budget.imbalance:
        raise MedpretrainError("--imbalance is defined for single-label tasks only", "drop --imbalance")
    order = np.random.default_rng(seed).permutation(len(labels))
    if budget.fraction is not None:
        n = int(np.floor(budget.fraction * len(labels) + 0.5))
    else:
        # k shots per label: grow the prefix until every label has k positives (or all it has).
        need = np.minimum(budget.shots, labels.sum(axis=0))
        cumulative = np.cumsum(labels[order], axis=0)
        n = int(np.argmax((cumulative >= need).all(axis=1))) + 1
    chosen = order[:n]
    positives = labels[chosen].sum(axis=0) if n else np.zeros(labels.shape[1])
    if (positives < 1).any():
        first_full = np.cumsum(labels[order], axis=0)
        n_min = int(np.argmax((first_full >= 1).all(axis=1))) + 1
        raise MedpretrainError(
            f"budget {budget.label} leaves a label without a positive image",
            f"the smallest valid fraction for seed {seed} is {_round_up(n_min / len(labels)):g}",
        )
    return np.sort(chosen)


VALIDATION_POLICIES = ("full", "matched")


def select_validation(labels: np.ndarray, task: Task, proportion: float, seed: int) -> np.ndarray:
    """Indices into the validation split for the `matched` policy: `proportion` of it, stratified, with at
    least one image per class (per label with a positive, for multi-label), sorted.

    A real project with 1% of its images labelled has about 1% labelled for validation too; choosing
    hyper-parameters on the whole validation split at such budgets is optimistic. The draw depends on `seed`
    (offset from the training draw's stream), so its variance is part of the seed-to-seed variance.
    """
    labels = np.asarray(labels)
    if not 0 < proportion <= 1:
        raise MedpretrainError(f"validation proportion {proportion} is outside (0, 1]", "use a budget in (0, 1]")
    if proportion >= 1:
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the training draw uses `seed` alone
    if Task(task) is Task.MULTILABEL:
        # Stratify by each image's rarest positive label (images without any positive form one stratum).
        freq = labels.sum(axis=0)
        rarest = np.where(labels.any(axis=1), np.argmin(np.where(labels > 0, freq, np.inf), axis=1), -1)
        strata = rarest
    else:
        strata = labels.reshape(-1)
    picks = []
    for value in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == value))
        picks.append(members[: max(1, int(np.floor(proportion * len(members) + 0.5)))])
    return np.sort(np.concatenate(picks))
