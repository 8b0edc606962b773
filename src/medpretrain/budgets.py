"""Label budgets: which training images keep their labels.

Subsets are stratified and nested: for one seed each class's training images are put in one random
order, and every budget takes a prefix of that order, so the 1% subset lies inside the 10% subset.
scikit-learn's splitters draw each size independently and cannot nest, hence this module.

An imbalanced budget (`imbalance: r`) holds exactly r:1 between its most and its least frequent class, whatever
the data's own ratio (a 58:1 data set at r = 10 gives 10:1, a 7:1 one at r = 20 gives 20:1): see `allocate`. It
has as many labels as the same budget without imbalance, unless the training split cannot hold an r:1 subset of
that size; then it is shrunk to the largest that fits, and the row records both (`n_requested`, `n_labeled`).
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


def ratios_of(imbalance: float | list[float | None] | None) -> list[float | None]:
    """A study's `budgets.imbalance` as its list of ratios, natural (None) first: [None] when it gives none."""
    return sorted(set(imbalance), key=lambda r: r or 0) if isinstance(imbalance, list) else [imbalance]


def _round_up(x: float) -> float:
    """x rounded up to two significant digits, so a suggested budget is both readable and valid."""
    scale = 10 ** (1 - math.floor(math.log10(x)))
    return math.ceil(x * scale) / scale


def _class_order(labels: np.ndarray, n_classes: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(n_classes)]


# Raised when the meaning of `imbalance` changes, so rows of the old subsets are not reused (evaluate.Cell.config).
# 2: exactly r:1 at the budget's size (1: counts only capped from above, so r below the natural ratio did nothing).
IMBALANCE_VERSION = 2


@dataclass(frozen=True)
class Allocation:
    """Labelled images per class of a budget, and how many labels the budget asked for in total."""

    counts: np.ndarray
    requested: int


def _bend(low: int, high: int, shares: np.ndarray, total: int) -> np.ndarray:
    """Counts between `low` and `high` for the classes between the extremes: low + (high − low)·share^γ, with γ
    found by bisection so they sum to `total` (γ = 1 is the geometric profile), rounded by largest remainder.

    Hand-written: a one-dimensional monotone solve and a rounding that keeps the sum; nothing to import."""
    total = int(np.clip(total, low * len(shares), high * len(shares)))
    lo, hi = -12.0, 12.0  # log2 γ: γ → 0 puts every class at `high`, γ → ∞ at `low`
    for _ in range(60):
        mid = (lo + hi) / 2
        if (low + (high - low) * shares ** (2.0**mid)).sum() > total:
            lo = mid
        else:
            hi = mid
    values = low + (high - low) * shares ** (2.0**hi)
    counts = np.floor(values).astype(int)
    extra = int(total - counts.sum())
    if extra > 0:  # the largest remainders first; ties to the more frequent class, so the order is kept
        counts[np.argsort(-(values - counts), kind="stable")[:extra]] += 1
    return np.minimum(counts, high)


def _profile(n: int, ratio: float, n_classes: int) -> np.ndarray:
    """Counts by frequency rank (most frequent first) for `n` labels at exactly `ratio` between the first and the
    last: the least frequent gets m ≈ n / Σ ratio^(j/(C−1)), the most frequent round(ratio·m), the classes between
    a geometric profile, bent (see `_bend`) so the total is `n` where the extremes allow it."""
    weights = ratio ** (np.arange(n_classes)[::-1] / max(n_classes - 1, 1))
    low = max(1, int(np.floor(n / weights.sum() + 0.5)))
    high = max(low, int(np.floor(ratio * low + 0.5)))
    if n_classes == 2:
        return np.array([high, low])
    shares = (weights[1:-1] - 1) / (ratio - 1) if ratio > 1 else np.zeros(n_classes - 2)
    return np.concatenate([[high], _bend(low, high, shares, n - low - high), [low]])


def allocate(available: np.ndarray, n: int, ratio: float, names: list[str]) -> np.ndarray:
    """Per-class counts for `n` labels at exactly `ratio` (±1 image of rounding on the most frequent class), in
    the order of the classes' natural frequency (the majority stays the majority), each at most `available`.

    When the training split cannot hold such a subset of `n` labels, the largest that fits is returned (found by
    bisection on the total); a ratio that needs more images of the most frequent class than there are is an error.
    """
    if len(available) < 2:
        raise MedpretrainError("an imbalance ratio needs at least two classes", "drop --imbalance")
    rank = np.argsort(-available, kind="stable")  # rank → class
    have = available[rank]

    def fits(total: int) -> bool:
        return bool((_profile(total, ratio, len(have)) <= have).all())

    smallest = int(np.floor(ratio + 0.5)) + len(have) - 1  # one image of each other class, round(r) of the top
    if not fits(smallest):
        top = names[int(rank[0])]
        raise MedpretrainError(
            f"imbalance {ratio:g} needs {int(np.floor(ratio + 0.5))} training images of class '{top}' (its most "
            f"frequent) but it has {int(have[0])}",
            f"use --imbalance {int(have[0])} or less",
        )
    if n < smallest:
        raise MedpretrainError(
            f"a {ratio:g}:1 subset of {len(have)} classes needs at least {smallest} labels, the budget gives {n}",
            "use a larger fraction or more shots, or a smaller --imbalance",
        )
    total = n
    if not fits(total):
        lo, hi = smallest, n  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        total = lo
    counts = np.empty_like(available)
    counts[rank] = _profile(total, ratio, len(have))
    return counts


def allocation(labels: np.ndarray, task: Task, budget: Budget, classes: list[str] | None = None) -> Allocation:
    """How many training images of each class keep their labels under `budget` (the same for every seed)."""
    labels = np.asarray(labels)
    if Task(task) is Task.MULTILABEL:
        raise MedpretrainError("per-class allocation is defined for single-label tasks only", "")
    n_classes = int(labels.max()) + 1 if classes is None else len(classes)
    names = classes or [str(c) for c in range(n_classes)]
    available = np.bincount(labels.reshape(-1), minlength=n_classes)
    if (available == 0).any():
        missing = names[int(np.flatnonzero(available == 0)[0])]
        raise MedpretrainError(f"class '{missing}' has no training images", "every class needs labeled images")
    if budget.fraction is not None and budget.imbalance is not None:
        # The profile decides every class's count, so only the total follows from the fraction.
        take = np.array([max(1, int(np.floor(budget.fraction * available.sum() + 0.5)))])
    elif budget.fraction is not None:
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
    requested = int(take.sum())
    if budget.imbalance is None:
        return Allocation(take, requested)
    return Allocation(allocate(available, requested, budget.imbalance, names), requested)


def select(labels: np.ndarray, task: Task, budget: Budget, seed: int, classes: list[str] | None = None) -> np.ndarray:
    """Indices into the training split that keep their labels under `budget` for `seed` (sorted)."""
    labels = np.asarray(labels)
    if Task(task) is Task.MULTILABEL:
        return _select_multilabel(labels, budget, seed)
    take = allocation(labels, task, budget, classes).counts
    order = _class_order(labels.reshape(-1), len(take), seed)
    return np.sort(np.concatenate([o[:k] for o, k in zip(order, take, strict=True)]))


def per_class(labels: np.ndarray, task: Task, n_classes: int) -> list[int]:
    """Labelled images per class (positives per label for multi-label): a row's `n_per_class`."""
    labels = np.asarray(labels)
    if Task(task) is Task.MULTILABEL:
        return [int(v) for v in labels.sum(axis=0)]
    return [int(v) for v in np.bincount(labels.reshape(-1), minlength=n_classes)]


def _select_multilabel(labels: np.ndarray, budget: Budget, seed: int) -> np.ndarray:
    """Multi-label data has no single stratum per image: take a prefix of one random order and require
    every label to keep at least one positive image."""
    if budget.imbalance:
        raise MedpretrainError(
            "--imbalance is defined for single-label tasks only (a multi-label image has no one class to count)",
            "drop --imbalance",
        )
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
