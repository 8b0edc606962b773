"""Self-supervised methods (SimCLR, MoCo v2, BYOL, SimSiam, SwAV, DINO, Barlow Twins, VICReg) on real MedMNIST.

Each method runs two optimisation steps the way the training loop drives it (views → step → backward →
optimiser → after_step) with its own optimiser, on 32 real images and a ResNet-18 at 28 px.
"""

from __future__ import annotations

import copy
import importlib
import math
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
from medpretrain.ssl.base import METHODS, Method, get_method, method_config

NAMES = ("simclr", "moco", "byol", "simsiam", "swav", "dino", "barlow_twins", "vicreg")
for _name in NAMES:  # registration happens on import; the package __init__ may not import them all yet
    importlib.import_module(f"medpretrain.ssl.{_name}")

N = 32
SIZE = 28
TOTAL_STEPS = 100
STEPS_PER_EPOCH = 1  # so the one-epoch freezes (DINO last layer, SwAV prototypes) end after the first step
TWO_VIEWS = [SIZE, SIZE]
MULTI_CROP = [SIZE, SIZE] + [12] * 4  # 2 global + 4 local crops at 0.43 × 28 px, floored at 12 px
VIEW_SIDES = {
    "simclr": TWO_VIEWS,
    "moco": TWO_VIEWS,
    "byol": TWO_VIEWS,
    "simsiam": TWO_VIEWS,
    "barlow_twins": TWO_VIEWS,
    "vicreg": TWO_VIEWS,
    "swav": MULTI_CROP,
    "dino": MULTI_CROP,
}
MOMENTUM = {
    "moco": ("key_backbone", "key_head"),
    "byol": ("target_backbone", "target_head"),
    "dino": ("teacher_backbone", "teacher_head"),
}
OPTIMIZER = {"moco": "sgd", "simsiam": "sgd", "dino": "adamw"}  # every other method: LARS


def _images(root: Path, flag: str) -> torch.Tensor:
    images = np.load(root / f"{flag}.npz")["train_images"][:N]
    x = torch.from_numpy(images)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def batches(data_root: Path) -> dict[str, torch.Tensor]:
    return {flag: _images(data_root, flag) for flag in ("bloodmnist", "pneumoniamnist")}


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
    views: list[list[torch.Tensor]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    embeddings: list[torch.Tensor] = field(default_factory=list)
    has_grad: list[dict[str, bool]] = field(default_factory=list)  # per step: parameter name → received a gradient
    backbone_grads_nonzero: list[bool] = field(default_factory=list)
    teacher_moved_by_optimizer: list[bool] = field(default_factory=list)
    teacher_moved_by_after_step: list[bool] = field(default_factory=list)


def _train(method: Method, batch: torch.Tensor, steps: int = 2) -> Run:
    """Drive `method` exactly as the training loop does."""
    opt_cfg = method.configure_optimizers(TOTAL_STEPS, STEPS_PER_EPOCH)
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    run = Run(method, optimizer)
    teachers = [getattr(method, attr) for attr in MOMENTUM.get(method.name, ())]
    generator = torch.Generator().manual_seed(0)
    for i in range(steps):
        views = method.views(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        out = method.step(views)
        out.loss.backward()
        run.views.append(views)
        run.losses.append(float(out.loss))
        assert out.loss.ndim == 0
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


CASES = [(name, "bloodmnist") for name in NAMES] + [("simclr", "pneumoniamnist"), ("dino", "pneumoniamnist")]


@pytest.mark.parametrize(("name", "flag"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_two_optimisation_steps(name: str, flag: str, batches: dict[str, torch.Tensor]) -> None:
    batch = batches[flag]
    channels = batch.shape[1]
    assert batch.dtype == torch.uint8 and batch.shape == (N, channels, SIZE, SIZE)
    method = _build(name, channels)
    assert method.config.optimizer == OPTIMIZER.get(name, "lars")
    backbone_before = _snapshot(method.backbone)
    run = _train(method, batch)

    for views in run.views:
        assert [v.shape for v in views] == [(N, channels, s, s) for s in VIEW_SIDES[name]]
        for v in views:
            assert v.dtype == torch.float32 and float(v.min()) >= 0.0 and float(v.max()) <= 1.0
        assert not torch.equal(views[0], views[1])  # two different random views
    assert all(math.isfinite(loss) for loss in run.losses), run.losses
    for emb in run.embeddings:
        assert emb.shape == (N, method.backbone.num_features) and bool(torch.isfinite(emb).all())

    # Every backbone parameter is optimised and receives a non-zero gradient at every step.
    optimised = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in method.backbone.parameters()} <= optimised
    assert all(run.backbone_grads_nonzero)
    assert _changed(backbone_before, method.backbone)

    teachers = [getattr(method, attr) for attr in MOMENTUM.get(name, ())]
    for teacher in teachers:
        params = list(teacher.parameters())
        assert params and not any(p.requires_grad for p in params)
        assert not {id(p) for p in params} & optimised
    if teachers:
        assert not any(run.teacher_moved_by_optimizer)
        assert all(run.teacher_moved_by_after_step)


def test_momentum_encoders_start_as_copies() -> None:
    for name, (backbone_attr, _) in MOMENTUM.items():
        method = _build(name, 3)
        online = method.backbone.state_dict()
        teacher = getattr(method, backbone_attr).state_dict()
        assert online.keys() == teacher.keys()
        assert all(torch.equal(online[k], teacher[k]) for k in online), name


def test_one_epoch_freezes_release_after_the_first_epoch(batches: dict[str, torch.Tensor]) -> None:
    # DINO's last layer and SwAV's prototypes get no gradient in epoch 0 (one step here), then train.
    dino = _train(_build("dino", 3, n_local_crops=1), batches["bloodmnist"])
    direction = "student_head.last_layer.parametrizations.weight.original1"
    assert [g[direction] for g in dino.has_grad] == [False, True]
    assert not any(g["student_head.last_layer.parametrizations.weight.original0"] for g in dino.has_grad)
    swav = _train(_build("swav", 3, n_local_crops=1), batches["bloodmnist"])
    assert [g["prototypes.heads.0.weight"] for g in swav.has_grad] == [False, True]
    for run, frozen in ((dino, direction), (swav, "prototypes.heads.0.weight")):
        param = dict(run.method.named_parameters())[frozen]
        assert any(param is p for group in run.optimizer.param_groups for p in group["params"])


def test_dino_teacher_temperature_warms_up_and_centre_moves(batches: dict[str, torch.Tensor]) -> None:
    method = _build("dino", 3, n_local_crops=0)
    temps: list[float] = []
    forward = method.criterion.forward

    def spy(teacher_out: Any, student_out: Any, teacher_temp: float | None = None, **kw: Any) -> torch.Tensor:
        temps.append(float(teacher_temp))  # type: ignore[arg-type]
        return forward(teacher_out, student_out, teacher_temp=teacher_temp, **kw)

    method.criterion.forward = spy  # type: ignore[method-assign]
    _train(method, batches["bloodmnist"], steps=3)
    cfg = method.config
    step = (cfg.teacher_temp - cfg.warmup_teacher_temp) / (cfg.warmup_teacher_temp_epochs * STEPS_PER_EPOCH)
    assert temps == pytest.approx([cfg.warmup_teacher_temp + i * step for i in range(3)])
    assert bool(method.criterion.center.abs().sum() > 0)


def test_swav_uses_its_queue_once_full(batches: dict[str, torch.Tensor]) -> None:
    method = _build("swav", 3, n_local_crops=0, queue_length=2 * N, queue_start_epochs=0)
    seen: list[Any] = []
    forward = method.criterion.forward

    def spy(high: Any, low: Any, queue_outputs: Any = None) -> torch.Tensor:
        seen.append(queue_outputs)
        return forward(high, low, queue_outputs)

    method.criterion.forward = spy  # type: ignore[method-assign]
    run = _train(method, batches["bloodmnist"], steps=3)
    assert seen[0] is None and seen[1] is None  # queue still holds its random initial entries
    assert [q.shape for q in seen[2]] == [(2 * N, method.config.n_prototypes)] * 2
    assert int(method.queue_filled) == 3 * N
    assert all(math.isfinite(loss) for loss in run.losses)
    # The queue holds unit-norm projections of past global crops.
    norms = method.queues[0].bank.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("moco", ["criterion.memory_bank.bank", "criterion.memory_bank.bank_ptr", "key_backbone.model.conv1.weight"]),
        (
            "swav",
            ["queues.0.bank", "queues.1.bank_ptr", "queue_filled", "optimizer_steps", "prototypes.heads.0.weight"],
        ),
        (
            "dino",
            [
                "criterion.center",
                "optimizer_steps",
                "steps_per_epoch",
                "teacher_head.last_layer.parametrizations.weight.original1",
            ],
        ),
    ],
)
def test_resume_state_is_in_the_state_dict(name: str, keys: list[str], batches: dict[str, torch.Tensor]) -> None:
    method = _build(name, 3, n_local_crops=0) if name != "moco" else _build(name, 3)
    _train(method, batches["bloodmnist"], steps=1)
    state = method.state_dict()
    missing = [k for k in keys if k not in state]
    assert not missing
    fresh = _build(name, 3, n_local_crops=0) if name != "moco" else _build(name, 3)
    fresh.load_state_dict(state)
    for key in keys:
        assert torch.equal(fresh.state_dict()[key], state[key]), key
    if name == "moco":
        assert int(state["criterion.memory_bank.bank_ptr"]) == N  # the step enqueued its keys


@pytest.mark.parametrize("name", NAMES)
def test_methods_deep_copy(name: str) -> None:
    # The loop or callbacks may copy a method (e.g. to keep a best state); lightly's legacy weight_norm broke this.
    method = _build(name, 3)
    clone = copy.deepcopy(method)
    assert clone.state_dict().keys() == method.state_dict().keys()


def test_registry_and_configs() -> None:
    assert set(NAMES) <= set(METHODS)
    for name in NAMES:
        cls = METHODS[name]
        assert cls.name == name and cls.config_class is not type(None)
        with pytest.raises(pydantic.ValidationError):
            cls.config_class(no_such_key=1)
        with pytest.raises(MedpretrainError, match="allowed keys"):
            method_config(name, {"no_such_key": 1})
        cfg = method_config(name, {"lr": 0.123})
        assert isinstance(cfg, cls.config_class) and cfg.lr == 0.123
    with pytest.raises(MedpretrainError):
        method_config("dino", {"warmup_teacher_temp": 0.1, "teacher_temp": 0.05})
