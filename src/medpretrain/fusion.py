"""DVME, the dynamic visual meta-embedding: attention over several frozen embeddings of one image.

Each source (an initialisation's frozen backbone features) is projected to a common width and becomes one
token; a transformer encoder block runs self-attention across the *sources* (the tokens are sources, not image
patches), and an attention-pooling head turns the contextualised tokens into one softmax weight per source and
sample. The pooled embedding (the weighted sum of the projected sources) is projected once more and classified.

- Dynamic meta-embeddings (projection to a common space, softmax attention over sources, weighted sum, the
  weights readable per sample): Kiela, Wang & Cho, "Dynamic Meta-Embeddings for Improved Sentence
  Representations", EMNLP 2018. Their contextualised variant computes the weights from a BiLSTM over the
  tokens; here self-attention across sources gives the context (Vaswani et al., "Attention Is All You Need",
  NeurIPS 2017), as in the visual meta-embedding studies this toolkit reproduces.
- The weights mix the *projected* sources, not the contextualised tokens, so α_i is the share of source i in
  what the classifier sees: a source the task does not need (the `noise` init) can be, and is, switched off.

Training reuses the one training loop (`train.FinetuneModule` under `train.make_trainer`): the same step plan,
periodic validation, best-on-validation weights and early stop as fine-tuning, on feature tensors instead of
images (no augmentation). The test split is never seen before the weights are chosen.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from medpretrain.data.base import Task
from medpretrain.metrics import probabilities
from medpretrain.train.config import FinetuneConfig, StepPlan
from medpretrain.train.finetune import _batches, _labels_tensor, train_module
from medpretrain.train.module import FinetuneModule


class MetaEmbedding(nn.Module):
    """Per-source projections, self-attention across sources, and attention pooling to one embedding.

    Input: the sources' features side by side, shape (batch, Σ widths); `widths` says where each one ends.
    """

    def __init__(
        self,
        widths: list[int],
        *,
        width: int = 512,
        heads: int = 4,
        layers: int = 1,
        dropout: float = 0.1,
        input_dropout: float = 0.0,
    ):
        super().__init__()
        self.widths = list(widths)
        # Dropout on the frozen features themselves: the strongest guard against memorising a small labelled set
        # through thousands of input dimensions (measured: see DVME_DEFAULTS).
        self.project = nn.ModuleList(
            nn.Sequential(nn.Dropout(input_dropout), nn.Linear(w, width), nn.LayerNorm(width)) for w in widths
        )
        # A learned identity per source: without it self-attention could not tell the sources apart.
        self.source_embedding = nn.Parameter(torch.zeros(len(widths), width))
        nn.init.normal_(self.source_embedding, std=0.02)
        block = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=dropout, batch_first=True, norm_first=True
        )
        self.context = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.score = nn.Linear(width, 1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.widths, dim=1)
        return torch.stack([proj(p) for proj, p in zip(self.project, parts, strict=True)], dim=1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample softmax weight of each source, shape (batch, sources)."""
        tokens = self.tokens(x)
        return self._weights(tokens)

    def _weights(self, tokens: torch.Tensor) -> torch.Tensor:
        context = self.context(tokens + self.source_embedding)
        return torch.softmax(self.score(context).squeeze(-1), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(x)
        weights = self._weights(tokens)
        return (weights.unsqueeze(-1) * tokens).sum(dim=1)


class DVMENet(nn.Module):
    """MetaEmbedding (`backbone`, so the fine-tuning module's parameter groups apply) + projection + classifier
    (`head`)."""

    def __init__(
        self,
        widths: list[int],
        num_outputs: int,
        *,
        width: int,
        heads: int,
        layers: int,
        dropout: float,
        input_dropout: float = 0.0,
    ):
        super().__init__()
        self.backbone = MetaEmbedding(
            widths, width=width, heads=heads, layers=layers, dropout=dropout, input_dropout=input_dropout
        )
        self.head = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, num_outputs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _fit_one(
    net: DVMENet,
    x: dict[str, torch.Tensor],
    y: dict[str, torch.Tensor],
    task: Task,
    cfg: FinetuneConfig,
    *,
    lr: float,
    seed: int,
    progress: bool,
) -> FinetuneModule:
    plan = StepPlan.of(len(x["train"]), cfg)
    train = _batches((x["train"], y["train"]), plan.batch_size, shuffle=True, drop_last=plan.drop_last, seed=seed)
    evals = [
        _batches((x["val"], y["val"]), cfg.eval_batch_size, shuffle=False),
        _batches((x["train"], y["train"]), cfg.eval_batch_size, shuffle=False),
    ]
    module = FinetuneModule(
        net, task, cfg, lr=lr, backbone_lr_scale=1.0, plan=plan, recipe=None, class_weight=None, aug_seed=seed
    )  # type: ignore[arg-type]  # DVMENet has the backbone/head pair FinetuneModule reads
    return train_module(module, plan, cfg, train, evals, progress=progress)


def fit_dvme(
    features: list[dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    task: Task,
    num_outputs: int,
    cfg: FinetuneConfig,
    *,
    width: int = 512,
    heads: int = 4,
    layers: int = 1,
    dropout: float = 0.1,
    input_dropout: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train DVME on the labelled rows (`features[i]["train"]` are already the labelled subset) at every lr of
    `cfg.lr`; keep the run and step with the best validation AUC. Returns validation and test probabilities,
    the test attention weights (samples × sources), the chosen lr and step, the search and the history."""
    widths = [int(f["train"].shape[1]) for f in features]
    x = {s: torch.as_tensor(np.concatenate([f[s] for f in features], axis=1), dtype=torch.float32) for s in features[0]}
    y = {s: _labels_tensor(labels[s], task) for s in ("train", "val")}
    best: tuple[tuple[float, float], float, FinetuneModule] | None = None
    search = []
    for lr in cfg.lr:
        pl.seed_everything(seed, workers=True, verbose=False)
        net = DVMENet(
            widths, num_outputs, width=width, heads=heads, layers=layers, dropout=dropout, input_dropout=input_dropout
        )
        module = _fit_one(net, x, y, task, cfg, lr=lr, seed=seed, progress=progress)
        search.append({"lr": lr, "val_auc": module.best_score[0], "best_step": module.best_step,
                       "steps": int(module.global_step)})  # fmt: skip
        if best is None or module.best_score > best[0]:
            best = (module.best_score, lr, module)
    assert best is not None  # cfg.lr is never empty
    _, lr, module = best
    net = module.model.cpu()
    net.load_state_dict(module.best_state)  # type: ignore[arg-type]
    net.eval()
    with torch.inference_mode():
        val_proba = probabilities(net(x["val"]), task)
        test_proba = probabilities(net(x["test"]), task)
        attention = net.backbone.attention(x["test"]).numpy()
    return {
        "val_proba": val_proba,
        "test_proba": test_proba,
        "attention": attention,
        "lr": lr,
        "best_step": module.best_step,
        "steps": int(module.global_step),
        "search": search,
        "history": module.history,
        "best_val_auc": module.best_score[0] if math.isfinite(module.best_score[0]) else None,
    }


__all__ = ["DVMENet", "MetaEmbedding", "fit_dvme"]
