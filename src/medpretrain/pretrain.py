"""Self-supervised pre-training: the one Lightning loop every method runs in.

A pre-training is content-addressed: the hash of (unlabeled data, sizes, method, its full
hyper-parameters, backbone, stem, starting init, epochs, seed) names its files, so the same request
reuses the finished checkpoint. Files under `<out>/`:

- `<name>.pt`          the result: backbone weights in timm's key layout plus method, config, history;
- `<name>.log.json`    one record per epoch (loss, lr, images/s, std of normalised embeddings);
- `<name>.resume.ckpt` Lightning's full state after the last finished epoch (removed on success).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightly.utils.debug import std_of_l2_normalized
from torch.utils.data import DataLoader, TensorDataset

from medpretrain.atomic import write_text, write_with
from medpretrain.backbones import DEFAULT_INPUT_NORM, check_input_norm
from medpretrain.data import load_dataset, load_unlabeled
from medpretrain.data.base import DEFAULT_HFLIP
from medpretrain.errors import MedpretrainError
from medpretrain.inits import build_model, check_pretraining_start, checkpoint_meta, parse_init, save_checkpoint
from medpretrain.runtime import stable_hash, training_device
from medpretrain.ssl import Method, get_method, method_config
from medpretrain.ssl.base import TrainingClock
from medpretrain.train import make_trainer, quiet_lightning, resolve_precision


@dataclass
class PretrainRequest:
    """What to pre-train. `dataset` is the unlabeled source: a MedMNIST flag or an image folder."""

    dataset: str
    method: str
    backbone: str = "resnet18"
    epochs: int = 50
    init: str = "scratch"
    size: int = 28
    image_size: int | None = None
    small_stem: bool = False
    seed: int = 0
    hparams: dict[str, Any] = field(default_factory=dict)
    precision: str = "auto"
    hflip: float | None = None  # flip probability of the views; None: the source's (0 if classes mark left/right)
    input_norm: str = DEFAULT_INPUT_NORM  # how the network normalises its input (backbones.INPUT_NORMS)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise MedpretrainError(f"epochs must be at least 1, got {self.epochs}", "use e.g. --epochs 50")
        if self.hflip is not None and not 0 <= self.hflip <= 1:
            raise MedpretrainError(f"hflip {self.hflip} is not a probability", "use a value in [0, 1], e.g. 0")
        resolve_precision(self.precision)
        check_input_norm(self.input_norm)

    @cached_property
    def config(self) -> dict[str, Any]:
        """The method's full hyper-parameters (defaults + overrides): part of the identity."""
        return method_config(self.method, self.hparams).model_dump()

    def identity(self, dataset_key: str) -> dict[str, Any]:
        ident = asdict(self)
        ident.pop("hparams")
        if self.precision == "auto":
            # The machine's default (fp32 on CPU, mixed on GPU) is not a choice of the user's, and leaving it
            # out keeps the names of checkpoints made before precision could be chosen.
            ident.pop("precision")
        if self.hflip is None or self.hflip == DEFAULT_HFLIP:
            ident.pop("hflip")  # the views every checkpoint made before flips could be chosen: names are kept
        if self.input_norm == DEFAULT_INPUT_NORM:
            ident.pop("input_norm")  # likewise for checkpoints made before input_norm could be chosen
        ident.update(dataset=dataset_key, config=self.config, init=parse_init(self.init).key)
        return ident

    def name(self, dataset_name: str, dataset_key: str) -> str:
        dataset_name = re.sub(r"[^\w.-]+", "_", dataset_name).strip("_")  # subset specs carry [ , = ]
        return f"{self.method}-{self.backbone}-{dataset_name}-px{self.image_size}-e{self.epochs}-" + stable_hash(
            self.identity(dataset_key), length=12
        )


class NonFiniteLoss(RuntimeError):
    pass


class PretrainModule(pl.LightningModule):
    """Wraps a Method for Lightning: views on the device, loss, momentum updates, per-epoch log."""

    def __init__(self, method: Method, *, seed: int, log_path: Path, resume_path: Path) -> None:
        super().__init__()
        self.method = method
        self.seed = seed
        self.log_path = log_path
        self.resume_path = resume_path
        self.history: list[dict[str, Any]] = []
        self._epoch: dict[str, float] = {}

    def configure_optimizers(self) -> Any:
        # The first hook at which the run's length is known: num_training_batches is still unknown (inf) here,
        # Lightning's estimate is the one that is ready. It runs on every fit, so a resumed run is handed it too.
        total = max(1, int(self.trainer.estimated_stepping_batches))
        clock = TrainingClock(total_steps=total, steps_per_epoch=max(1, total // self.trainer.max_epochs))
        self.method.start(clock)
        return self.method.configure_optimizers(clock.total_steps, clock.steps_per_epoch)

    def on_train_epoch_start(self) -> None:
        self._epoch = {"loss": 0.0, "images": 0.0, "batches": 0.0, "std": 0.0, "started": time.perf_counter()}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (images,) = batch
        # One generator per step, derived from the seed and the step: a resumed run draws the same views.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
        out = self.method.step(self.method.views(images, generator))
        if not torch.isfinite(out.loss):
            raise NonFiniteLoss(f"epoch {self.current_epoch + 1}, step {self.global_step}")
        n = images.shape[0]
        seconds = time.perf_counter() - self._epoch["started"]
        self._epoch["loss"] += out.loss.item() * n
        self._epoch["images"] += n
        self._epoch["batches"] += 1
        self._epoch["std"] += std_of_l2_normalized(out.embedding.detach().float()).item()
        self.log("loss", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("img/s", self._epoch["images"] / max(seconds, 1e-9), prog_bar=True, on_step=True, on_epoch=False)
        return out.loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step already counts this step: methods receive the number of steps completed.
        self.method.after_step(self.global_step, self.method.clock.total_steps)

    def on_train_epoch_end(self) -> None:
        e = self._epoch
        seconds = time.perf_counter() - e["started"]
        self.history.append(
            {
                "epoch": self.current_epoch + 1,
                "loss": e["loss"] / max(e["images"], 1),
                "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
                "images_per_s": e["images"] / max(seconds, 1e-9),
                "embedding_std": e["std"] / max(e["batches"], 1),
                "seconds": seconds,
            }
        )
        if self.trainer.is_global_zero:
            write_text(self.log_path, json.dumps(self.history, indent=1))
        # Saved here, after the history is updated, so the file always holds every finished epoch.
        _atomic_trainer_save(self.trainer, self.resume_path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medpretrain_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("medpretrain_history", []))


def _atomic_trainer_save(trainer: pl.Trainer, path: Path) -> None:
    """Lightning writes in place; a kill during the write would corrupt the only resume point."""
    if trainer.is_global_zero:
        write_with(path, trainer.save_checkpoint)
    else:
        # Collective under DDP: every rank takes part but only rank 0 writes. The other ranks must not make a
        # temporary file of their own: it would stay empty and be renamed over the checkpoint.
        trainer.save_checkpoint(path)


def _finished_epochs(path: Path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return int(state.get("epoch", 0)) + 1


def source_hflip(spec: str, size: int, split_dir: Path | None = None, image_size: int | None = None) -> float:
    """The flip probability for images of `spec`: the dataset's own (0 where class names mark left/right), or the
    default for a folder of unlabelled images, which has no class names to tell. Loaded as `load_unlabeled`
    loads it, so the memoised data set is reused rather than read again."""
    try:
        return load_dataset(spec, size=size, image_size=image_size, split_dir=split_dir).default_hflip
    except MedpretrainError:
        return DEFAULT_HFLIP


def target_hflip(override: float | None, target: str, size: int, split_dir: Path | None = None) -> float | None:
    """The flip probability to pre-train with for evaluation on `target`: `override` when given; else 0 when the
    target's classes mark left/right (flipped pre-training would teach invariance to the side those classes
    differ by, whatever the source); else None, the pre-training source's own policy."""
    if override is not None:
        return override
    return 0.0 if source_hflip(target, size, split_dir) == 0 else None


def pretrain(
    request: PretrainRequest,
    out_dir: str | Path,
    *,
    resume: bool = False,
    restart: bool = False,
    progress: bool = True,
    log: Any = print,
) -> Path:
    """Pre-train (or reuse) and return the path of the finished checkpoint."""
    out_dir = Path(out_dir)
    method_cls = get_method(request.method)
    init = parse_init(request.init)
    check_pretraining_start(init)  # before any data is read
    if request.image_size is None:
        request.image_size = (
            int(checkpoint_meta(init.path).get("image_size", request.size)) if init.path else request.size
        )
    # Training images only and no labels: pre-training is self-supervised and never sees val/test images.
    data_name, data_key, images = load_unlabeled(
        request.dataset, size=request.size, image_size=request.image_size, split_dir=out_dir / "splits"
    )
    if request.hflip is None:
        request.hflip = source_hflip(request.dataset, request.size, out_dir / "splits", request.image_size)
    config = method_config(request.method, request.hparams)
    if len(images) < config.batch_size:
        raise MedpretrainError(
            f"{data_name} has {len(images)} training images, fewer than one batch of {config.batch_size}",
            f"use --batch-size {max(2, len(images) // 2)} or more data",
        )
    name = request.name(data_name, data_key)
    out_dir.mkdir(parents=True, exist_ok=True)
    final, log_path, resume_path = out_dir / f"{name}.pt", out_dir / f"{name}.log.json", out_dir / f"{name}.resume.ckpt"
    if final.exists():
        log(f"reusing finished pre-training {final}")
        return final

    ckpt_path = None
    if resume_path.exists():
        if restart:
            resume_path.unlink()
        elif resume:
            ckpt_path = str(resume_path)
            log(f"resumed from epoch {_finished_epochs(resume_path)}")
        else:
            raise MedpretrainError(
                f"an interrupted run of this exact pre-training exists"
                f" ({resume_path}, {_finished_epochs(resume_path)} epochs done)",
                "add --resume to continue it or --restart to discard it",
            )

    backbone, report = build_model(
        request.backbone,
        init,
        small_stem=request.small_stem,
        seed=request.seed,
        img_size=request.image_size,
        input_norm=request.input_norm,
    )
    if init.kind != "scratch":
        log(f"starting from {report.summary()}")
    if backbone.family not in method_cls.backbone_families:
        raise MedpretrainError(
            f"method {request.method} does not work with backbone {request.backbone}",
            f"use a backbone of family {', '.join(method_cls.backbone_families)}",
        )
    method = method_cls(backbone, config, channels=int(images.shape[1]), image_size=request.image_size)
    method.set_hflip(request.hflip)
    module = PretrainModule(method, seed=request.seed, log_path=log_path, resume_path=resume_path)
    pl.seed_everything(request.seed, workers=True, verbose=False)
    loader = DataLoader(
        TensorDataset(images),
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,  # memory queues and batch statistics assume full batches
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(request.seed),
    )
    trainer = make_trainer(max_epochs=request.epochs, progress=progress, precision=request.precision)
    try:
        with quiet_lightning():
            trainer.fit(module, loader, ckpt_path=ckpt_path)
    except NonFiniteLoss as err:
        kept = f"the last good state is kept in {resume_path}" if resume_path.exists() else "no epoch had finished"
        raise MedpretrainError(
            f"pre-training stopped: the loss became NaN/inf at {err}; {kept}",
            "lower the learning rate (--lr) or the batch size, then re-run with --resume",
        ) from None
    if trainer.is_global_zero:
        # Outside Lightning: its hooks do not run when a resumed run had already finished its last epoch.
        method.finalize(images, training_device())
        backbone.cpu()
        identity = request.identity(data_key)
        write_with(
            final,
            partial(
                save_checkpoint,
                backbone=backbone,
                image_size=request.image_size,
                method=request.method,
                config=identity,
                history=module.history,
            ),
        )
        resume_path.unlink(missing_ok=True)
    last = module.history[-1] if module.history else {}
    if last and not math.isfinite(last.get("loss", 0.0)):
        raise MedpretrainError("pre-training ended with a non-finite loss", "lower --lr and re-run with --restart")
    return final
