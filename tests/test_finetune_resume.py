"""A fine-tuning run killed mid-training resumes from its checkpoint and ends where an uninterrupted run ends
(real PneumoniaMNIST subset, a two-lr grid interrupted in the second lr)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medpretrain.backbones import create_backbone
from medpretrain.data import load_dataset
from medpretrain.data.base import Dataset
from medpretrain.train import FinetuneConfig, finetune
from medpretrain.train import resume as resume_module
from medpretrain.train.finetune import FinetuneResult
from medpretrain.train.module import FinetuneModule

CFG = FinetuneConfig(epochs=3, min_steps=0, batch_size=8, evals=3, patience=0, lr=[1e-3, 1e-4], warmup_epochs=0)


def _subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    y = labels.reshape(-1)
    return np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)]))


def _run(ds: Dataset, idx: np.ndarray, work_dir: Path | None) -> FinetuneResult:
    torch.manual_seed(0)
    return finetune(create_backbone("resnet18"), ds, idx, CFG, seed=0, progress=False, work_dir=work_dir)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_dataset("pneumoniamnist")
    idx = _subset(ds.labels["train"], 20)  # 40 images, batch 8: 5 steps per epoch, 15 steps per lr
    reference = _run(ds, idx, None)

    monkeypatch.setattr(resume_module, "CHECKPOINT_EVERY_S", 0.0)  # a checkpoint at every epoch end
    original = FinetuneModule.training_step

    def killed_at_step_12_of_lr_1e4(self: FinetuneModule, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.lr == 1e-4 and self.global_step == 12:
            raise RuntimeError("killed")
        return original(self, batch, batch_idx)

    work = tmp_path / "cell"
    monkeypatch.setattr(FinetuneModule, "training_step", killed_at_step_12_of_lr_1e4)
    with pytest.raises(RuntimeError, match="killed"):
        _run(ds, idx, work)
    # The finished lr is kept whole, the unfinished one at its last epoch end (step 10).
    assert sorted(p.name for p in work.iterdir()) == ["lr-0.0001.ckpt", "lr-0.001.done.pt"]
    assert torch.load(work / "lr-0.0001.ckpt", weights_only=False)["global_step"] == 10

    monkeypatch.setattr(FinetuneModule, "training_step", original)
    trained_from: list[int] = []

    def counting(self: FinetuneModule, batch: Any, batch_idx: int) -> torch.Tensor:
        trained_from.append(int(self.global_step))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(FinetuneModule, "training_step", counting)
    resumed = _run(ds, idx, work)
    assert trained_from == [10, 11, 12, 13, 14]  # only the rest of lr 1e-4 was trained
    assert not work.exists()  # the work folder is removed once the prediction is made

    assert resumed.steps == reference.steps == 15
    assert [(s["lr"], s["steps"], s["best_step"]) for s in resumed.search] == [
        (s["lr"], s["steps"], s["best_step"]) for s in reference.search
    ]
    for got, want in zip(resumed.history, reference.history, strict=True):
        assert got["step"] == want["step"]
        assert got["val_auc"] == pytest.approx(want["val_auc"], abs=1e-6)
        assert got["train_loss_aug"] == pytest.approx(want["train_loss_aug"], rel=1e-4)
    np.testing.assert_allclose(resumed.test_proba, reference.test_proba, atol=1e-5)
