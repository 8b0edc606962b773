"""Pre-training throughput: our full pipeline vs the bare compute vs lightly's reference input pipeline.

For each method, on one dataset, with the same model, batch size, device and precision (`--precision`,
default: what the training loop picks on this machine):
- pipeline_ips: the real pre-training loop (Lightning, uint8 batches → on-device views → step → update);
- compute_only_ips: the same step on views made once beforehand (no input pipeline at all);
- lightly_reference_ips: lightly's documented pipeline — its PIL transform in a torch DataLoader (best of
  0 and `--workers` worker processes) — feeding the same step.

Prints one JSON line per method. Usage:
    python bench/pretrain_throughput.py --dataset bloodmnist --methods simclr spark --steps 20
    python bench/pretrain_throughput.py --dataset bloodmnist --methods spark --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

import medpretrain.ssl  # noqa: F401  (registers the methods)
from medpretrain.data import load_dataset
from medpretrain.inits import build_model
from medpretrain.pretrain import PretrainModule
from medpretrain.ssl import get_method, method_config
from medpretrain.ssl.base import TrainingClock
from medpretrain.train import make_trainer, quiet_lightning, resolve_precision

# SparK needs a feature grid larger than 1×1: at 28 px that is the ResNet small stem.
SMALL_STEM = {"spark": True}


class _Timer(pl.Callback):
    """Images/s over the batches after `warmup` (the first steps pay for allocation and autotuning)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.start = warmup, 0, 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            self.images += batch[0].shape[0]

    @property
    def ips(self) -> float:
        return self.images / (time.perf_counter() - self.start)


def build(method: str, image_size: int, channels: int, batch_size: int) -> Any:
    backbone, _ = build_model("resnet18", "scratch", small_stem=SMALL_STEM.get(method, False), img_size=image_size)
    cfg = method_config(method, {"batch_size": batch_size})
    return get_method(method)(backbone, cfg, channels=channels, image_size=image_size), cfg


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pipeline_ips(
    method: str, images: torch.Tensor, batch_size: int, steps: int, warmup: int, tmp: str, precision: str
) -> float:
    model, _ = build(method, images.shape[-1], images.shape[1], batch_size)
    module = PretrainModule(model, seed=0, log_path=Path(tmp) / "log.json", resume_path=Path(tmp) / "resume.ckpt")
    loader = DataLoader(TensorDataset(images), batch_size=batch_size, shuffle=True, drop_last=True)
    timer = _Timer(warmup)
    trainer = make_trainer(
        max_epochs=1, progress=False, callbacks=[timer], limit_train_batches=warmup + steps, precision=precision
    )
    with quiet_lightning():
        trainer.fit(module, loader)
    return timer.ips


def _train_steps(model: Any, batches: Any, steps: int, warmup: int, batch_size: int, precision: str) -> float:
    """The training step Lightning runs, by hand, on the same device and under the same autocast."""
    dev = device()
    model.to(dev)
    model.start(TrainingClock(total_steps=10_000, steps_per_epoch=100))  # what the real loop hands over first
    opt = model.configure_optimizers(total_steps=10_000, steps_per_epoch=100)["optimizer"]
    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "16-mixed")
    model.train()
    start, done = 0.0, 0
    for i, views in enumerate(batches):
        if i == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        views = [v.to(dev, non_blocking=True) for v in views]
        with torch.autocast(dev.type, dtype=half or torch.float32, enabled=half is not None):
            out = model.step(views)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        model.after_step(i, 10_000)
        if i >= warmup:
            done += 1
        if done == steps:
            break
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def compute_only_ips(
    method: str, images: torch.Tensor, batch_size: int, steps: int, warmup: int, precision: str
) -> float:
    model, _ = build(method, images.shape[-1], images.shape[1], batch_size)
    views = [v.to(device()) for v in model.views(images[:batch_size], torch.Generator().manual_seed(0))]
    return _train_steps(model, (views for _ in range(warmup + steps)), steps, warmup, batch_size, precision)


class _PILDataset(Dataset):
    def __init__(self, images: torch.Tensor, transform: Any) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        array = self.images[i].permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB"))


def lightly_transform(method: str, image_size: int) -> Any:
    from lightly.transforms import MAETransform, SimCLRTransform

    if method == "spark":  # SparK's single mildly augmented view; lightly's MAE transform is the analogue
        return MAETransform(input_size=image_size)
    return SimCLRTransform(input_size=image_size, gaussian_blur=0.5)


def lightly_reference_ips(
    method: str, images: torch.Tensor, batch_size: int, steps: int, warmup: int, workers: int, precision: str
) -> float:
    best = 0.0
    for n_workers in sorted({0, workers}):
        model, _ = build(method, images.shape[-1], images.shape[1], batch_size)
        dataset = _PILDataset(images, lightly_transform(method, images.shape[-1]))
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=n_workers,
            persistent_workers=n_workers > 0, pin_memory=torch.cuda.is_available(),
        )  # fmt: skip
        batches = (views if isinstance(views, list) else [views] for views in loader)
        best = max(best, _train_steps(model, batches, steps, warmup, batch_size, precision))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="bloodmnist")
    parser.add_argument("--methods", nargs="+", default=["simclr", "spark"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="auto", help="auto, 32-true, bf16-mixed or 16-mixed")
    args = parser.parse_args()
    precision = resolve_precision(args.precision)
    images = load_dataset(args.dataset).images["train"]
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            pipe = pipeline_ips(method, images, args.batch_size, args.steps, args.warmup, tmp, precision)
        compute = compute_only_ips(method, images, args.batch_size, args.steps, args.warmup, precision)
        reference = lightly_reference_ips(
            method, images, args.batch_size, args.steps, args.warmup, args.workers, precision
        )
        record = {
            "method": method,
            "pipeline_ips": round(pipe, 1),
            "compute_only_ips": round(compute, 1),
            "lightly_reference_ips": round(reference, 1),
            "pipeline_vs_compute": round(pipe / compute, 3),
            "pipeline_vs_lightly": round(pipe / reference, 3),
            "device": device().type,
            "precision": precision,
            "threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "small_stem": SMALL_STEM.get(method, False),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
