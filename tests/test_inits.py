"""Backbones and initialisations: shapes, offline ImageNet weights, checkpoint formats. No network."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from sklearn.datasets import load_sample_image
from torch import nn

from medpretrain.backbones import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, Backbone, create_backbone
from medpretrain.errors import MedpretrainError
from medpretrain.inits import (
    InitSpec,
    LoadReport,
    build_model,
    checkpoint_meta,
    efficientnet_lite0_weights_path,
    lukemelas_to_timm,
    parse_init,
    save_checkpoint,
)

# ImageNet-1k classes a photo of a Chinese temple roof can reasonably be: bell cote, palace, church, dome,
# castle, monastery, stupa, boathouse, lakeside, pier — all "building by water" classes, none of them generic.
CHINA_PLAUSIBLE = {442, 698, 497, 538, 483, 663, 832, 449, 975, 718}


@pytest.fixture(autouse=True)
def _offline_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty TORCH_HOME and HF cache per test: results never depend on what this machine has cached."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _images(n: int, channels: int, size: int, *, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
    return x if dtype == torch.uint8 else x.to(dtype) / 255.0


def _tv_resnet18_state(seed: int = 123) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    # Non-trivial BN statistics so that "loaded" is distinguishable from fresh init for every tensor.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def _assert_backbone_equals(backbone: Backbone, state: dict[str, torch.Tensor], *, skip: set[str]) -> None:
    for key, value in backbone.model.state_dict().items():
        if key in skip or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(value, state[key]), key


# ----------------------------------------------------------------------------------------------- backbones

CASES = [(name, False) for name in BACKBONES] + [
    (name, True) for name, spec in BACKBONES.items() if spec.supports_small_stem
]


@pytest.mark.parametrize(("name", "small_stem"), CASES)
def test_forward_shapes(name: str, small_stem: bool) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(name, small_stem=small_stem).eval()
    # 28 px grayscale uint8 and 64 px RGB float: both sizes, both channel counts, both dtypes.
    gray, rgb = _images(2, 1, 28), _images(1, 3, 64, dtype=torch.float32)
    with torch.no_grad():
        for x in (gray, rgb):
            feats = backbone(x)
            assert feats.shape == (len(x), backbone.num_features)
            assert torch.isfinite(feats).all()
        maps = backbone.forward_maps(gray)
    assert maps.ndim == 4 and maps.shape[:2] == (2, backbone.num_features)


def test_small_stem_keeps_resolution() -> None:
    small = create_backbone("resnet18", small_stem=True).eval()
    plain = create_backbone("resnet18").eval()
    conv1 = small.model.conv1
    assert isinstance(conv1, nn.Conv2d)
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(small.model.maxpool, nn.Identity)
    x = _images(1, 1, 28)
    with torch.no_grad():
        assert small.forward_maps(x).shape == (1, 512, 4, 4)
        assert plain.forward_maps(x).shape == (1, 512, 1, 1)
        vit = create_backbone("vit_tiny", small_stem=True).eval()
        assert vit.forward_maps(x).shape == (1, 192, 7, 7)  # 4-px patches


def test_gradcam_layer_gives_the_feature_map() -> None:
    for name in ("resnet18", "efficientnet_lite0"):
        backbone = create_backbone(name).eval()
        seen: list[torch.Tensor] = []
        handle = backbone.gradcam_layer.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out))
        x = _images(2, 3, 64)
        with torch.no_grad():
            maps = backbone.forward_maps(x)
        handle.remove()
        assert torch.equal(seen[-1], maps)


def test_prepare_conventions() -> None:
    backbone = create_backbone("resnet18")
    x8 = _images(2, 1, 28)
    as_float = backbone.prepare(x8.float() / 255.0)
    assert torch.allclose(backbone.prepare(x8), as_float)
    assert torch.allclose(backbone.prepare(x8.expand(-1, 3, -1, -1)), as_float)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(as_float, (x8.float().expand(-1, 3, -1, -1) / 255.0 - mean) / std)
    # Normalisation constants move with the module but are not weights.
    assert {name for name, _ in backbone.named_buffers()} >= {"mean", "std"}
    assert "mean" not in backbone.state_dict()
    assert backbone.to(torch.float64).mean.dtype == torch.float64
    with pytest.raises(MedpretrainError, match="1 or 3 channels"):
        backbone.prepare(torch.zeros(1, 2, 28, 28))


def test_unknown_backbone_and_unsupported_small_stem() -> None:
    with pytest.raises(MedpretrainError, match="resnet18") as err:
        create_backbone("resnet9000")
    assert "efficientnet_lite0" in str(err.value)
    with pytest.raises(MedpretrainError, match="small"):
        create_backbone("efficientnet_lite0", small_stem=True)


# ----------------------------------------------------------------------------------------------- ImageNet


@pytest.fixture(scope="module")
def lite0_source() -> dict[str, torch.Tensor]:
    return torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)


def test_efficientnet_lite0_imagenet_loads_every_tensor(lite0_source: dict[str, torch.Tensor]) -> None:
    backbone, report = build_model("efficientnet_lite0", "imagenet")
    reference = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).state_dict()
    n_classifier = len(timm.create_model("efficientnet_lite0", num_classes=1000).state_dict()) - len(reference)
    assert n_classifier == 2
    assert len(report.loaded) == len(reference) == len(lite0_source) - n_classifier
    assert report.missing == () and report.unexpected == ()
    assert set(report.skipped) == {"_fc.weight", "_fc.bias"}
    assert "loaded 294/294" in report.summary()
    loaded = backbone.model.state_dict()
    assert torch.equal(loaded["conv_stem.weight"], lite0_source["_conv_stem.weight"])
    assert torch.equal(loaded["bn2.running_var"], lite0_source["_bn1.running_var"])
    # Trained BN statistics, not the fresh-init 0/1 (a few dead channels have exactly zero variance).
    variances = [v for k, v in loaded.items() if k.endswith("running_var")]
    assert all((v >= 0).all() for v in variances)
    assert all(not torch.allclose(v, torch.ones_like(v)) for v in variances)
    assert not torch.allclose(loaded["bn1.running_mean"], torch.zeros(32))


def test_efficientnet_lite0_imagenet_classifies_a_natural_photo(
    lite0_source: dict[str, torch.Tensor],
) -> None:
    classifier = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    classifier.load_state_dict(lukemelas_to_timm(lite0_source, classifier.state_dict()), strict=True)
    backbone = create_backbone("efficientnet_lite0")  # borrowed for its input convention only
    photo = torch.from_numpy(np.array(load_sample_image("china.jpg"))).permute(2, 0, 1)[None]
    photo = nn.functional.interpolate(photo.float(), size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        proba = classifier(backbone.prepare(photo.round().clamp(0, 255).to(torch.uint8))).softmax(1)[0]
    top5 = set(proba.topk(5).indices.tolist())
    assert top5 & CHINA_PLAUSIBLE, top5
    assert proba.max() > 0.1  # confident, far from uniform (0.001)

    pretrained, _ = build_model("efficientnet_lite0", "imagenet")
    with torch.no_grad():
        feats = pretrained.eval()(photo / 255.0)
    assert feats.shape == (1, 1280) and feats.std() > 0.1 and (feats != 0).float().mean() > 0.2


def test_resnet18_imagenet_from_torch_home(_offline_caches: Path) -> None:
    filename = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    state = _tv_resnet18_state()
    target = _offline_caches / "hub" / "checkpoints" / filename
    target.parent.mkdir(parents=True)
    torch.save(state, target)

    backbone, report = build_model("resnet18", "imagenet")
    _assert_backbone_equals(backbone, state, skip=set())
    assert report.missing == () and report.unexpected == ()
    assert set(report.skipped) == {"fc.weight", "fc.bias"}
    assert filename in report.source

    small, small_report = build_model("resnet18", "imagenet", small_stem=True)
    assert small_report.missing == ("conv1.weight",)
    assert "conv1.weight" in small_report.summary()
    _assert_backbone_equals(small, state, skip={"conv1.weight"})


def _fake_hf_cache(cache: Path, repo_id: str, state: dict[str, torch.Tensor]) -> None:
    """The on-disk layout huggingface_hub leaves after a download (refs/main → snapshot)."""
    from safetensors.torch import save_file

    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))


def test_imagenet_from_hf_cache(tmp_path: Path) -> None:
    state = _tv_resnet18_state(seed=11)
    _fake_hf_cache(tmp_path / "hf_cache", "timm/resnet18.a1_in1k", state)
    backbone, report = build_model("resnet18", "imagenet")
    assert "timm/resnet18.a1_in1k" in report.source
    _assert_backbone_equals(backbone, state, skip=set())

    # ViT weights for 224 px / 16-px patches are resampled to the 4-px small stem by timm's filter.
    torch.manual_seed(0)
    vit_state = timm.create_model("vit_tiny_patch16_224", num_classes=1000).state_dict()
    _fake_hf_cache(tmp_path / "hf_cache", "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", vit_state)
    vit, vit_report = build_model("vit_tiny", "imagenet", small_stem=True)
    assert vit_report.missing == () and {"head.weight", "head.bias"} <= set(vit_report.skipped)
    assert vit.model.patch_embed.proj.weight.shape == (192, 3, 4, 4)
    assert torch.equal(vit.model.blocks[3].mlp.fc1.weight, vit_state["blocks.3.mlp.fc1.weight"])
    with torch.no_grad():
        assert vit(_images(1, 1, 28)).shape == (1, 192)


def test_missing_imagenet_weights_name_the_file() -> None:
    with pytest.raises(MedpretrainError, match=r"resnet18-f37072fd\.pth") as err:
        build_model("resnet18", "imagenet")
    assert "efficientnet_lite0" in str(err.value)
    with pytest.raises(MedpretrainError, match=r"resnet50-0676ba61\.pth"):
        build_model("resnet50", "imagenet")
    with pytest.raises(MedpretrainError, match="vit_tiny_patch16_224"):
        build_model("vit_tiny", "imagenet")


# ----------------------------------------------------------------------------------------------- checkpoints


def _load_resnet18(path: Path) -> tuple[Backbone, LoadReport]:
    return build_model("resnet18", str(path), seed=999)


def test_plain_and_torchvision_state_dicts(tmp_path: Path) -> None:
    tv_state = _tv_resnet18_state()
    torch.save(tv_state, tmp_path / "tv.pth")
    backbone, report = _load_resnet18(tmp_path / "tv.pth")
    _assert_backbone_equals(backbone, tv_state, skip=set())
    assert set(report.skipped) == {"fc.weight", "fc.bias"} and report.missing == ()

    timm_state = {k: v for k, v in tv_state.items() if not k.startswith("fc.")}
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": timm_state}, tmp_path / "timm.pth.tar")
    backbone, report = _load_resnet18(tmp_path / "timm.pth.tar")
    _assert_backbone_equals(backbone, tv_state, skip=set())
    assert report.skipped == () and report.unexpected == ()


def test_lightning_prefixed_checkpoint(tmp_path: Path) -> None:
    tv_state = _tv_resnet18_state()
    inner = {f"model.backbone.{k}": v for k, v in tv_state.items() if not k.startswith("fc.")}
    inner["model.head.weight"] = torch.zeros(2, 512)
    inner["model.backbone.extra_tensor"] = torch.zeros(3)
    hparams = argparse.Namespace(lr=0.1)  # a pickled object: needs the full-unpickling fallback
    torch.save({"epoch": 1, "state_dict": inner, "hyper_parameters": hparams}, tmp_path / "last.ckpt")
    with pytest.warns(UserWarning, match="unpickling"):
        backbone, report = _load_resnet18(tmp_path / "last.ckpt")
    _assert_backbone_equals(backbone, tv_state, skip=set())
    assert report.unexpected == ("model.backbone.extra_tensor",)
    assert "model.head.weight" in report.skipped
    assert report.missing == ()


def test_lightly_sequential_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(5)
    resnet = torchvision.models.resnet18()
    tv_state = resnet.state_dict()
    sequential = nn.Sequential(*list(resnet.children())[:-1])
    state = {f"backbone.{k}": v for k, v in sequential.state_dict().items()}
    assert "backbone.4.0.conv1.weight" in state
    state.update({"projection_head.layers.0.weight": torch.zeros(4, 512)})
    torch.save({"state_dict": state}, tmp_path / "simclr.ckpt")
    backbone, report = _load_resnet18(tmp_path / "simclr.ckpt")
    _assert_backbone_equals(backbone, tv_state, skip=set())
    assert report.missing == () and report.unexpected == ()
    assert "child-index" in report.summary()


def test_other_layout_falls_back_to_ordered_shapes() -> None:
    # The lukemelas-layout file shares no key names with timm: only the verified shape order can map it.
    path = efficientnet_lite0_weights_path()
    backbone, report = build_model("efficientnet_lite0", str(path))
    reference, _ = build_model("efficientnet_lite0", "imagenet")
    assert report.missing == () and report.unexpected == ()
    assert "ordered-shape" in report.summary()
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, backbone.model.state_dict()[key]), key


def test_own_format_roundtrip_and_meta(tmp_path: Path) -> None:
    torch.manual_seed(7)
    source = create_backbone("resnet18", small_stem=True)
    path = save_checkpoint(
        tmp_path / "simclr.pt",
        source,
        image_size=28,
        method="simclr",
        config={"epochs": 2},
        history=[{"a": 1}],
    )
    assert checkpoint_meta(path) == {
        "backbone_name": "resnet18",
        "small_stem": True,
        "image_size": 28,
        "method": "simclr",
    }
    loaded, report = build_model("resnet18", InitSpec("checkpoint", path), small_stem=True)
    _assert_backbone_equals(loaded, source.model.state_dict(), skip=set())
    assert report.missing == () and report.unexpected == () and report.skipped == ()
    with pytest.raises(MedpretrainError, match="resnet18, not resnet50"):
        build_model("resnet50", InitSpec("checkpoint", path), small_stem=True)
    with pytest.raises(MedpretrainError, match="small stem"):
        build_model("resnet18", InitSpec("checkpoint", path))
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    assert checkpoint_meta(tmp_path / "plain.pt") == {}


def test_bad_checkpoints(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(MedpretrainError, match="cannot read checkpoint"):
        build_model("resnet18", str(garbage))

    nothing = tmp_path / "nothing.pt"
    torch.save({"encoder.foo.weight": torch.zeros(3, 3), "bar": torch.ones(2)}, nothing)
    with pytest.raises(MedpretrainError, match=f"checkpoint {re.escape(str(nothing))} has no keys matching"):
        build_model("resnet18", str(nothing))

    torch.manual_seed(0)
    other = tmp_path / "resnet50.pt"
    torch.save(torchvision.models.resnet50().state_dict(), other)
    with pytest.raises(MedpretrainError, match="does not fit backbone resnet18"):
        build_model("resnet18", str(other))

    no_tensors = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "note": "no weights"}, no_tensors)
    with pytest.raises(MedpretrainError, match="holds no state_dict"):
        build_model("resnet18", str(no_tensors))

    with pytest.raises(MedpretrainError, match="not a file"):
        parse_init(str(tmp_path))
    with pytest.raises(MedpretrainError, match="scratch, imagenet"):
        parse_init("imagenett")
    with pytest.raises(MedpretrainError, match="does not exist"):
        build_model("resnet18", InitSpec("checkpoint", tmp_path / "gone.pt"))


# ----------------------------------------------------------------------------------------------- specs


def test_init_spec_keys(tmp_path: Path) -> None:
    assert parse_init("scratch") == InitSpec("scratch") and parse_init(" ImageNet ").key == "imagenet"
    assert InitSpec("scratch").key == "scratch" and InitSpec("imagenet").label == "ImageNet"
    a, b, c = tmp_path / "a.pt", tmp_path / "copy.pt", tmp_path / "c.pt"
    torch.save({"w": torch.arange(4.0)}, a)
    b.write_bytes(a.read_bytes())
    torch.save({"w": torch.arange(5.0)}, c)
    key = parse_init(str(a)).key
    assert re.fullmatch(r"ckpt-[0-9a-f]{16}", key)
    assert parse_init(str(b)).key == key  # content, not path
    assert parse_init(str(a)).key == key  # stable
    assert parse_init(str(c)).key != key
    assert parse_init(str(a)).label == "ckpt:a"
    with pytest.raises(MedpretrainError):
        InitSpec("checkpoint")
    with pytest.raises(MedpretrainError):
        InitSpec("pretrained")


def test_scratch_is_reproducible() -> None:
    first, report = build_model("resnet18", "scratch", small_stem=True, seed=3)
    again, _ = build_model("resnet18", "scratch", small_stem=True, seed=3)
    other, _ = build_model("resnet18", "scratch", small_stem=True, seed=4)
    assert "seed 3" in report.summary()
    _assert_backbone_equals(again, first.model.state_dict(), skip=set())
    assert not torch.equal(first.model.conv1.weight, other.model.conv1.weight)
