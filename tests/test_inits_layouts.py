"""Official self-supervised ImageNet checkpoint layouts: each test writes a file in that exact layout, with the
real key names of the official code (DINO, SwAV, MoCo v2, MoCo v3, SimCLR via simclr-converter), loads it as a
checkpoint init, and checks every backbone key is matched with the right copy of the network's tensors.

Heads, queues and prototypes have the official structure (same module types, hence the same key names) at
reduced widths where the official ones would only make the files large (e.g. MoCo's queue length, DINO's
65 536 outputs); the backbone is a ResNet-18 (or DINO's ViT-Tiny), which those layouts wrap unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn

from medpretrain.backbones import Backbone, create_backbone
from medpretrain.inits import LoadReport, build_model, parse_init


def _resnet18_state(seed: int) -> dict[str, Tensor]:
    """A torchvision ResNet-18 state_dict whose every tensor differs between seeds (BN statistics included)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.normal_()
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def _without_fc(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}{k}": v.clone() for k, v in state.items()}


def _head_state(module: nn.Module, seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    for p in module.parameters():
        nn.init.normal_(p)
    return module.state_dict()


def _load(path: Path, backbone: str = "resnet18") -> tuple[Backbone, LoadReport]:
    return build_model(backbone, parse_init(str(path)))


def _assert_loaded(backbone: Backbone, report: LoadReport, expected: dict[str, Tensor]) -> None:
    """Every backbone key was matched and holds exactly the expected (source) tensor."""
    assert report.missing == (), report.summary()
    assert report.unexpected == (), report.summary()
    for key, value in backbone.model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(value, expected[key]), key


# ------------------------------------------------------------------------------------------------------ DINO


def _dino_head(in_dim: int) -> dict[str, Tensor]:
    # DINOHead: mlp = Linear, GELU, Linear, GELU, Linear (nlayers=3); last_layer = weight_norm(Linear(bias=False))
    # → last_layer.weight_g, last_layer.weight_v. Widths reduced (official: 2048 hidden, 65536 outputs).
    mlp = nn.Sequential(nn.Linear(in_dim, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 256))
    state = {f"mlp.{k}": v for k, v in _head_state(mlp, 7).items()}
    state["last_layer.weight_g"] = torch.ones(1024, 1)
    state["last_layer.weight_v"] = torch.randn(1024, 256)
    return state


def _dino_file(path: Path, teacher: dict[str, Tensor], student: dict[str, Tensor], *, teacher_ddp: bool) -> None:
    """main_dino.py's save_dict: the student is always DDP-wrapped (module.), the teacher only when the network has
    BatchNorm (ResNets); both are MultiCropWrapper(backbone, head) with the backbone's fc/head set to Identity."""
    width = 192 if "cls_token" in teacher else 512
    t_prefix = "module." if teacher_ddp else ""
    save_dict = {
        "student": {**_prefixed("module.backbone.", student), **_prefixed("module.head.", _dino_head(width))},
        "teacher": {**_prefixed(f"{t_prefix}backbone.", teacher), **_prefixed(f"{t_prefix}head.", _dino_head(width))},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "weight_decay": 0.04, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="resnet18" if width == 512 else "vit_tiny", out_dim=1024, patch_size=16),
        "dino_loss": {"center": torch.zeros(1, 1024)},
    }
    torch.save(save_dict, path)


def test_dino_resnet_checkpoint_loads_the_teacher(tmp_path: Path) -> None:
    teacher, student = _without_fc(_resnet18_state(1)), _without_fc(_resnet18_state(2))
    path = tmp_path / "dino_resnet18_checkpoint.pth"
    _dino_file(path, teacher, student, teacher_ddp=True)
    # DINO pickles its argparse Namespace beside the weights: read with full unpickling, and said so.
    with pytest.warns(UserWarning, match="non-tensor Python objects"):
        backbone, report = _load(path)
    _assert_loaded(backbone, report, teacher)
    assert any("'teacher' entry" in note and "'student'" in note for note in report.notes), report.notes
    assert any(key.startswith("module.head.") for key in report.skipped)


def test_dino_vit_checkpoint_loads_the_teacher(tmp_path: Path) -> None:
    """DINO's ViTs have no BatchNorm, so the teacher is saved without DDP: 'backbone.' keys, the student's
    'module.backbone.'. DINO's ViT names are timm's (cls_token, pos_embed, patch_embed.proj, blocks.N...)."""
    torch.manual_seed(3)
    teacher = create_backbone("vit_tiny").model.state_dict()
    with torch.no_grad():  # pos_embed and cls_token start at zero-ish in timm; make every tensor distinctive
        for value in teacher.values():
            value.normal_()
    torch.manual_seed(4)
    student = create_backbone("vit_tiny").model.state_dict()
    path = tmp_path / "dino_deitsmall16_checkpoint.pth"
    _dino_file(path, teacher, student, teacher_ddp=False)
    with pytest.warns(UserWarning, match="non-tensor Python objects"):
        backbone, report = _load(path, "vit_tiny")
    _assert_loaded(backbone, report, teacher)


# ------------------------------------------------------------------------------------------------------ SwAV


def test_swav_checkpoint(tmp_path: Path) -> None:
    """swav_800ep_pretrain.pth.tar: the DDP model's state_dict itself — module.conv1… (its ResNet has no fc), a
    projection_head Sequential(Linear, BatchNorm1d, ReLU, Linear) and prototypes Linear(128, 3000, bias=False)."""
    body = _without_fc(_resnet18_state(5))
    head = nn.Sequential(nn.Linear(512, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True), nn.Linear(2048, 128))
    state = {
        **_prefixed("module.", body),
        **_prefixed("module.projection_head.", _head_state(head, 8)),
        "module.prototypes.weight": torch.randn(3000, 128),
    }
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save(state, path)
    backbone, report = _load(path)
    _assert_loaded(backbone, report, body)
    skipped = set(report.skipped)
    assert "module.prototypes.weight" in skipped and "module.projection_head.3.weight" in skipped


# ------------------------------------------------------------------------------------------------------ MoCo


@pytest.mark.parametrize("key_encoder_first", [False, True], ids=["official-order", "key-encoder-first"])
def test_moco_v2_checkpoint_loads_the_query_encoder(tmp_path: Path, key_encoder_first: bool) -> None:
    """main_moco.py's {'epoch', 'arch', 'state_dict', 'optimizer'}: DDP MoCo with encoder_q / encoder_k (torchvision
    ResNets whose fc is Sequential(Linear, ReLU, Linear) with --mlp: fc.0 / fc.2) and the queue buffers."""
    query, key = _resnet18_state(11), _resnet18_state(12)

    def encoder(state: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
        fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
        return {**_without_fc(state), **_prefixed("fc.", _head_state(fc, seed))}

    q = _prefixed("module.encoder_q.", encoder(query, 13))
    k = _prefixed("module.encoder_k.", encoder(key, 14))
    # Queue length reduced from 65536 (a --moco-k option); queue_ptr as registered by MoCo.
    buffers = {"module.queue": torch.randn(128, 4096), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    state = {**k, **q, **buffers} if key_encoder_first else {**q, **k, **buffers}
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": state, "optimizer": {"state": {}}}, path)
    backbone, report = _load(path)
    _assert_loaded(backbone, report, _without_fc(query))
    assert "module.encoder_q.fc.2.weight" in report.skipped and "module.queue" in report.skipped
    assert any("MoCo v2 layout" in note for note in report.notes), report.notes


def _moco_v3_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int) -> nn.Sequential:
    # MoCo v3's _build_mlp: Linear(bias=False), BatchNorm1d, ReLU between layers; a last BatchNorm1d(affine=False).
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim1, dim2 = (input_dim if i == 0 else mlp_dim), (output_dim if i == num_layers - 1 else mlp_dim)
        layers.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        else:
            layers.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("momentum_first", [False, True], ids=["official-order", "momentum-encoder-first"])
def test_moco_v3_checkpoint_loads_the_base_encoder(tmp_path: Path, momentum_first: bool) -> None:
    """moco-v3 main_moco.py: DDP MoCo with base_encoder / momentum_encoder (ResNet fc = a 2-layer MLP: fc.0, fc.1
    BN, fc.3, fc.4 BN) and a predictor; the file is {'epoch', 'arch', 'state_dict', 'optimizer', 'scaler'}."""
    base, momentum = _resnet18_state(21), _resnet18_state(22)

    def encoder(state: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
        return {**_without_fc(state), **_prefixed("fc.", _head_state(_moco_v3_mlp(2, 512, 1024, 256), seed))}

    b = _prefixed("module.base_encoder.", encoder(base, 23))
    m = _prefixed("module.momentum_encoder.", encoder(momentum, 24))
    pred = _prefixed("module.predictor.", _head_state(_moco_v3_mlp(2, 256, 1024, 256), 25))
    state = {**m, **b, **pred} if momentum_first else {**b, **m, **pred}
    path = tmp_path / "r-18-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "resnet18", "state_dict": state, "optimizer": {}, "scaler": {}}, path)
    backbone, report = _load(path)
    _assert_loaded(backbone, report, _without_fc(base))
    assert "module.base_encoder.fc.3.weight" in report.skipped and "module.predictor.0.weight" in report.skipped
    assert any("MoCo v3 layout" in note for note in report.notes), report.notes


# ------------------------------------------------------------------------------------------------------ SimCLR


def test_simclr_converted_to_torchvision(tmp_path: Path) -> None:
    """tonylins/simclr-converter writes torch.save({'state_dict': model.state_dict()}) of a torchvision-layout
    ResNet, fc included (the TF checkpoint's supervised head); a SimCLR v2 ResNet without selective kernels
    converted to torchvision names has the same layout."""
    state = _resnet18_state(31)
    path = tmp_path / "resnet18_simclr.pth"
    torch.save({"state_dict": state}, path)
    backbone, report = _load(path)
    _assert_loaded(backbone, report, _without_fc(state))
    assert {"fc.weight", "fc.bias"} <= set(report.skipped)
