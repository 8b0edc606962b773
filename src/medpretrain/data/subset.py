"""Fixed, stratified subsets of a dataset's splits: `pneumoniamnist[train=200,val=100,test=300]`.

A subset is written into the dataset spec itself, so it travels unchanged through every step that takes a
spec (evaluation cells, pre-training requests, feature caches, the results store) and is part of every key.
Quick studies and smoke tests use it to bound the cost; the indices depend on the labels and the spec only.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from medpretrain.data.base import SPLITS, Dataset, Task
from medpretrain.errors import MedpretrainError
from medpretrain.runtime import stable_hash

_SPEC = re.compile(r"^(?P<base>.+)\[(?P<limits>[^\[\]]*)\]$")
SUBSET_SEED = 0  # one fixed draw: every study asking for the same subset gets the same images


def parse_subset(spec: str) -> tuple[str, dict[str, int]]:
    """('pneumoniamnist', {'train': 200}) for 'pneumoniamnist[train=200]'; (spec, {}) without brackets."""
    match = _SPEC.match(spec.strip())
    if match is None:
        return spec, {}
    limits: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in match["limits"].split(","))):
        split, sep, value = part.partition("=")
        split = split.strip()
        if not sep or split not in SPLITS or not value.strip().isdigit() or int(value) < 1:
            raise MedpretrainError(
                f"bad subset '{part}' in dataset '{spec}'",
                "write split=count with split in train/val/test and count ≥ 1, e.g. pneumoniamnist[train=200,val=100]",
            )
        limits[split] = int(value)
    return match["base"].strip(), limits


def subset_spec(base: str, limits: dict[str, int | None]) -> str:
    """The canonical spec string (splits in train/val/test order; None = the whole split)."""
    parts = [f"{split}={limits[split]}" for split in SPLITS if limits.get(split)]
    return f"{base}[{','.join(parts)}]" if parts else base


def _stratified(labels: np.ndarray, task: Task, n: int) -> np.ndarray:
    index = np.arange(len(labels))
    stratify = None
    if task is not Task.MULTILABEL:
        counts = np.bincount(labels)
        # train_test_split needs every present class at least twice and n ≥ number of classes to stratify.
        if counts[counts > 0].min() >= 2 and n >= (counts > 0).sum():
            stratify = labels
    chosen, _ = train_test_split(index, train_size=n, stratify=stratify, random_state=SUBSET_SEED)
    return np.sort(chosen)


def take_subset(dataset: Dataset, limits: dict[str, int]) -> Dataset:
    """A new Dataset holding at most `limits[split]` images per split, class proportions kept."""
    images, labels = dict(dataset.images), dict(dataset.labels)
    for split, n in limits.items():
        available = len(dataset.labels[split])
        if n >= available:
            continue
        idx = _stratified(dataset.labels[split], dataset.task, n)
        images[split] = dataset.images[split][torch.as_tensor(idx)]
        labels[split] = dataset.labels[split][idx]
    for split in ("train",):
        present = (labels[split].sum(axis=0) if dataset.task is Task.MULTILABEL else np.bincount(labels[split])) > 0
        if present.sum() < len(dataset.classes) and dataset.task is not Task.MULTILABEL:
            raise MedpretrainError(
                f"subset {limits} of {dataset.name} leaves some classes without training images",
                f"keep at least {len(dataset.classes)} training images per class in train=",
            )
    return replace(
        dataset,
        name=subset_spec(dataset.name, dict(limits)),
        images=images,
        labels=labels,
        key=f"{dataset.key}-sub{stable_hash(sorted(limits.items()), length=8)}",
        meta={**dataset.meta, "subset": dict(limits), "full_sizes": {s: len(dataset.labels[s]) for s in SPLITS}},
    )
