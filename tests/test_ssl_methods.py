"""Self-supervised methods (SimCLR, MoCo v2, BYOL, SimSiam, SwAV, DINO, Barlow Twins, VICReg) on real MedMNIST.

Each method runs two optimisation steps the way the training loop drives it (views → step → backward →
optimiser → after_step) with its own optimiser and learning rate, on 32 real images and a ResNet-18 at 28 px.
The runs are cached per module so the other tests inspect them instead of training again (CPU budget).
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import torch
from torch import nn

from medpretrain.backbones import create_backbone
from medpretrain.errors import MedpretrainError
from medpretrain.ssl.base import METHODS, Method, TrainingClock, get_method, method_config

NAMES = ("simclr", "moco", "byol", "simsiam", "swav", "dino", "barlow_twins", "vicreg")
for _name in NAMES:  # registration happens on import; the package __init__ may not import them all yet
    importlib.import_module(f"medpretrain.ssl.{_name}")

N = 32
SIZE = 28
LOCAL = 12  # 0.43 × 28 px, floored at 12 px
TOTAL_STEPS = 100
STEPS_PER_EPOCH = 1  # so the one-epoch freezes (DINO last layer, SwAV prototypes) end after the first step
# Fewer local crops than the default 4 keep the CPU budget; a queue as long as one batch is full after the first
# step, so SwAV's second step already uses it.
TRAIN_OVERRIDES: dict[str, dict[str, Any]] = {
    "dino": {"n_local_crops": 2},
    "swav": {"n_local_crops": 2, "queue_length": N, "queue_start_epochs": 0},
}
MOMENTUM = {  # (online, momentum copy) attribute pairs
    "moco": (("backbone", "key_backbone"), ("projection_head", "key_head")),
    "byol": (("backbone", "target_backbone"), ("projection_head", "target_head")),
    "dino": (("backbone", "teacher_backbone"), ("student_head", "teacher_head")),
}
OPTIMIZER = {"moco": "sgd", "simsiam": "sgd", "dino": "adamw"}  # every other method: LARS


def _images(root: Path, flag: str) -> torch.Tensor:
    images = np.load(root / f"{flag}.npz")["train_images"][:N]
    x = torch.from_numpy(images)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _build(name: str, channels: int, **overrides: Any) -> Method:
    torch.manual_seed(0)
    cfg = method_config(name, {"batch_size": N, **overrides})
    method = get_method(name)(create_backbone("resnet18"), cfg, channels=channels, image_size=SIZE)
    return method.train()


def _snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: nn.Module) -> bool:
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, module.parameters(), strict=True))


@dataclass
class Run:
    method: Method
    optimizer: torch.optim.Optimizer
    backbone_before: list[torch.Tensor]
    views: list[list[torch.Tensor]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    embeddings: list[torch.Tensor] = field(default_factory=list)
    criterion_calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    has_grad: list[dict[str, bool]] = field(default_factory=list)  # per step: parameter name → got a gradient
    backbone_grads_nonzero: list[bool] = field(default_factory=list)
    teacher_moved_by_optimizer: list[bool] = field(default_factory=list)
    teacher_moved_by_after_step: list[bool] = field(default_factory=list)


def _train(method: Method, batch: torch.Tensor, steps: int = 2) -> Run:
    """Drive `method` exactly as the training loop does, recording what the tests check."""
    method.start(TrainingClock(TOTAL_STEPS, STEPS_PER_EPOCH))
    opt_cfg = method.configure_optimizers(TOTAL_STEPS, STEPS_PER_EPOCH)
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    run = Run(method, optimizer, _snapshot(method.backbone))
    forward = method.criterion.forward

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        run.criterion_calls.append((args, kwargs))
        return forward(*args, **kwargs)

    method.criterion.forward = spy  # type: ignore[method-assign]
    teachers = [getattr(method, attr) for _, attr in MOMENTUM.get(method.name, ())]
    generator = torch.Generator().manual_seed(0)
    for i in range(steps):
        views = method.views(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        out = method.step(views)
        assert out.loss.ndim == 0
        out.loss.backward()
        run.views.append(views)
        run.losses.append(float(out.loss.detach()))
        run.embeddings.append(out.embedding)
        run.has_grad.append({n: p.grad is not None for n, p in method.named_parameters()})
        run.backbone_grads_nonzero.append(
            all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in method.backbone.parameters())
        )
        before = [_snapshot(t) for t in teachers]
        optimizer.step()
        scheduler.step()
        run.teacher_moved_by_optimizer.append(any(_changed(b, t) for b, t in zip(before, teachers, strict=True)))
        before = [_snapshot(t) for t in teachers]
        method.after_step(i + 1, TOTAL_STEPS)
        run.teacher_moved_by_after_step.append(all(_changed(b, t) for b, t in zip(before, teachers, strict=True)))
    return run


@pytest.fixture(scope="module")
def images(data_root: Path) -> dict[str, torch.Tensor]:
    return {flag: _images(data_root, flag) for flag in ("bloodmnist", "pneumoniamnist")}


@pytest.fixture(scope="module")
def runs(images: dict[str, torch.Tensor]) -> Callable[..., Run]:
    cache: dict[tuple[str, str], Run] = {}

    def get(name: str, flag: str = "bloodmnist") -> Run:
        if (name, flag) not in cache:
            batch = images[flag]
            cache[name, flag] = _train(_build(name, batch.shape[1], **TRAIN_OVERRIDES.get(name, {})), batch)
        return cache[name, flag]

    return get


CASES = [(name, "bloodmnist") for name in NAMES] + [("simclr", "pneumoniamnist"), ("dino", "pneumoniamnist")]


@pytest.mark.parametrize(("name", "flag"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_two_optimisation_steps(name: str, flag: str, images: dict[str, torch.Tensor], runs: Any) -> None:
    batch = images[flag]
    channels = batch.shape[1]
    assert batch.dtype == torch.uint8 and batch.shape == (N, channels, SIZE, SIZE)
    run = runs(name, flag)
    method = run.method
    assert method.config.optimizer == OPTIMIZER.get(name, "lars")

    n_local = TRAIN_OVERRIDES.get(name, {}).get("n_local_crops", 0)
    sides = [SIZE, SIZE] + [LOCAL] * n_local
    for views in run.views:
        assert [tuple(v.shape) for v in views] == [(N, channels, s, s) for s in sides]
        for v in views:
            assert v.dtype == torch.float32 and float(v.min()) >= 0.0 and float(v.max()) <= 1.0
        assert not torch.equal(views[0], views[1])  # two different random views
    assert all(math.isfinite(loss) for loss in run.losses), run.losses
    for emb in run.embeddings:
        assert emb.shape == (N, method.backbone.num_features) and bool(torch.isfinite(emb).all())

    # Every backbone parameter is optimised, receives a non-zero gradient at every step, and the weights move.
    optimised = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in method.backbone.parameters()} <= optimised
    assert all(run.backbone_grads_nonzero)
    assert _changed(run.backbone_before, method.backbone)

    teachers = [getattr(method, attr) for _, attr in MOMENTUM.get(name, ())]
    for teacher in teachers:
        params = list(teacher.parameters())
        assert params and not any(p.requires_grad for p in params)
        assert not {id(p) for p in params} & optimised
    if teachers:
        assert not any(run.teacher_moved_by_optimizer)
        assert all(run.teacher_moved_by_after_step)


def test_default_multicrop_views(images: dict[str, torch.Tensor]) -> None:
    from medpretrain.ssl.dino import local_crop_size

    assert [local_crop_size(s) for s in (28, 64, 128, 224)] == [12, 27, 55, 96]
    for name in ("dino", "swav"):
        method = _build(name, 3)  # the views follow the batch's channels
        for batch in images.values():
            views = method.views(batch, torch.Generator().manual_seed(0))
            c = batch.shape[1]
            assert [tuple(v.shape) for v in views] == [(N, c, SIZE, SIZE)] * 2 + [(N, c, LOCAL, LOCAL)] * 4


def test_momentum_encoders_start_as_copies() -> None:
    for name, pairs in MOMENTUM.items():
        method = _build(name, 3)
        for online_attr, teacher_attr in pairs:
            online = getattr(method, online_attr).state_dict()
            teacher = getattr(method, teacher_attr).state_dict()
            assert online.keys() == teacher.keys()
            assert all(torch.equal(online[k], teacher[k]) for k in online), (name, teacher_attr)


def test_one_epoch_freezes_release_after_the_first_epoch(runs: Any) -> None:
    # DINO's last layer and SwAV's prototypes get no gradient in epoch 0 (one step here), then train.
    direction = "student_head.last_layer.parametrizations.weight.original1"
    dino = runs("dino")
    assert [g[direction] for g in dino.has_grad] == [False, True]
    # norm_last_layer: the weight-norm magnitude stays fixed at 1.
    assert not any(g["student_head.last_layer.parametrizations.weight.original0"] for g in dino.has_grad)
    swav = runs("swav")
    assert [g["prototypes.heads.0.weight"] for g in swav.has_grad] == [False, True]
    for run, name in ((dino, direction), (swav, "prototypes.heads.0.weight")):
        param = dict(run.method.named_parameters())[name]
        assert any(param is p for group in run.optimizer.param_groups for p in group["params"])


def test_dino_teacher_temperature_warms_up_and_centre_moves(runs: Any) -> None:
    run = runs("dino")
    cfg = run.method.config
    per_step = (cfg.teacher_temp - cfg.warmup_teacher_temp) / (cfg.warmup_teacher_temp_epochs * STEPS_PER_EPOCH)
    temps = [kwargs["teacher_temp"] for _, kwargs in run.criterion_calls]
    assert temps == pytest.approx([cfg.warmup_teacher_temp, cfg.warmup_teacher_temp + per_step])
    assert bool(run.method.criterion.center.abs().sum() > 0)
    # After the warm-up the schedule holds the final temperature (checked on a copy: forward only).
    late = copy.deepcopy(run.method)
    late.optimizer_steps.fill_(cfg.warmup_teacher_temp_epochs * STEPS_PER_EPOCH + 5)
    calls_before = len(run.criterion_calls)
    with torch.no_grad():
        late.step(run.views[0][:2])
    assert run.criterion_calls[calls_before][1]["teacher_temp"] == pytest.approx(cfg.teacher_temp)


def test_swav_uses_its_queue_once_full(runs: Any) -> None:
    run = runs("swav")
    method = run.method
    queues = [args[2] if len(args) > 2 else kwargs.get("queue_outputs") for args, kwargs in run.criterion_calls]
    assert queues[0] is None  # first step: the queue still holds its random initial entries
    assert [tuple(q.shape) for q in queues[1]] == [(N, method.config.n_prototypes)] * 2
    assert int(method.queue_filled) == 2 * N
    # The queue holds the unit-norm projections of the last global crops.
    norms = method.queues[0].bank.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)


RESUME_KEYS = {
    "moco": ["criterion.memory_bank.bank", "criterion.memory_bank.bank_ptr", "key_backbone.model.conv1.weight"],
    "swav": ["queues.0.bank", "queues.1.bank_ptr", "queue_filled", "optimizer_steps", "prototypes.heads.0.weight"],
    "dino": [
        "criterion.center",
        "optimizer_steps",
        "steps_per_epoch",
        "teacher_head.last_layer.parametrizations.weight.original1",
    ],
}


@pytest.mark.parametrize("name", sorted(RESUME_KEYS))
def test_resume_state_is_in_the_state_dict(name: str, runs: Any) -> None:
    state = runs(name).method.state_dict()
    keys = RESUME_KEYS[name]
    assert not [k for k in keys if k not in state]
    fresh = _build(name, 3, **TRAIN_OVERRIDES.get(name, {}))
    assert any(not torch.equal(fresh.state_dict()[k], state[k]) for k in keys)
    fresh.load_state_dict(state)
    for key in keys:
        assert torch.equal(fresh.state_dict()[key], state[key]), key
    if name == "moco":
        assert int(state["criterion.memory_bank.bank_ptr"]) == 2 * N  # each step enqueued its keys


@pytest.mark.parametrize("name", NAMES)
def test_trained_methods_deep_copy(name: str, runs: Any) -> None:
    # A loop or callback may copy a method (e.g. to keep a best state); lightly's legacy weight_norm broke this.
    method = runs(name).method
    clone = copy.deepcopy(method)
    assert clone.state_dict().keys() == method.state_dict().keys()


def test_registry_and_configs() -> None:
    assert set(NAMES) <= set(METHODS)
    for name in NAMES:
        cls = METHODS[name]
        assert cls.name == name and cls.config_class.__name__ != "MethodConfig"
        with pytest.raises(pydantic.ValidationError):
            cls.config_class(no_such_key=1)
        with pytest.raises(MedpretrainError, match="allowed keys"):
            method_config(name, {"no_such_key": 1})
        cfg = method_config(name, {"lr": 0.123})
        assert isinstance(cfg, cls.config_class) and cfg.lr == 0.123
    with pytest.raises(MedpretrainError):
        method_config("dino", {"warmup_teacher_temp": 0.1, "teacher_temp": 0.05})
