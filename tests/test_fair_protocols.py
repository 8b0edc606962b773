"""Fair protocols: validation budgets, laterality-aware flips, BatchNorm adaptation for every init, pre-training
seeds and protocol versions in cell keys (real MedMNIST data, tiny subsets)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medpretrain.backbones import create_backbone
from medpretrain.budgets import Budget, select_validation
from medpretrain.cells import Cell
from medpretrain.cli import app
from medpretrain.data import load_dataset
from medpretrain.data.base import Task
from medpretrain.errors import MedpretrainError
from medpretrain.features import FeatureCache
from medpretrain.inits import InitSpec
from medpretrain.report import build_report
from medpretrain.runner import plan_cells, pretrain_jobs
from medpretrain.study import load_study, validate_study
from medpretrain.train import FinetuneConfig, StepPlan
from medpretrain.train.classifier import Classifier, load_classifier, save_classifier

runner = CliRunner()


def test_matched_validation_is_proportional_stratified_and_seeded() -> None:
    y = np.array([0] * 900 + [1] * 90 + [2] * 10)
    idx = select_validation(y, "multiclass", 0.1, seed=0)
    assert np.bincount(y[idx]).tolist() == [90, 9, 1]
    tiny = select_validation(y, "multiclass", 0.01, seed=0)
    assert np.bincount(y[tiny]).tolist() == [9, 1, 1]  # at least one image of every class
    assert not np.array_equal(tiny, select_validation(y, "multiclass", 0.01, seed=1))
    assert len(select_validation(y, "multiclass", 1.0, seed=0)) == len(y)
    multilabel = (np.random.default_rng(0).random((400, 4)) < [0.5, 0.1, 0.02, 0.3]).astype(int)
    sub = select_validation(multilabel, "multilabel", 0.05, seed=0)
    assert (multilabel[sub].sum(axis=0) >= 1).all()


def test_flips_follow_laterality_of_class_names() -> None:
    organ = load_dataset("organamnist")
    assert organ.default_hflip == 0.0
    assert "femur-left" in organ.lateral_classes and "liver" not in organ.lateral_classes
    assert load_dataset("bloodmnist").default_hflip > 0
    assert load_dataset("pneumoniamnist").default_hflip > 0


def _plan(**study_keys: object) -> tuple:
    study = validate_study(
        {
            "datasets": ["pneumoniamnist"],
            "inits": ["scratch", {"method": "simclr", "epochs": 1}],
            "protocols": ["linear"],
            "budgets": {"fractions": [0.1]},
            "seeds": 4,
            **study_keys,
        },
        "s.yaml",
    )
    jobs = pretrain_jobs(study)
    checkpoints = {(j.dataset, j.label, j.replicate): Path(f"/ckpt/{j.request.seed}.pt") for j in jobs}
    return study, jobs, checkpoints


def test_pretrain_seeds_give_one_pretraining_per_replicate() -> None:
    _, jobs, _ = _plan(pretrain_seeds=2)
    assert [j.request.seed for j in jobs] == [0, 1] and [j.replicate for j in jobs] == [0, 1]
    single = pretrain_jobs(_plan()[0])
    assert len(single) == 1  # the default: one pre-training serves every seed, as before


def test_eval_seed_uses_pretraining_seed_mod_n() -> None:
    study, _, checkpoints = _plan(pretrain_seeds=2, validation="matched", hflip=0.0)
    cells = plan_cells(study, checkpoints)
    pretrained = [c for c in cells if c.pretrained_here]
    assert [(c.seed, c.init) for c in pretrained] == [(0, "/ckpt/0.pt"), (1, "/ckpt/1.pt"), (2, "/ckpt/0.pt"),
                                                      (3, "/ckpt/1.pt")]  # fmt: skip
    assert all(c.validation == "matched" and c.hflip == 0.0 for c in cells)


def test_input_norm_reaches_pretraining_and_cells_and_keys_them_apart() -> None:
    study, jobs, checkpoints = _plan(input_norm="half")
    assert {j.request.input_norm for j in jobs} == {"half"}
    assert {c.input_norm for c in plan_cells(study, checkpoints)} == {"half"}
    plain = _plan()[1][0].request
    assert "input_norm" not in plain.identity("k")  # checkpoints made before input_norm keep their names
    assert plain.name("p", "k") != jobs[0].request.name("p", "k")


def test_study_rejects_bad_policies() -> None:
    base = {"datasets": ["pneumoniamnist"], "inits": ["scratch"], "budgets": {"fractions": [0.1]}}
    bad = [
        ({"validation": "half"}, "validation"),
        ({"hflip": 2}, "hflip"),
        ({"pretrain_seeds": 0}, "pretrain_seeds"),
        ({"linear": {"bn_adaptt": True}}, "bn_adaptt"),
        ({"input_norm": "cifar"}, "input_norm"),
    ]
    for change, named in bad:
        with pytest.raises(Exception, match=named):
            validate_study({**base, **change}, "s.yaml")


def test_protocol_version_and_policies_change_the_cell_key() -> None:
    base = dict(dataset="pneumoniamnist", size=28, image_size=28, backbone="resnet18", small_stem=False,
                init="scratch", protocol="finetune", budget=Budget(fraction=0.1), seed=0)  # fmt: skip
    cell = Cell(**base)
    assert cell.config()["protocol_version"] == 2  # fine-tuning in steps; rows of the epoch version differ
    assert len({cell.key, Cell(**base, validation="matched").key, Cell(**base, hflip=0.0).key}) == 3
    # The default normalisation spelt out keeps the keys of before input_norm existed; another one is a new cell.
    assert Cell(**base, input_norm="imagenet").key == cell.key != Cell(**base, input_norm="half").key


def test_bn_adapt_features_are_keyed_apart_and_differ(tmp_path: Path) -> None:
    ds = load_dataset("pneumoniamnist[train=64,val=32,test=32]")
    cache = FeatureCache(tmp_path)
    init = InitSpec("scratch")
    plain = cache.get(init, "resnet18", False, ds, progress=False)
    adapted = cache.get(init, "resnet18", False, ds, bn_adapt=True, progress=False)
    assert cache.key(init, "resnet18", False, ds) != cache.key(init, "resnet18", False, ds, bn_adapt=True)
    assert plain["train"].shape == adapted["train"].shape
    assert not np.allclose(plain["train"], adapted["train"])
    assert np.isfinite(adapted["test"]).all()


def test_evaluate_rows_record_n_val_steps_and_augmentation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "evaluate", "--dataset", "organamnist[train=220,val=200,test=100]", "--init", "scratch",
        "--protocol", "linear", "--protocol", "finetune", "--fraction", "0.1", "--validation", "matched",
        "--min-steps", "12", "--lr", "1e-3", "--lr", "1e-4", "--bn-adapt", "--out", str(out),
        "--json", str(out / "rows.json"), "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {r["protocol"]: r for r in json.loads((out / "rows.json").read_text())}
    assert rows["linear"]["n_val"] == rows["finetune"]["n_val"] < 200  # matched: about 10% of 200, ≥ 1 per class
    assert rows["finetune"]["augmentation"]["hflip"] == 0.0  # organ classes are left/right
    assert rows["linear"]["steps"] is None
    ft = rows["finetune"]
    assert ft["steps"] >= 12 and ft["chosen"]["lr"] in (1e-3, 1e-4)
    assert [s["lr"] for s in ft["extra"]["search"]] == [1e-3, 1e-4]
    assert rows["linear"]["config"]["params"] == {"bn_adapt": True}


def test_resize_policies_keep_or_repeat_native_pixels() -> None:
    native = load_dataset("retinamnist")
    pad = load_dataset("retinamnist", image_size=64, resize="pad")
    nearest = load_dataset("retinamnist", image_size=56, resize="nearest")
    bilinear = load_dataset("retinamnist", image_size=64)
    assert len({native.key, pad.key, nearest.key, bilinear.key}) == 4  # caches never mix policies
    x = native.images["train"][:4]
    assert torch.equal(pad.images["train"][:4, :, 18:46, 18:46], x)  # centred on a black canvas, unscaled
    assert int(pad.images["train"][:4, :, :18].max()) == 0
    assert torch.equal(nearest.images["train"][:4, :, ::2, ::2], x)  # each pixel repeated 2×2
    with pytest.raises(MedpretrainError, match="pad only enlarges"):
        load_dataset("retinamnist", image_size=16, resize="pad")


def test_reproduction_preset_is_the_medmnist_v2_recipe() -> None:
    study = load_study(preset="medmnist-v2")
    cfg = FinetuneConfig(**study.finetune)
    assert study.small_stem and study.inits == ["scratch"] and study.budgets.fractions == [1.0]
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.schedule) == ("adam", (1e-3,), 128, 100, "multistep")
    assert cfg.milestones == (0.5, 0.75) and not cfg.augment and cfg.patience == 0
    assert study.input_norm == "half"  # the paper's (x - 0.5) / 0.5
    assert StepPlan.of(1080, cfg).eval_every == StepPlan.of(1080, cfg).steps_per_epoch  # best epoch on validation


def test_every_view_of_a_method_follows_the_flip_policy() -> None:
    from medpretrain.augment import ViewRecipe
    from medpretrain.backbones import create_backbone
    from medpretrain.ssl import get_method, method_config

    for name in ("simclr", "dino", "swav", "vae"):
        method = get_method(name)(create_backbone("resnet18"), method_config(name, {}), channels=1, image_size=28)
        method.set_hflip(0.0)
        recipes = [v for value in vars(method).values() for v in (value if isinstance(value, tuple | list) else [value])
                   if isinstance(v, ViewRecipe)]  # fmt: skip
        assert recipes and all(r.hflip == 0.0 for r in recipes), name


def test_pretraining_on_lateral_classes_does_not_flip(tmp_path: Path) -> None:
    from medpretrain.pretrain import PretrainRequest, pretrain

    hp = {"batch_size": 32}
    organ = PretrainRequest(dataset="organamnist[train=64,val=11,test=11]", method="simclr", epochs=1, hparams=hp)
    path = pretrain(organ, tmp_path, progress=False, log=lambda _: None)
    assert organ.hflip == 0.0
    stored = torch.load(path, map_location="cpu", weights_only=False)["config"]
    assert stored["hflip"] == 0.0
    blood = PretrainRequest(dataset="bloodmnist[train=64,val=8,test=8]", method="simclr", epochs=1, hparams=hp)
    pretrain(blood, tmp_path, progress=False, log=lambda _: None)
    assert blood.hflip == 0.5 and "hflip" not in blood.identity("k")  # checkpoint names from before are kept


def test_input_norm_half_reaches_every_network_and_the_saved_model(tmp_path: Path) -> None:
    gray = torch.full((2, 1, 28, 28), 0.5)
    half = create_backbone("resnet18", small_stem=True, input_norm="half")
    assert torch.allclose(half.prepare(gray), torch.zeros(2, 3, 28, 28))
    assert not torch.allclose(create_backbone("resnet18", small_stem=True).prepare(gray), torch.zeros(2, 3, 28, 28))
    assert torch.allclose(create_backbone("timm:resnet10t", input_norm="half").prepare(gray), torch.zeros(2, 3, 28, 28))
    path = save_classifier(tmp_path / "m.pt", Classifier(half, 2), image_size=28, task=Task.BINARY, classes=["a", "b"])
    loaded, _ = load_classifier(path)
    assert loaded.backbone.input_norm == "half" and torch.equal(loaded.backbone.mean, half.mean)
    with pytest.raises(MedpretrainError, match="input_norm"):
        create_backbone("resnet18", input_norm="cifar")


def test_evaluate_input_norm_is_recorded_keyed_apart_and_reported(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["evaluate", "--dataset", "pneumoniamnist[train=64,val=32,test=32]", "--init", "scratch",
            "--protocol", "linear", "--fraction", "1.0", "--no-progress", "--out", str(out)]  # fmt: skip
    rows = []
    for norm in ("imagenet", "half"):
        result = runner.invoke(app, [*args, "--input-norm", norm, "--json", str(out / f"{norm}.json")])
        assert result.exit_code == 0, result.output
        rows += json.loads((out / f"{norm}.json").read_text())
    assert sorted(r["config"].get("input_norm", "imagenet") for r in rows) == ["half", "imagenet"]
    cache = FeatureCache(out / "cache")
    keys = sorted(p.name for p in cache.root.iterdir())
    assert len(keys) == 2 and sum("-normhalf-" in k for k in keys) == 1
    plain, half = (np.load(cache.root / k / "train.npy") for k in keys)
    assert plain.shape == half.shape and not np.allclose(plain, half)  # the same random network, other inputs
    bad = runner.invoke(app, [*args, "--input-norm", "cifar"])
    assert bad.exit_code != 0 and "input_norm" in bad.output and "Traceback" not in bad.output
    build_report(out)
    assert "(x − 0.5) / 0.5" in (out / "report.html").read_text()
