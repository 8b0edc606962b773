"""The supervised network (backbone + linear head), its inference, and its on-disk format.

Fine-tuned networks are kept (atomically) for the report's Grad-CAM panels; `load_classifier` reads them
back on the CPU with no training code involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from medpretrain.atomic import write_with
from medpretrain.augment import to_float
from medpretrain.backbones import DEFAULT_INPUT_NORM, Backbone, create_backbone
from medpretrain.data.base import Task
from medpretrain.errors import MedpretrainError


class Classifier(nn.Module):
    """Backbone + linear head; outputs one logit per class (per label for multi-label)."""

    def __init__(self, backbone: Backbone, num_outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


CLASSIFIER_FORMAT = "medpretrain-classifier/1"


def save_classifier(path: str | Path, model: Classifier, *, image_size: int, task: Task, classes: list[str]) -> Path:
    """Keep a fine-tuned network (for the report's Grad-CAM panels); written atomically."""
    payload = {
        "format": CLASSIFIER_FORMAT,
        "backbone_name": model.backbone.name,
        "small_stem": model.backbone.small_stem,
        "input_norm": model.backbone.input_norm,
        "image_size": int(image_size),
        "task": Task(task).value,
        "classes": list(classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return write_with(path, lambda tmp: torch.save(payload, tmp))


def load_classifier(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """A network written by `save_classifier`, in eval mode on the CPU, and its metadata."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CLASSIFIER_FORMAT:
        raise MedpretrainError(f"{path} is not a medpretrain fine-tuned model", "re-run the study to write it")
    backbone = create_backbone(
        payload["backbone_name"],
        small_stem=payload["small_stem"],
        img_size=payload["image_size"],
        input_norm=payload.get("input_norm", DEFAULT_INPUT_NORM),  # models saved before input_norm: ImageNet's
    )
    model = Classifier(backbone, len(payload["classes"]))
    model.load_state_dict(payload["state_dict"])
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.eval(), meta


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Logits of `model` (eval mode) over uint8 images, batched, on the model's device; CPU float out."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model(to_float(images[i : i + batch_size].to(device))).float().cpu() for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


__all__ = ["CLASSIFIER_FORMAT", "Classifier", "load_classifier", "predict_logits", "save_classifier"]
