"""The one PyTorch-Lightning Trainer: every device, precision, DDP, progress and checkpoint decision.

Supervised fine-tuning (`medpretrain.train.finetune`) and self-supervised pre-training
(`medpretrain.pretrain`) both build their Trainer here, so both run the same way.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from medpretrain.errors import MedpretrainError
from medpretrain.runtime import training_device

# Loggers whose INFO lines ("GPU available: False", "`Trainer.fit` stopped", "Seed set to") are noise
# for a toolkit that reports its own progress.
_NOISY_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info logs and advisory warnings for the duration; errors still surface."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # "does not have many workers", "LitLogger"/tensorboard hints and similar advice: we use
            # in-memory tensors, where worker processes would only add overhead.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*num_workers.*")
            warnings.filterwarnings("ignore", message=".*litlogger.*", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*tensorboardX.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning vs newer torch, harmless
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


def default_precision() -> str:
    """Mixed precision on CUDA (bf16 where the GPU supports it), full fp32 elsewhere."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def resolve_precision(precision: str = "auto") -> str:
    """The Lightning precision for a user's choice; "auto" is `default_precision()`.

    fp32 stays the CPU default because bf16 pays only where convolutions dominate: on CPUs with bf16
    matrix units (AMX), a SparK step on the small-stem ResNet-18 at 28 px ran 2.8× faster in bf16-mixed,
    but a SimCLR step on the standard stem at 28 px (tiny maps, casts dominate) ran 7% slower (BENCHMARKS.md).
    """
    if precision not in PRECISIONS:
        raise MedpretrainError(f"unknown precision '{precision}'", f"choose one of: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return default_precision()
    if precision == "16-mixed" and not torch.cuda.is_available():
        raise MedpretrainError("16-mixed (float16) precision needs a CUDA GPU", "use bf16-mixed or 32-true on CPU")
    return precision


def make_trainer(
    *,
    max_epochs: int,
    max_time: float | None = None,
    devices: int | str = "auto",
    precision: str | None = None,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    callbacks: Sequence[pl.Callback] = (),
    gradient_clip_val: float | None = None,
    num_sanity_val_steps: int = 0,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """A Trainer configured the one way this toolkit trains.

    `devices="auto"` takes every visible GPU (DDP when more than one) or the CPU; `max_time` is in
    seconds. Checkpoints (last + every epoch's latest) are written only when `checkpoint_dir` is
    given; there is no Lightning logger — callers record their own history.
    """
    cuda = training_device().type == "cuda"
    n_gpus = torch.cuda.device_count() if cuda else 0
    if devices == "auto":
        devices = max(n_gpus, 1)
    multi = cuda and isinstance(devices, int) and devices > 1
    cbs = list(callbacks)
    if checkpoint_dir is not None:
        cbs.append(pl.callbacks.ModelCheckpoint(dirpath=Path(checkpoint_dir), save_last=True, save_top_k=0))
    with quiet_lightning():
        return pl.Trainer(
            accelerator="gpu" if cuda else "cpu",
            devices=devices,
            strategy="ddp" if multi else "auto",
            precision=resolve_precision(precision or "auto"),  # type: ignore[arg-type]
            max_epochs=max_epochs,
            max_time=timedelta(seconds=max_time) if max_time else None,
            logger=False,
            enable_checkpointing=checkpoint_dir is not None,
            default_root_dir=str(checkpoint_dir) if checkpoint_dir is not None else None,
            enable_progress_bar=progress,
            enable_model_summary=False,
            num_sanity_val_steps=num_sanity_val_steps,
            gradient_clip_val=gradient_clip_val,
            benchmark=cuda,
            callbacks=cbs,
            **trainer_kwargs,
        )


__all__ = ["PRECISIONS", "default_precision", "make_trainer", "quiet_lightning", "resolve_precision"]
