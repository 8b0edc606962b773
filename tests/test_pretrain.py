"""Self-supervised pre-training through the shared loop and the CLI, on real images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import medpretrain.ssl  # noqa: F401  (registers the methods)
from medpretrain.cli import app
from medpretrain.errors import MedpretrainError
from medpretrain.inits import build_model, checkpoint_meta
from medpretrain.pretrain import PretrainRequest, pretrain
from medpretrain.ssl import METHODS

runner = CliRunner()

# Backbone settings each method is exercised with at 28 px (SparK needs a feature grid larger than 1×1,
# MAE a ViT); everything else runs on the fast standard-stem ResNet-18.
SETTINGS: dict[str, dict] = {
    "spark": {"backbone": "resnet18", "small_stem": True},
    "mae": {"backbone": "vit_tiny", "small_stem": True},
}


def _png_folder(root: Path, n: int, *, labeled: bool) -> Path:
    """Real pneumoniamnist training images written as PNG files (flat when unlabeled)."""
    data = np.load(Path(os.environ["MEDPRETRAIN_DATA"]) / "pneumoniamnist.npz")
    images, labels = data["train_images"], data["train_labels"].ravel()
    for i in range(n):
        folder = root / ("normal", "pneumonia")[labels[i]] if labeled else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory) -> Path:
    return _png_folder(tmp_path_factory.mktemp("unlabeled"), 96, labeled=False)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    return _png_folder(tmp_path_factory.mktemp("labeled"), 120, labeled=True)


def test_every_method_is_listed():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    for name in ("simclr", "moco", "byol", "simsiam", "swav", "dino", "barlow_twins", "vicreg", "spark", "mae", "vae"):
        assert name in METHODS
        assert name in result.output


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_pretrains_and_its_checkpoint_evaluates(method, unlabeled, labeled, tmp_path):
    settings = SETTINGS.get(method, {"backbone": "resnet18", "small_stem": False})
    request = PretrainRequest(
        dataset=str(unlabeled), method=method, epochs=1, image_size=28, hparams={"batch_size": 32}, **settings
    )
    path = pretrain(request, tmp_path / "ssl", progress=False, log=lambda _: None)
    meta = checkpoint_meta(path)
    assert meta["method"] == method and meta["image_size"] == 28
    payload = torch.load(path, map_location="cpu", weights_only=False)
    (epoch,) = payload["history"]
    assert np.isfinite(epoch["loss"]) and epoch["images_per_s"] > 0 and epoch["embedding_std"] > 0
    log = json.loads(path.with_name(path.name.replace(".pt", ".log.json")).read_text())
    assert log == payload["history"]

    # Every backbone tensor of the checkpoint is matched when it is loaded as an init.
    _, report = build_model(settings["backbone"], str(path), small_stem=settings["small_stem"], img_size=28)
    assert not report.missing and not report.unexpected

    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        ["evaluate", "--dataset", str(labeled), "--init", str(path), "--backbone", settings["backbone"],
         "--protocol", "linear", "--fraction", "1.0", "--out", str(out), "--json", str(out / "rows.json"),
         "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "rows.json").read_text())
    # The probe ran on this checkpoint's features and ranks pneumonia above normal far better than chance
    # (every method scored 0.89-0.98 on these 24 test images when this was written; a broken pipeline
    # - constant or NaN features, labels out of step with images - sits near 0.5).
    assert row["init_kind"] == "checkpoint"
    assert row["auc"] > 0.75


def test_same_request_reuses_the_checkpoint(unlabeled, tmp_path):
    request = dict(dataset=str(unlabeled), method="simclr", epochs=1, hparams={"batch_size": 32})
    first = pretrain(PretrainRequest(**request), tmp_path, progress=False, log=lambda _: None)
    stamp = first.stat().st_mtime_ns
    messages: list[str] = []
    again = pretrain(PretrainRequest(**request), tmp_path, progress=False, log=messages.append)
    assert again == first and first.stat().st_mtime_ns == stamp
    assert any("reusing" in m for m in messages)
    other = pretrain(PretrainRequest(**{**request, "seed": 1}), tmp_path, progress=False, log=lambda _: None)
    assert other != first
    # Every write went through a uniquely named temporary file, and none is left behind.
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_bf16_mixed_precision_on_cpu_trains_spark_and_is_part_of_the_name(unlabeled, tmp_path):
    request = dict(dataset=str(unlabeled), method="spark", epochs=1, small_stem=True, hparams={"batch_size": 32})
    auto = PretrainRequest(**request)
    bf16 = PretrainRequest(**request, precision="bf16-mixed")
    # "auto" is the machine's default and stays out of the name; an explicit choice is part of it.
    assert "precision" not in auto.identity("k") and bf16.identity("k")["precision"] == "bf16-mixed"
    assert auto.name("d", "k") != bf16.name("d", "k")
    path = pretrain(bf16, tmp_path, progress=False, log=lambda _: None)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    assert np.isfinite(payload["history"][0]["loss"])
    assert payload["config"]["precision"] == "bf16-mixed"
    # The weights are stored in float32 whatever the training precision, and load as an init.
    backbone, report = build_model("resnet18", str(path), small_stem=True)
    assert not report.missing
    assert all(p.dtype == torch.float32 for p in backbone.parameters())


def test_cli_prints_checkpoint_path_last_and_rejects_bad_input(unlabeled, tmp_path):
    args = ["pretrain", "--dataset", "pneumoniamnist", "--unlabeled-from", str(unlabeled), "--method", "byol",
            "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert last.endswith(".pt") and Path(last).exists()

    for bad, fragment in (
        (["--method", "simclrr"], "simclr"),
        (["--method", "simclr", "--hp", "temperature=-"], "temperature"),
        (["--method", "simclr", "--hp", "no_such_key=1"], "no_such_key"),
        (["--method", "mae", "--backbone", "resnet18"], "vit"),
        (["--method", "simclr", "--precision", "fp8"], "bf16-mixed"),
        *([] if torch.cuda.is_available() else [(["--method", "simclr", "--precision", "16-mixed"], "CUDA")]),
    ):
        result = runner.invoke(app, [*args[:3], "--epochs", "1", "--out", str(tmp_path), *bad])
        assert result.exit_code == 2, result.output
        assert fragment in result.output and "Traceback" not in result.output


def test_nan_loss_stops_and_keeps_the_last_good_epoch(unlabeled, tmp_path, monkeypatch):
    simclr = METHODS["simclr"]
    real_step = simclr.step
    calls = {"n": 0}

    def diverging_step(self, views):  # finite for the first epoch (3 steps), then the loss blows up
        out = real_step(self, views)
        calls["n"] += 1
        if calls["n"] > 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(simclr, "step", diverging_step)
    request = PretrainRequest(dataset=str(unlabeled), method="simclr", epochs=2, hparams={"batch_size": 32})
    with pytest.raises(MedpretrainError, match="NaN/inf at epoch 2") as err:
        pretrain(request, tmp_path, progress=False, log=lambda _: None)
    assert "--lr" in str(err.value)
    (kept,) = tmp_path.glob("*.resume.ckpt")
    assert torch.load(kept, map_location="cpu", weights_only=False)["medpretrain_history"][0]["epoch"] == 1
    assert not list(tmp_path.glob("*.pt"))


def test_sigkill_mid_run_then_resume_finishes(unlabeled, tmp_path):
    args = [sys.executable, "-m", "medpretrain", "pretrain", "--dataset", str(unlabeled), "--method", "simclr",
            "--epochs", "4", "--batch-size", "16", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    victim = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not list(tmp_path.glob("*.resume.ckpt")) and time.time() < deadline and victim.poll() is None:
        time.sleep(0.2)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not list(tmp_path.glob("*.pt"))

    refused = subprocess.run(args, capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from epoch" in resumed.stderr
    final = Path(resumed.stdout.strip().splitlines()[-1])
    history = torch.load(final, map_location="cpu", weights_only=False)["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert not list(tmp_path.glob("*.resume.ckpt"))


def test_learning_rate_follows_warmup_and_cosine(unlabeled, tmp_path):
    request = PretrainRequest(
        dataset=str(unlabeled), method="vae", epochs=3, hparams={"batch_size": 32, "warmup_epochs": 1}
    )
    path = pretrain(request, tmp_path, progress=False, log=lambda _: None)
    lrs = [h["lr"] for h in torch.load(path, map_location="cpu", weights_only=False)["history"]]
    assert all(np.isfinite(lrs)) and lrs[0] > 0
    assert lrs[0] > lrs[1] > lrs[2]  # warm-up ends within epoch 1, then cosine decay


def test_continued_pretraining_starts_from_imagenet(unlabeled, tmp_path):
    messages: list[str] = []
    request = PretrainRequest(
        dataset=str(unlabeled), method="simclr", backbone="efficientnet_lite0", init="imagenet", epochs=1,
        image_size=32, hparams={"batch_size": 32},
    )  # fmt: skip
    path = pretrain(request, tmp_path, progress=False, log=messages.append)
    assert any("ImageNet" in m or "efficientnet" in m.lower() for m in messages), messages
    imagenet, _ = build_model("efficientnet_lite0", "imagenet")
    continued, report = build_model("efficientnet_lite0", str(path))
    assert not report.missing
    stem_before = imagenet.model.conv_stem.weight
    stem_after = continued.model.conv_stem.weight
    # Continued from ImageNet: close to the ImageNet weights after one short epoch, yet changed by it.
    assert not torch.equal(stem_before, stem_after)
    assert torch.nn.functional.cosine_similarity(stem_before.flatten(), stem_after.flatten(), dim=0) > 0.9
    assert checkpoint_meta(path)["image_size"] == 32
