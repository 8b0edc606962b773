"""The in-memory dataset every later step consumes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

SPLITS: tuple[str, ...] = ("train", "val", "test")

# A class name marks laterality when "left" or "right" is a word of it (femur-left, "Lung right", L_kidney is
# not caught: say `hflip: 0` in the study for such names). A flipped image of such a class shows the other one.
_LATERAL = re.compile(r"(^|[^a-z])(left|right)([^a-z]|$)", re.IGNORECASE)
# The flip probability of datasets without laterality: the usual 0.5 of supervised and self-supervised views.
DEFAULT_HFLIP = 0.5


class Task(str, Enum):
    """Prediction task; drives the loss, the probability transform and the metrics."""

    BINARY = "binary"
    MULTICLASS = "multiclass"
    ORDINAL = "ordinal"  # treated as multi-class for training; quadratic kappa is the headline metric
    MULTILABEL = "multilabel"

    @classmethod
    def from_medmnist(cls, task: str) -> Task:
        mapping = {
            "binary-class": cls.BINARY,
            "multi-class": cls.MULTICLASS,
            "ordinal-regression": cls.ORDINAL,
            "multi-label, binary-class": cls.MULTILABEL,
        }
        return mapping[task]


@dataclass
class Dataset:
    """Images as uint8 tensors N×C×H×W (C is 1 or 3, native channels), already at `image_size`.

    `labels[split]` is int64 of shape (N,) for single-label tasks and (N, L) of 0/1 for multi-label.
    `key` identifies the content (name, native size, image size and, for user data, a manifest hash);
    feature caches and results are keyed by it.
    """

    name: str
    task: Task
    classes: list[str]
    images: dict[str, torch.Tensor]
    labels: dict[str, np.ndarray]
    key: str
    source: str
    size: int  # native resolution of the source (MedMNIST 28/64/128/224; user data: as given)
    image_size: int
    meta: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.images["train"].shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def lateral_classes(self) -> list[str]:
        """Classes whose names mark a side of the body: a horizontal flip would turn them into another class."""
        return [c for c in self.classes if _LATERAL.search(c)]

    @property
    def default_hflip(self) -> float:
        """Horizontal-flip probability for training views: 0 where class names mark laterality, else 0.5."""
        return 0.0 if self.lateral_classes else DEFAULT_HFLIP

    def class_counts(self, split: str = "train") -> np.ndarray:
        y = self.labels[split]
        if self.task is Task.MULTILABEL:
            return y.sum(axis=0).astype(int)
        return np.bincount(y, minlength=self.num_classes)
