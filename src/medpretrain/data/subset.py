"""Fixed, stratified subsets of a dataset's splits: `pneumoniamnist[train=200,val=100,test=300]`.

A subset is written into the dataset spec itself, so it travels unchanged through every step that takes a
spec (evaluation cells, pre-training requests, feature caches, the results store) and is part of every key.
Quick studies and smoke tests use it to bound the cost; the indices depend on the labels and the spec only.

A count larger than its split is refused with an error naming the split, the requested and the available
count (`pneumoniamnist[train=99999]`: train has 4708 images), never silently capped: a capped subset would
run, and be stored, under a spec that does not describe its data. A count equal to the split keeps it whole.
For MedMNIST flags the check needs no data (the split sizes are in the release metadata), so it fails
before any work; for image folders it runs once the folder's splits are known.
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


def check_limits(spec: str, limits: dict[str, int], available: dict[str, int]) -> None:
    """Refuse a subset count larger than its split (see the module docstring for why it is not capped)."""
    for split, n in limits.items():
        have = available.get(split)
        if have is not None and n > have:
            base = parse_subset(spec)[0]
            raise MedpretrainError(
                f"subset '{spec}' asks for {split}={n} but the {split} split of {base} has only {have} images",
                f"use {split}={have} or fewer, or leave {split} out to use the whole split",
            )


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
    """A new Dataset holding `limits[split]` images per split, class proportions kept.

    A count larger than its split raises MedpretrainError; a count equal to it keeps the whole split.
    """
    sizes = {split: len(dataset.labels[split]) for split in SPLITS}
    check_limits(subset_spec(dataset.name, dict(limits)), limits, sizes)
    images, labels = dict(dataset.images), dict(dataset.labels)
    for split, n in limits.items():
        if n == sizes[split]:
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
        meta={**dataset.meta, "subset": dict(limits), "full_sizes": sizes},
    )
