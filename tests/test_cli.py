"""End to end through the command line, on the real shared MedMNIST files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medpretrain.backbones import create_backbone
from medpretrain.cli import app
from medpretrain.inits import save_checkpoint

runner = CliRunner()
REQUIRED_KEYS = {
    "dataset", "init", "backbone", "protocol", "fraction", "shots", "seed", "n_labeled", "auc", "auc_ci_low",
    "auc_ci_high", "acc", "acc_ci_low", "acc_ci_high", "balanced_acc", "f1_macro", "kappa", "ece", "seconds",
    "val_auc", "val_acc", "init_kind",
}  # fmt: skip


def invoke(*args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_help_on_every_command():
    for command in ([], ["datasets"], ["evaluate"], ["methods"], ["pretrain"], ["run"], ["report"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_datasets_lists_what_is_here():
    result = invoke("datasets")
    assert result.exit_code == 0, result.output
    for flag in ("pneumoniamnist", "bloodmnist", "chestmnist", "tissuemnist"):
        assert flag in result.output
    assert "yes" in result.output and "no" in result.output


def test_linear_probe_rows_and_rerun_skips(tmp_path):
    out, rows_path = tmp_path / "run", tmp_path / "rows.json"
    args = [
        "evaluate", "--dataset", "pneumoniamnist", "--init", "scratch", "--protocol", "linear",
        "--fraction", "0.01", "--fraction", "0.1", "--seeds", "2", "--out", out, "--json", rows_path, "--no-progress",
    ]  # fmt: skip
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    rows = json.loads(rows_path.read_text())
    assert len(rows) == 4
    assert set(rows[0]) >= REQUIRED_KEYS
    for row in rows:
        assert row["auc_ci_low"] <= row["auc"] <= row["auc_ci_high"]
        assert row["auc"] > 0.7  # random ResNet-18 features separate pneumonia well above chance
    by_budget = {(r["fraction"], r["seed"]): r["n_labeled"] for r in rows}
    assert by_budget[(0.01, 0)] < by_budget[(0.1, 0)]
    assert (out / "results.db").exists()

    second = invoke(*args)
    assert second.exit_code == 0
    assert second.output.count("done already") == 4
    again = json.loads(rows_path.read_text())
    assert [r["auc"] for r in again] == [r["auc"] for r in rows]
    assert [r["cell_key"] for r in again] == [r["cell_key"] for r in rows]


def _image_folder(root: Path, n_per_class: int = 30) -> Path:
    """A small real image folder: pneumoniamnist test images written as PNG files, one folder per class."""
    data = np.load(Path(__import__("os").environ["MEDPRETRAIN_DATA"]) / "pneumoniamnist.npz")
    images, labels = data["test_images"], data["test_labels"].ravel()
    for name, cls in (("normal", 0), ("pneumonia", 1)):
        folder = root / name
        folder.mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(labels == cls)[:n_per_class]):
            Image.fromarray(images[idx]).save(folder / f"{i}.png")
    return root


def test_knn_on_own_folder_with_checkpoint(tmp_path):
    folder = _image_folder(tmp_path / "xrays")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(
        tmp_path / "mine.pt", create_backbone("resnet18"), image_size=28, method="test", config={}
    )
    out = tmp_path / "run"
    result = invoke(
        "evaluate", "--dataset", folder, "--init", checkpoint, "--protocol", "knn", "--shots", "5",
        "--out", out, "--json", out / "rows.json", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "rows.json").read_text())
    assert row["n_labeled"] == 10 and row["protocol"] == "knn"
    assert row["image_size"] == 28  # taken from the checkpoint
    assert list((out / "splits").glob("*.json")), "the generated split is saved beside the results"


def test_finetune_cell_stores_history_and_gap(tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "evaluate", "--dataset", "pneumoniamnist", "--init", "scratch", "--protocol", "finetune",
        "--shots", "40", "--epochs", "2", "--min-steps", "0", "--lr", "1e-3",
        "--out", out, "--json", out / "rows.json", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "rows.json").read_text())
    assert len(row["history"]) == 2
    assert {"train_loss", "val_loss", "train_acc", "val_acc"} <= set(row["history"][0])
    assert "overfitting" in row["extra"]
    assert 1 <= row["chosen"]["epoch"] <= 2


@pytest.fixture
def corrupt_data_dir(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "pneumoniamnist.npz").write_bytes(b"not a zip file at all")
    monkeypatch.setenv("MEDPRETRAIN_DATA", str(folder))
    monkeypatch.setenv("MEDPRETRAIN_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from medpretrain.data import clear_cache

    clear_cache()
    return folder


def _expect_error(args: list[str | Path], *fragments: str) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(message) == 1, result.output
    for fragment in fragments:
        assert fragment.lower() in message[0].lower(), message[0]


BASE = ["evaluate", "--protocol", "linear", "--fraction", "0.1", "--no-progress"]


def test_error_unknown_dataset(tmp_path):
    _expect_error([*BASE, "--dataset", "pneumomnist", "--out", tmp_path], "pneumomnist", "pneumoniamnist")


def test_error_missing_dataset_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPRETRAIN_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("MEDPRETRAIN_OFFLINE", "1")
    _expect_error([*BASE, "--dataset", "dermamnist", "--out", tmp_path], str(tmp_path / "empty"), "dermamnist.npz")


def test_error_corrupt_dataset_file(tmp_path, corrupt_data_dir):
    _expect_error([*BASE, "--dataset", "pneumoniamnist", "--out", tmp_path], "pneumoniamnist.npz")


def test_error_folder_without_images(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("no images here")
    _expect_error([*BASE, "--dataset", tmp_path / "empty", "--out", tmp_path / "o"], "no readable images")


def test_error_single_class_folder(tmp_path):
    folder = _image_folder(tmp_path / "xrays", n_per_class=5)
    for png in (folder / "pneumonia").iterdir():
        png.unlink()
    (folder / "pneumonia").rmdir()
    _expect_error([*BASE, "--dataset", folder, "--out", tmp_path / "o"], "class")


def test_error_unreadable_image(tmp_path):
    folder = _image_folder(tmp_path / "xrays", n_per_class=5)
    (folder / "normal" / "broken.png").write_bytes(b"\x89PNG but truncated")
    _expect_error([*BASE, "--dataset", folder, "--out", tmp_path / "o"], "broken.png")


def test_error_budget_too_small(tmp_path):
    _expect_error(
        ["evaluate", "--dataset", "pneumoniamnist", "--fraction", "0.00001", "--out", tmp_path, "--no-progress"],
        "smallest valid fraction",
    )


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [("--init", "imagenett", "scratch"), ("--backbone", "resnet19", "resnet18"), ("--protocol", "lin", "knn")],
)
def test_error_unknown_choice(tmp_path, option, value, fragment):
    args = ["evaluate", "--dataset", "pneumoniamnist", "--fraction", "0.1", "--out", tmp_path, option, value]
    _expect_error(args, value, fragment)


def test_error_checkpoint_matching_no_backbone(tmp_path):
    bogus = tmp_path / "bogus.pt"
    torch.save({"decoder.weight": torch.zeros(3, 3), "other.bias": torch.zeros(7)}, bogus)
    _expect_error([*BASE, "--dataset", "pneumoniamnist", "--init", bogus, "--out", tmp_path], "bogus.pt")


def test_error_same_init_twice(tmp_path):
    weights = tmp_path / "a.pt"
    torch.save(create_backbone("resnet18").model.state_dict(), weights)
    (tmp_path / "copy.pt").write_bytes(weights.read_bytes())
    args = [*BASE, "--dataset", "pneumoniamnist", "--init", weights, "--init", tmp_path / "copy.pt", "--out", tmp_path]
    _expect_error(args, "copy.pt", "same initialization")
    twice = ["--init", "scratch", "--init", "scratch"]
    _expect_error([*BASE, "--dataset", "pneumoniamnist", *twice, "--out", tmp_path], "scratch")


def test_error_no_budget(tmp_path):
    _expect_error(["evaluate", "--dataset", "pneumoniamnist", "--out", tmp_path], "--fraction")
