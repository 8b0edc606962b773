"""What every evaluation protocol receives and returns, and the registry that names them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from medpretrain.backbones import DEFAULT_INPUT_NORM
from medpretrain.data.base import Dataset
from medpretrain.errors import MedpretrainError
from medpretrain.inits import InitSpec
from medpretrain.registry import Registry


@dataclass
class EvalContext:
    """One cell's inputs: the data, which training labels are visible, the initialization and parameters."""

    dataset: Dataset
    train_idx: np.ndarray
    init: InitSpec
    backbone: str
    small_stem: bool
    seed: int
    params: dict[str, Any]
    # features() = the init's frozen features per split, features(spec) = those of one of `sources`; cached on
    # disk, computed lazily.
    features: Callable[..., dict[str, np.ndarray]]
    progress: bool = True
    keep_model: Path | None = None  # protocols that train a network save it here (for Grad-CAM)
    # A folder private to this cell where a protocol that trains may keep checkpoints of unfinished work, so a
    # killed cell resumes mid-training; the protocol removes what it wrote once it has its prediction.
    work_dir: Path | None = None
    hflip: float = 0.5  # flip probability for training views (0 for datasets whose classes mark laterality)
    pretrained: bool = False  # the init carries weights (anything but scratch)
    input_norm: str = DEFAULT_INPUT_NORM  # how the network normalises its input (backbones.INPUT_NORMS)
    sources: tuple[InitSpec, ...] = ()  # further inits a multi-source (fusion) protocol combines


@dataclass
class Prediction:
    """Test-split probabilities plus what was chosen on validation and any training curves.

    `val_proba` are the chosen model's validation probabilities: the report ranks inits on them, never on test.
    """

    test_proba: np.ndarray
    val_proba: np.ndarray
    chosen: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None  # optimiser steps actually taken (protocols that train a network)
    augmentation: dict[str, Any] = field(default_factory=dict)  # the training views used, beyond `hflip`


class Protocol(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    uses_features: ClassVar[bool]  # True: works on cached frozen features; False: trains the network
    defaults: ClassVar[dict[str, Any]] = {}
    version: ClassVar[int] = 1  # raised when the procedure changes, so old rows are not reused as new ones
    # What running it costs, for the report's "the cheaper option" (lower is cheaper), and why, in words.
    cost: ClassVar[int] = 9
    cost_reason: ClassVar[str] = ""
    # True for protocols that combine several inits' features (fusion): the planner makes one cell per set of
    # sources (the study's `sources`), not one per init.
    fuses: ClassVar[bool] = False

    @property
    def trains_network(self) -> bool:
        """It trains (and may keep, for Grad-CAM) a network of its own instead of reading frozen features."""
        return not self.uses_features

    def validate_params(self, params: dict[str, Any]) -> None:
        """Raise MedpretrainError naming an unknown or invalid parameter (study files are checked up front)."""
        params_or_default(params, self.defaults, self.name)

    @abstractmethod
    def run(self, ctx: EvalContext) -> Prediction: ...


PROTOCOLS: Registry[Protocol] = Registry("protocol")
register_protocol = PROTOCOLS.decorator(lambda cls: cls())  # protocols hold no state: one instance each


def get_protocol(name: str) -> Protocol:
    return PROTOCOLS.get(name)


def protocol_cost(name: str) -> int:
    """The registered protocol's cost; a protocol this version does not know (an old row) sorts last."""
    return PROTOCOLS[name].cost if name in PROTOCOLS else 9


def params_or_default(params: dict[str, Any], defaults: dict[str, Any], protocol: str) -> dict[str, Any]:
    """Protocol parameters merged over defaults; an unknown key is an input error, not silently ignored."""
    unknown = set(params) - set(defaults)
    if unknown:
        raise MedpretrainError(
            f"unknown parameter(s) {sorted(unknown)} for protocol '{protocol}'",
            f"allowed: {', '.join(sorted(defaults))}",
        )
    return {**defaults, **params}


def choose_on_validation(
    candidates: list[Any], fit_and_score: Callable[[Any], tuple[float, Any]]
) -> tuple[Any, Any, list[dict[str, Any]]]:
    """Try each candidate hyper-parameter, keep the best validation score (first one on ties).

    Returns (best candidate, its fitted model, the search trace). The test split never enters here.
    """
    best: tuple[float, Any, Any] | None = None
    trace = []
    for candidate in candidates:
        val_score, model = fit_and_score(candidate)
        trace.append({"value": candidate, "val_score": val_score})
        if best is None or (val_score > best[0]):
            best = (val_score, candidate, model)
    assert best is not None
    return best[1], best[2], trace
