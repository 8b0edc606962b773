"""Momentum (EMA) encoders: the target/key/teacher networks of BYOL, MoCo and DINO.

BYOL (Grill et al., 2020), MoCo (He et al., 2020; v2: Chen et al., 2020) and DINO (Caron et al., 2021) each keep
a frozen copy of (part of) the online network and move it after every optimiser step by an exponential moving
average, ξ ← m·ξ + (1 − m)·θ, with the momentum m rising from a base value to 1 on a cosine schedule over
training (BYOL's and DINO's schedule; our MoCo v2 follows it too, see `MoCoConfig`). `MomentumMethod` is that shared
plumbing: the frozen copies, keeping them out of the optimiser, and the update; the EMA itself and the
schedule are lightly's (`update_momentum`, `cosine_schedule`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Protocol, cast

import torch
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from medpretrain.ssl.base import Method


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` for a momentum (key/target/teacher) encoder: `update_momentum` moves it, the
    optimiser never does."""
    twin = copy.deepcopy(module)
    deactivate_requires_grad(twin)
    return twin


def ema_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """The EMA momentum after `step` of `total_steps` optimiser steps: cosine from `start` to `end`.

    Clamped at the last step: Lightning may report one more step than it estimated, and the schedule must
    then hold at `end` rather than swing back.
    """
    return cosine_schedule(min(step, total_steps), total_steps, start, end)


class EMAConfig(Protocol):
    """The two fields a momentum method's config has (each method keeps its own paper default)."""

    ema_momentum: float
    ema_momentum_end: float


class MomentumMethod(Method):
    """A method with momentum copies of some of its modules, moved by EMA after every optimiser step.

    Subclasses list their (online, momentum copy) pairs in `momentum_modules` and give their config the fields
    `ema_momentum` (base momentum) and `ema_momentum_end`.
    """

    def momentum_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum copy) pairs."""
        raise NotImplementedError

    def momentum_parameter_ids(self) -> set[int]:
        """Ids of the momentum copies' parameters: they must never reach the optimiser."""
        return {id(p) for _, ema in self.momentum_modules() for p in ema.parameters()}

    def optimized_parameters(self) -> Iterable[nn.Parameter]:
        frozen = self.momentum_parameter_ids()
        return (p for p in self.parameters() if p.requires_grad and id(p) not in frozen)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        super().after_step(step, total_steps)
        cfg = cast(EMAConfig, self.config)
        m = ema_momentum(step, total_steps, cfg.ema_momentum, cfg.ema_momentum_end)
        for online, ema in self.momentum_modules():
            update_momentum(online, ema, m)


__all__ = ["MomentumMethod", "ema_momentum", "momentum_copy"]
