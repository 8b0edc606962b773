"""What to do about imbalanced classes: the mitigations the linear probe and fine-tuning can apply, by name.

A protocol takes a `mitigation` parameter (`params: {linear: {mitigation: class_weighted}}`, or the study's
`mitigations: [...]` grid, or `evaluate --mitigation`) and asks the registered entry for what it changes; each
entry says it once for both protocols, so the two mean the same thing by one name:

- `none`: the plain objective.
- `class_weighted`: the loss weights each class by n / (C · n_c), the labelled subset's inverse class frequency
  (scikit-learn's `class_weight="balanced"`, the same formula, for the linear probe; the cross-entropy `weight` for
  fine-tuning; for multi-label, per label positives against negatives: `pos_weight` = negatives / positives).
- `balanced_sampler`: every class is drawn equally often. Fine-tuning draws its batches with
  `torch.utils.data.WeightedRandomSampler` (weights 1 / n_c, with replacement, as many draws per epoch as labels).
  A linear probe has no batches: it is fitted on the random oversampling that such a sampler draws in
  expectation, every class replicated to the majority's count (the remainder drawn without replacement, per seed).
  For a convex probe this is class weighting with whole-number weights, so expect it to track `class_weighted`.
  Random oversampling was the best remedy for CNNs in Buda, Maki & Mazurowski, "A systematic study of the class
  imbalance problem in convolutional neural networks", Neural Networks 106 (2018).
- `logit_adjustment`: Menon et al., "Long-tail learning via logit adjustment", ICLR 2021. Fine-tuning trains
  with the logit-adjusted softmax cross-entropy (logits + τ·log π in the loss, π the labelled subset's class
  prior) and predicts with the plain logits (their logit-adjusted loss); the linear probe, trained by scikit-learn,
  uses their post-hoc variant: its logits − τ·log π. τ = 1 (`tau`) is their default and Bayes-consistent for the
  balanced error.

Multi-label tasks have no single class per image: only `none` and `class_weighted` apply there; the others are
refused with a one-line error.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from medpretrain.data.base import Task
from medpretrain.errors import MedpretrainError
from medpretrain.registry import Registry


def class_counts(y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(y).reshape(-1), minlength=n_classes).astype(np.float64)


class Mitigation:
    """What one mitigation changes; the base changes nothing (that is `none`)."""

    name: ClassVar[str]
    description: ClassVar[str]
    multilabel: ClassVar[bool] = False  # applies to multi-label tasks too
    sklearn_class_weight: ClassVar[str | None] = None  # the linear probe's LogisticRegression(class_weight=...)

    def check(self, task: Task) -> None:
        """Refuse a task the mitigation has no meaning for."""
        if Task(task) is Task.MULTILABEL and not self.multilabel:
            raise MedpretrainError(
                f"mitigation '{self.name}' is not defined for multi-label tasks (an image has several classes)",
                "use mitigation none or class_weighted",
            )

    def loss_weights(self, y: np.ndarray, task: Task, n_classes: int) -> np.ndarray | None:
        """Per-class loss weights (cross-entropy `weight`; multi-label `pos_weight`), or None for unweighted."""
        return None

    def sampling_weights(self, y: np.ndarray, n_classes: int) -> np.ndarray | None:
        """Per-image draw weights for the training batches, or None to draw uniformly (fine-tuning)."""
        return None

    def oversample(self, y: np.ndarray, n_classes: int, seed: int) -> np.ndarray | None:
        """Positions into `y` to fit on (with repeats), or None to fit on `y` as it is (the linear probe)."""
        return None

    def logit_offset(self, y: np.ndarray, n_classes: int, tau: float) -> np.ndarray | None:
        """τ·log prior per class, or None: added to the logits in the loss, or subtracted from them post hoc."""
        return None


MITIGATIONS: Registry[Mitigation] = Registry("mitigation")
register_mitigation = MITIGATIONS.decorator(lambda cls: cls())


def get_mitigation(name: str) -> Mitigation:
    return MITIGATIONS.get(name)


def takes_mitigation(protocol: str) -> bool:
    """Whether a registered protocol takes the `mitigation` parameter (the study's `mitigations` grid expands only
    those): asked of the protocol's own parameter check, so a new protocol opts in by accepting the key."""
    from medpretrain.protocols import get_protocol  # protocols import this module: import at call time

    try:
        get_protocol(protocol).validate_params({"mitigation": "none"})
    except MedpretrainError:
        return False
    return True


def mitigation_grid(names: list[str], protocol: str) -> list[str | None]:
    """The mitigations a protocol's cells are made with (a study's `mitigations`): each of `names` for a protocol
    that takes one, else [None] (the protocol's params as they are)."""
    return list(names) if names and takes_mitigation(protocol) else [None]


def check_grid(names: list[str], protocols_with_own: list[str]) -> None:
    """A study's `mitigations` (ValueError, which pydantic names by key): known names, and no protocol that also
    sets its own `mitigation` parameter (`protocols_with_own`), so a cell's mitigation has one source."""
    for name in names:
        if name not in MITIGATIONS:
            raise ValueError(f"unknown mitigation '{name}'; allowed: {', '.join(MITIGATIONS.names())}")
    if names and protocols_with_own:
        raise ValueError(f"{protocols_with_own[0]}: give the mitigation in `mitigations` or in its params, not in both")


def mitigation_of(params: dict) -> str:
    """The mitigation a cell's params ask for; `class_weighted: true` is fine-tuning's older spelling."""
    return str(params.get("mitigation") or ("class_weighted" if params.get("class_weighted") else "none"))


@register_mitigation
class NoMitigation(Mitigation):
    name = "none"
    description = "the plain objective"
    multilabel = True


@register_mitigation
class ClassWeighted(Mitigation):
    name = "class_weighted"
    description = "loss weights n / (C · n_c) (scikit-learn class_weight='balanced'); multi-label: neg/pos pos_weight"
    multilabel = True
    sklearn_class_weight = "balanced"

    def loss_weights(self, y: np.ndarray, task: Task, n_classes: int) -> np.ndarray:
        y = np.asarray(y)
        if Task(task) is Task.MULTILABEL:
            pos = y.sum(axis=0).astype(np.float64)
            # Capped: a label with one positive in 2,000 images would otherwise weigh 2,000×.
            return np.clip((len(y) - pos) / np.maximum(pos, 1.0), 0.0, 100.0)
        return len(y) / (n_classes * np.maximum(class_counts(y, n_classes), 1.0))


@register_mitigation
class BalancedSampler(Mitigation):
    name = "balanced_sampler"
    description = "every class drawn equally often (fine-tuning: WeightedRandomSampler; linear: oversampling)"

    def sampling_weights(self, y: np.ndarray, n_classes: int) -> np.ndarray:
        y = np.asarray(y).reshape(-1)
        return 1.0 / np.maximum(class_counts(y, n_classes), 1.0)[y]

    def oversample(self, y: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
        y = np.asarray(y).reshape(-1)
        rng = np.random.default_rng([seed, 2])  # a stream of its own (budgets use `seed` and [seed, 1])
        target = int(class_counts(y, n_classes).max())
        picks = []
        for c in np.unique(y):
            members = np.flatnonzero(y == c)
            whole, rest = divmod(target, len(members))
            picks += [np.tile(members, whole), rng.choice(members, rest, replace=False)]
        return np.sort(np.concatenate(picks))


@register_mitigation
class LogitAdjustment(Mitigation):
    name = "logit_adjustment"
    description = "τ·log prior on the logits (Menon et al., ICLR 2021): in the loss (fine-tuning), post hoc (linear)"

    def logit_offset(self, y: np.ndarray, n_classes: int, tau: float) -> np.ndarray:
        counts = class_counts(y, n_classes)
        # A class absent from the subset has prior 0 (log −∞); budgets never leave one out, the floor keeps it finite.
        return tau * np.log(np.maximum(counts, 0.5) / counts.sum())


__all__ = [
    "MITIGATIONS",
    "Mitigation",
    "check_grid",
    "class_counts",
    "get_mitigation",
    "mitigation_grid",
    "mitigation_of",
    "register_mitigation",
    "takes_mitigation",
]
