"""Learning-rate schedules and optimiser parameter groups shared by fine-tuning and pre-training."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import nn


def warmup_cosine(total_steps: int, warmup_steps: int) -> Any:
    """LR multiplier per optimiser step: linear warm-up to 1, then cosine decay to 0 at `total_steps`."""
    total_steps = max(total_steps, 1)
    warmup_steps = min(max(warmup_steps, 0), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def multistep(total_steps: int, milestones: tuple[float, ...], gamma: float) -> Any:
    """LR multiplier per optimiser step: `gamma`^k after the k-th milestone (fractions of `total_steps`).

    The MedMNIST v2 baselines' schedule (×0.1 at epochs 50 and 75 of 100) is `milestones=(0.5, 0.75)`.
    """
    cuts = [round(m * total_steps) for m in milestones]

    def factor(step: int) -> float:
        return gamma ** sum(step >= c for c in cuts)

    return factor


def param_groups(params: nn.Module | Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Optimiser groups: no decay on biases and normalisation parameters (1-d tensors), as is standard.

    `params` is a module (all its trainable parameters) or the parameters themselves (a method's minus its
    momentum copies)."""
    decay, no_decay = [], []
    for p in params.parameters() if isinstance(params, nn.Module) else params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = ["multistep", "param_groups", "warmup_cosine"]
