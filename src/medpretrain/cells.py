"""One cell of the comparison, end to end: dataset → budget → initialization → protocol → metrics → store.

A cell is (dataset, size, image size, backbone, stem, init, protocol and its version, budget, seed, protocol
parameters, validation policy, flip override); its key is a content hash of that tuple (checkpoints by their
bytes), and the store's primary key.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medpretrain.backbones import DEFAULT_INPUT_NORM, check_input_norm
from medpretrain.budgets import (
    IMBALANCE_VERSION,
    VALIDATION_POLICIES,
    Budget,
    allocation,
    per_class,
    select,
    select_validation,
)
from medpretrain.data import Dataset, load_dataset
from medpretrain.data.base import Task
from medpretrain.data.images import RESIZE_MODES
from medpretrain.errors import MedpretrainError
from medpretrain.features import SCRATCH_FEATURE_SEED, FeatureCache
from medpretrain.inits import InitSpec, parse_init
from medpretrain.metrics import accuracy, auc, per_class_recall, score
from medpretrain.mitigations import mitigation_of
from medpretrain.protocols import EvalContext, get_protocol
from medpretrain.runtime import cache_root, library_versions, stable_hash
from medpretrain.stats import cell_intervals


@dataclass
class Cell:
    dataset: str
    size: int
    image_size: int
    backbone: str
    small_stem: bool
    init: str
    protocol: str
    budget: Budget
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    validation: str = "full"  # full | matched: the validation split whole, or in the budget's proportion
    hflip: float | None = None  # flip probability of training views; None = the dataset's (0 with laterality)
    resize: str = "bilinear"  # how images reach `image_size`: bilinear, nearest or pad (data.images.RESIZE_MODES)
    input_norm: str = DEFAULT_INPUT_NORM  # how every network normalises its input (backbones.INPUT_NORMS)
    # Further inits whose frozen features a multi-source protocol (fusion) combines with `init`'s; () for most.
    sources: tuple[str, ...] = ()
    init_label: str | None = None  # display name (e.g. "ImageNet→simclr (30 ep)"); not part of the key
    # "pretrained" when this study pre-trained the checkpoint itself (what it cost is the report's concern);
    # otherwise the init's own kind. Not part of the key: the same weights are the same init.
    pretrained_here: bool = False

    def __post_init__(self) -> None:
        self.sources = tuple(self.sources)
        if self.validation not in VALIDATION_POLICIES:
            raise MedpretrainError(
                f"unknown validation policy '{self.validation}'", f"choose one of: {', '.join(VALIDATION_POLICIES)}"
            )
        if self.hflip is not None and not 0 <= self.hflip <= 1:
            raise MedpretrainError(f"hflip {self.hflip} is not a probability", "use a value in [0, 1], e.g. 0")
        if self.resize not in RESIZE_MODES:
            raise MedpretrainError(f"unknown resize mode '{self.resize}'", f"choose one of: {', '.join(RESIZE_MODES)}")
        check_input_norm(self.input_norm)

    @cached_property
    def init_spec(self) -> InitSpec:
        return parse_init(self.init)

    @cached_property
    def source_specs(self) -> tuple[InitSpec, ...]:
        return tuple(parse_init(text) for text in self.sources)

    @property
    def init_specs(self) -> tuple[InitSpec, ...]:
        """Every init whose features the cell reads: its own first, then its sources."""
        return (self.init_spec, *self.source_specs)

    @property
    def feature_keys(self) -> tuple[tuple[str, ...], ...]:
        """What identifies each frozen-feature array this cell reads, without loading data: the executors
        extract each once (Ray: one task per key) before the cells that share it; () for protocols that train."""
        if not get_protocol(self.protocol).uses_features:
            return ()
        shared = (self.dataset, str(self.size), str(self.image_size), self.resize, self.backbone, str(self.small_stem))
        adapted = str(bool(self.params.get("bn_adapt", False)))
        return tuple((*shared, adapted, self.input_norm, spec.key) for spec in self.init_specs)

    @property
    def init_name(self) -> str:
        return self.init_label or self.init_spec.label

    @property
    def init_kind(self) -> str:
        """scratch, imagenet, checkpoint (a file the user brought, or timm:<model> weights), noise (the negative
        control) or pretrained (pre-trained by this study);
        "fusion" for a cell over several inits (it needs every source)."""
        if self.sources:
            return "fusion"
        return "pretrained" if self.pretrained_here else self.init_spec.record_kind

    def config(self) -> dict[str, Any]:
        config = asdict(self)
        config.pop("init_label")
        config.pop("pretrained_here")
        config["init_key"] = self.init_spec.key
        if self.input_norm == DEFAULT_INPUT_NORM:  # absent by default: cells keep the keys of before input_norm
            config.pop("input_norm")
        sources = config.pop("sources")
        if sources:  # absent when empty, so single-init cells keep the keys they had before sources existed
            config["source_keys"] = [spec.key for spec in self.source_specs]
        # A protocol whose procedure changed (e.g. fine-tuning in steps, not epochs) gets new keys, so rows
        # made by the old procedure are never reused as if they were the new one's.
        config["protocol_version"] = get_protocol(self.protocol).version
        if self.budget.imbalance is not None:  # what `imbalance` means changed once (budgets.IMBALANCE_VERSION)
            config["imbalance_version"] = IMBALANCE_VERSION
        if config["params"].get("mitigation") == "none":  # the default spelt out is the same cell
            config["params"] = {k: v for k, v in config["params"].items() if k != "mitigation"}
        if self.init_spec.kind == "scratch" and get_protocol(self.protocol).uses_features:
            config["feature_seed"] = SCRATCH_FEATURE_SEED
        return config

    @cached_property
    def key(self) -> str:
        identity = {k: v for k, v in self.config().items() if k != "init"}  # the init's content, not its path
        return stable_hash(identity, length=20)

    @property
    def label(self) -> str:
        return f"{self.dataset} · {self.init_name} · {self.protocol} · {self.budget.label} · seed {self.seed}"


def cell_dataset(cell: Cell, out_dir: Path) -> Dataset:
    return load_dataset(
        cell.dataset, size=cell.size, image_size=cell.image_size, split_dir=out_dir / "splits", resize=cell.resize
    )


def validation_subset(dataset: Dataset, policy: str, train_fraction: float, seed: int) -> np.ndarray | None:
    """Which validation images a cell may use: None for all (`full`), else the `matched` subsample — the
    proportion of labelled training images, stratified, at least one image per class."""
    if policy == "full" or train_fraction >= 1:
        return None
    return select_validation(dataset.labels["val"], dataset.task, train_fraction, seed)


def restrict_validation(dataset: Dataset, idx: np.ndarray | None) -> Dataset:
    """The dataset with only `idx` of its validation split (train and test shared, not copied)."""
    if idx is None:
        return dataset
    return replace(
        dataset,
        images={**dataset.images, "val": dataset.images["val"][torch.as_tensor(idx)]},
        labels={**dataset.labels, "val": dataset.labels["val"][idx]},
    )


def restrict_features(features: dict[str, np.ndarray], idx: np.ndarray | None) -> dict[str, np.ndarray]:
    """Frozen features of every split (cached for the whole split) with the validation rows of `idx` only."""
    return features if idx is None else {**features, "val": features["val"][idx]}


def cell_features(cell: Cell, out_dir: Path, init: InitSpec | None = None, *, progress: bool = True) -> dict[str, Any]:
    """The frozen features of `init` (default: the cell's own) on the cell's dataset, from (or into) the run's
    feature cache."""
    return FeatureCache(cache_root(out_dir)).get(
        init or cell.init_spec,
        cell.backbone,
        cell.small_stem,
        cell_dataset(cell, out_dir),
        bn_adapt=bool(cell.params.get("bn_adapt", False)),
        input_norm=cell.input_norm,
        progress=progress,
    )


def run_cell(
    cell: Cell, out_dir: Path, *, progress: bool = True, keep_model: Path | None = None
) -> tuple[dict[str, Any], Any]:
    """Evaluate one cell; returns (row, test probabilities). Nothing is stored here except, for protocols
    that train a network, the network itself at `keep_model` when given."""
    started = time.perf_counter()
    protocol = get_protocol(cell.protocol)
    full = cell_dataset(cell, out_dir)
    train_idx = select(full.labels["train"], full.task, cell.budget, cell.seed, full.classes)
    requested = (
        len(train_idx)
        if full.task is Task.MULTILABEL
        else allocation(full.labels["train"], full.task, cell.budget, full.classes).requested
    )
    val_idx = validation_subset(full, cell.validation, len(train_idx) / len(full.labels["train"]), cell.seed)
    dataset = restrict_validation(full, val_idx)
    hflip = cell.hflip if cell.hflip is not None else dataset.default_hflip
    ctx = EvalContext(
        dataset=dataset,
        train_idx=train_idx,
        init=cell.init_spec,
        backbone=cell.backbone,
        small_stem=cell.small_stem,
        seed=cell.seed,
        params=cell.params,
        features=lambda init=None: restrict_features(cell_features(cell, out_dir, init, progress=progress), val_idx),
        sources=cell.source_specs,
        progress=progress,
        keep_model=keep_model,
        work_dir=cache_root(out_dir) / "cells" / cell.key,
        hflip=hflip,
        pretrained=cell.init_spec.kind != "scratch",
        input_norm=cell.input_norm,
    )
    prediction = protocol.run(ctx)
    y_test, y_val = dataset.labels["test"], dataset.labels["val"]
    metrics = score(y_test, prediction.test_proba, dataset.task)
    # The bootstrap seed is the cell's seed, so a cell's own test-set interval is reproducible (the report's
    # comparisons resample every cell of a data set alike instead).
    intervals = cell_intervals(y_test, prediction.test_proba, dataset.task, seed=cell.seed)
    config = cell.config()
    row = {
        "cell_key": cell.key,
        "dataset": dataset.name,
        "init": cell.init_name,
        "backbone": cell.backbone,
        "protocol": cell.protocol,
        "fraction": cell.budget.fraction,
        "shots": cell.budget.shots,
        "imbalance": cell.budget.imbalance,
        "seed": cell.seed,
        "n_labeled": len(train_idx),
        "n_val": len(y_val),
        "n_per_class": per_class(full.labels["train"][train_idx], full.task, full.num_classes),
        "n_requested": requested,
        "mitigation": mitigation_of(cell.params),
        "steps": prediction.steps,
        "augmentation": {"hflip": hflip, **prediction.augmentation},
        **metrics,
        "recall_per_class": per_class_recall(y_test, prediction.test_proba, dataset.task),
        **intervals,
        "val_auc": auc(y_val, prediction.val_proba, dataset.task),
        "val_acc": accuracy(y_val, prediction.val_proba, dataset.task),
        "init_kind": cell.init_kind,
        "seconds": round(time.perf_counter() - started, 2),
        "task": dataset.task.value,
        "size": cell.size,
        "image_size": cell.image_size,
        "small_stem": cell.small_stem,
        "init_key": cell.init_spec.key,
        "dataset_key": dataset.key,
        "n_test": len(dataset.labels["test"]),
        "config_hash": stable_hash(config),
        "config": config,
        "chosen": prediction.chosen,
        "history": prediction.history,
        "extra": prediction.extra,
        "versions": library_versions(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return row, prediction.test_proba
