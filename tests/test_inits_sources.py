"""The negative-control init `noise` and `timm:<model>` inits from the local Hugging Face cache. No network."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from medpretrain.backbones import create_backbone
from medpretrain.budgets import Budget
from medpretrain.cells import Cell, run_cell
from medpretrain.data import load_dataset
from medpretrain.data.base import Task
from medpretrain.errors import MedpretrainError
from medpretrain.features import FeatureCache
from medpretrain.inits import build_model, check_pretraining_start, noise_features, parse_init
from medpretrain.plan import image_size_for
from medpretrain.study import validate_study
from medpretrain.train.classifier import Classifier, load_classifier, save_classifier

SUBSET = "pneumoniamnist[train=200,val=100,test=300]"


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache per test, offline: what this machine has cached never matters."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


# ----------------------------------------------------------------------------------------------------- noise


def test_noise_rows_depend_on_seed_split_and_index_only() -> None:
    big = noise_features(64, "train", 600)
    assert big.shape == (600, 64) and big.dtype == np.float32
    # Row i is the same whatever the split's length (blocks of rows have generators of their own).
    np.testing.assert_array_equal(noise_features(64, "train", 300), big[:300])
    np.testing.assert_array_equal(noise_features(64, "train", 600), big)
    assert not np.allclose(noise_features(64, "val", 300), big[:300])
    assert not np.allclose(noise_features(64, "train", 300, seed=1), big[:300])
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02


def test_noise_features_ignore_the_pixels(tmp_path: Path) -> None:
    """Through the feature cache, at the backbone's width: two different data sets with the same split sizes,
    and the same data set with its images blanked, give the same arrays."""
    pneumonia = load_dataset(SUBSET)
    blood = load_dataset("bloodmnist[train=200,val=100,test=300]")
    blank = replace(pneumonia, images={s: torch.zeros_like(x) for s, x in pneumonia.images.items()}, key="blank")
    noise = parse_init("noise")
    got = [FeatureCache(tmp_path / name).get(noise, "resnet18", False, d) for name, d in
           [("a", pneumonia), ("b", blood), ("c", blank)]]  # fmt: skip
    for split, n in (("train", 200), ("val", 100), ("test", 300)):
        assert got[0][split].shape == (n, 512)
        np.testing.assert_array_equal(got[0][split], got[1][split])
        np.testing.assert_array_equal(got[0][split], got[2][split])
    # The width is the backbone's: EfficientNet-Lite0 pools 1280 features.
    wide = FeatureCache(tmp_path / "d").get(noise, "efficientnet_lite0", False, pneumonia)
    assert wide["test"].shape == (300, 1280)


def test_linear_probe_on_noise_scores_chance(tmp_path: Path) -> None:
    """The whole cell path (cell key, feature cache, linear protocol, row): noise is at chance while a random
    ResNet-18 on the same images and labels is far above it, so the probe itself is not the reason."""
    out = tmp_path / "run"
    rows = {}
    for init in ("noise", "scratch"):
        cell = Cell(dataset=SUBSET, size=28, image_size=28, backbone="resnet18", small_stem=False, init=init,
                    protocol="linear", budget=Budget(fraction=1.0), seed=0)  # fmt: skip
        rows[init], _ = run_cell(cell, out, progress=False)
    assert abs(rows["noise"]["auc"] - 0.5) < 0.1, rows["noise"]["auc"]
    assert rows["scratch"]["auc"] > 0.8, rows["scratch"]["auc"]
    assert rows["noise"]["init_kind"] == "noise" and rows["noise"]["init"] == "noise"


def test_noise_has_no_network() -> None:
    with pytest.raises(MedpretrainError, match="has no network"):
        build_model("resnet18", "noise")
    with pytest.raises(MedpretrainError, match="has no network"):
        check_pretraining_start(parse_init("noise"))
    base = {"datasets": ["pneumoniamnist"], "inits": ["scratch", "noise"], "budgets": {"fractions": [0.1]}}
    assert validate_study({**base, "protocols": ["linear", "knn"]}, "study.yaml").inits == ["scratch", "noise"]
    with pytest.raises(MedpretrainError, match=r"protocol finetune.*no network") as err:
        validate_study({**base, "protocols": ["linear", "finetune"]}, "study.yaml")
    assert "\n" not in str(err.value)
    with pytest.raises(MedpretrainError, match="has no network"):
        validate_study({**base, "inits": [{"method": "simclr", "epochs": 1, "init": "noise"}]}, "study.yaml")


# ------------------------------------------------------------------------------------------------------ timm


def _fake_hf_entry(cache: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    """What `hf download timm/<name>` leaves: refs/main naming a snapshot that holds model.safetensors."""
    revision = "5b8f1d3c0a9e7f6d4c2b1a0f9e8d7c6b5a4f3e2d"
    repo = cache / f"models--timm--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def _published(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A full timm model state_dict (classifier head included, as on the hub), every tensor distinctive."""
    torch.manual_seed(seed)
    state = timm.create_model(name, pretrained=False).state_dict()
    with torch.no_grad():
        for value in state.values():
            if value.is_floating_point():
                value.normal_()
    return state


def test_timm_vit_from_the_hf_cache(_hf_cache: Path) -> None:
    name = "test_vit.r160_in1k"
    state = _published(name, 0)
    _fake_hf_entry(_hf_cache, name, state)
    spec = parse_init(f"timm:{name}")
    assert (spec.label, spec.text, spec.record_kind, spec.from_imagenet) == (f"timm:{name}", f"timm:{name}",
                                                                          "checkpoint", True)  # fmt: skip
    backbone, report = build_model("resnet18", spec, small_stem=True)
    # The timm model is its own backbone: the requested resnet18 and small stem do not apply (and say so).
    assert backbone.name == f"timm:{name}" and not backbone.small_stem
    assert report.missing == () and report.unexpected == ()
    assert {"head.weight", "head.bias"} <= set(report.skipped)
    assert any("do not apply" in note for note in report.notes)
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert backbone.num_features == 64
    # Its own normalisation (test_vit was trained with mean = std = 0.5), not ImageNet's.
    assert torch.allclose(backbone.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    with torch.no_grad():
        assert backbone(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape == (2, 64)
        assert backbone(torch.zeros(2, 3, 112, 112, dtype=torch.uint8)).shape == (2, 64)
        assert backbone.forward_maps(torch.zeros(1, 3, 112, 112, dtype=torch.uint8)).shape[:2] == (1, 64)
    # No tag is timm's default tag: the same file, so the same init for caches and the duplicate check.
    assert parse_init("timm:test_vit").key == spec.key and spec.key.startswith("timm-test_vit.r160_in1k-")


def test_timm_cnn_round_trips_as_a_kept_classifier(_hf_cache: Path, tmp_path: Path) -> None:
    """A fine-tuned timm: network is kept for Grad-CAM and rebuilt from its backbone name."""
    name = "test_resnet.r160_in1k"
    state = _published(name, 1)
    _fake_hf_entry(_hf_cache, name, state)
    backbone, report = build_model("resnet18", f"timm:{name}")
    assert report.missing == () and {"fc.weight", "fc.bias"} <= set(report.skipped)
    assert backbone.gradcam_layer is backbone.model.layer4
    model = Classifier(backbone, 2)
    path = save_classifier(tmp_path / "m.pt", model, image_size=28, task=Task.BINARY, classes=["a", "b"])
    again, meta = load_classifier(path)
    assert meta["backbone_name"] == f"timm:{name}"
    for key, value in again.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_timm_absent_weights_name_the_file_and_the_fetch_command(_hf_cache: Path) -> None:
    spec = parse_init("timm:resnet18.a1_in1k")  # parsing reads no file
    for action in (lambda: spec.key, lambda: build_model("resnet18", spec)):
        with pytest.raises(MedpretrainError) as err:
            action()
        text = str(err.value)
        assert str(_hf_cache / "models--timm--resnet18.a1_in1k") in text and "model.safetensors" in text
        assert "hf download timm/resnet18.a1_in1k" in text and "timm.create_model('resnet18.a1_in1k'" in text
        assert "\n" not in text


def test_timm_cache_under_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    name = "test_resnet.r160_in1k"
    state = _published(name, 2)
    _fake_hf_entry(tmp_path / "hf_home" / "hub", name, state)
    backbone, _ = build_model("resnet18", f"timm:{name}")
    assert all(torch.equal(v, state[k]) for k, v in backbone.model.state_dict().items())


def test_timm_init_in_a_study() -> None:
    with pytest.raises(MedpretrainError, match="timm has no model 'no_such_net'"):
        parse_init("timm:no_such_net")
    base = {"datasets": ["pneumoniamnist"], "budgets": {"fractions": [0.1]}}
    study = validate_study({**base, "inits": ["scratch", "timm:test_vit.r160_in1k"]}, "study.yaml")
    assert study.inits == ["scratch", "timm:test_vit.r160_in1k"]
    assert image_size_for(study, "pneumoniamnist") == 112  # natural-image weights: small images are upsampled
    with pytest.raises(MedpretrainError, match="its own architecture"):
        validate_study({**base, "inits": [{"method": "simclr", "epochs": 1, "init": "timm:test_vit"}]}, "study.yaml")
    assert create_backbone("timm:test_vit.r160_in1k").spec.token_grid
