"""The in-memory dataset every later step consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

SPLITS: tuple[str, ...] = ("train", "val", "test")


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

    def class_counts(self, split: str = "train") -> np.ndarray:
        y = self.labels[split]
        if self.task is Task.MULTILABEL:
            return y.sum(axis=0).astype(int)
        return np.bincount(y, minlength=self.num_classes)
