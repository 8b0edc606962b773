"""Mid-training resume of one fine-tuning run, so a killed cell loses at most a few minutes of training.

The study runner resumes at cell granularity (a stored row is never trained again), but one cell can be long:
the MedMNIST v2 recipe on pneumoniamnist is 100 epochs, about 3 h on 2 CPU cores without bf16 matrix units.
Each run of the lr grid therefore keeps, in the cell's private work folder,

- `lr-<lr>.ckpt`: a Lightning checkpoint written at the end of an epoch at most every `CHECKPOINT_EVERY_S` seconds
  (weights, optimiser, schedule, loop counters, the module's history and best weights, and the state of the
  sampler's and the augmentation's random generators, so the resumed run draws the batches and views the
  uninterrupted one would have);
- `lr-<lr>.done.pt`: the finished run's history, best weights and steps, so a grid interrupted at a later lr
  does not train the earlier ones again.

Lightning's own `ModelCheckpoint` saves on a step or epoch count, not on elapsed time at epoch ends, and does
not carry a DataLoader sampler's generator; hence this small callback.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from medpretrain.atomic import atomic_path

# The small-stem ResNet-18's checkpoint (weights, Adam moments, best weights) is about 180 MB; writing it every
# 2 min costs well under 1% of training time.
CHECKPOINT_EVERY_S = 120.0


def run_paths(work_dir: Path, lr: float) -> tuple[Path, Path]:
    """(mid-training checkpoint, finished-run file) of the run at `lr` in a cell's work folder."""
    stem = f"lr-{lr:.3g}"
    return work_dir / f"{stem}.ckpt", work_dir / f"{stem}.done.pt"


class EpochCheckpoint(pl.Callback):
    """Write a resumable checkpoint at the end of an epoch once `CHECKPOINT_EVERY_S` seconds have passed since
    the last.

    Epoch ends only: Lightning resumes a mid-epoch checkpoint by restarting the epoch's data from its start.
    `generator` is the training sampler's; its state travels in the checkpoint (callback state).
    """

    def __init__(self, path: Path, generator: torch.Generator | None) -> None:
        self.path, self.generator = Path(path), generator
        self.every_s = CHECKPOINT_EVERY_S
        self._last = time.monotonic()

    @property
    def state_key(self) -> str:
        return "EpochCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()} if self.generator is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.generator is not None and "generator" in state_dict:
            self.generator.set_state(state_dict["generator"])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.should_stop or time.monotonic() - self._last < self.every_s:
            return  # a stopped run is finished: its result is written as the done file instead
        with atomic_path(self.path, suffix=".ckpt") as tmp:
            trainer.save_checkpoint(tmp)
        self._last = time.monotonic()


def save_finished(state: dict[str, Any], path: Path) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def load_finished(path: Path) -> dict[str, Any] | None:
    """The finished run's state, or None when there is none (or it cannot be read: the run is trained again)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return None


__all__ = ["CHECKPOINT_EVERY_S", "EpochCheckpoint", "load_finished", "run_paths", "save_finished"]
