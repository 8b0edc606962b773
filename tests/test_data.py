"""Data layer: real MedMNIST files from the shared folder; small synthetic folders, CSVs, DICOMs, TIFFs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from medmnist import INFO
from PIL import Image

import medpretrain.data.medmnist as mm
from medpretrain.data import (
    MEDMNIST_FLAGS,
    SPLITS,
    Task,
    check_spec,
    clear_cache,
    data_dir,
    list_datasets,
    load_dataset,
)
from medpretrain.data.images import read_image
from medpretrain.data.subset import take_subset
from medpretrain.errors import MedpretrainError

SHARED_FLAGS = ("bloodmnist", "organamnist", "pneumoniamnist", "retinamnist")


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    # md5 verification records go to the per-user cache; keep them out of the real home directory.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
    clear_cache()
    yield
    clear_cache()


# --- MedMNIST ------------------------------------------------------------------------------------------


def _check_medmnist(flag: str, image_size: int) -> None:
    ds = load_dataset(flag, image_size=image_size if image_size != 28 else None)
    info = INFO[flag]
    assert ds.name == flag
    assert ds.task is Task.from_medmnist(info["task"])
    assert ds.classes == [info["label"][str(i)] for i in range(len(info["label"]))]
    assert ds.size == 28 and ds.image_size == image_size
    assert ds.key == f"{flag}-28-px{image_size}"
    for split in SPLITS:
        n = info["n_samples"][split]
        assert ds.images[split].dtype == torch.uint8
        assert tuple(ds.images[split].shape) == (n, info["n_channels"], image_size, image_size)
        assert ds.labels[split].dtype == np.int64
        assert ds.labels[split].shape == (n,)
        assert ds.labels[split].min() >= 0 and ds.labels[split].max() < len(ds.classes)


def test_pneumoniamnist_loads_with_metadata_shapes() -> None:
    _check_medmnist("pneumoniamnist", 28)
    ds = load_dataset("pneumoniamnist")
    assert ds.task is Task.BINARY and ds.channels == 1
    assert ds.class_counts().sum() == INFO["pneumoniamnist"]["n_samples"]["train"]


def test_bloodmnist_loads_rgb_multiclass() -> None:
    _check_medmnist("bloodmnist", 28)
    ds = load_dataset("bloodmnist")
    assert ds.task is Task.MULTICLASS and ds.channels == 3 and ds.num_classes == 8


def test_resize_to_64_keeps_uint8_and_split_sizes() -> None:
    _check_medmnist("pneumoniamnist", 64)
    small, big = load_dataset("pneumoniamnist"), load_dataset("pneumoniamnist", image_size=64)
    # Same content: the mean intensity survives the resize within a grey level.
    assert abs(small.images["test"].float().mean() - big.images["test"].float().mean()) < 1.0
    assert np.array_equal(small.labels["test"], big.labels["test"])


def test_retinamnist_is_ordinal() -> None:
    ds = load_dataset("retinamnist")
    assert ds.task is Task.ORDINAL and ds.num_classes == 5 and ds.channels == 3


def test_load_is_memoised() -> None:
    a = load_dataset("retinamnist")
    assert load_dataset("retinamnist") is a
    assert load_dataset("retinamnist", image_size=32) is not a
    clear_cache()
    assert load_dataset("retinamnist") is not a


def test_unknown_flag_lists_valid_flags() -> None:
    with pytest.raises(MedpretrainError) as err:
        load_dataset("notamnist")
    msg = str(err.value)
    assert "notamnist" in msg and "path" in msg
    assert all(flag in msg for flag in MEDMNIST_FLAGS)


def test_unknown_size_is_an_error() -> None:
    with pytest.raises(MedpretrainError, match="28, 64, 128, 224"):
        load_dataset("bloodmnist", size=32)


# --- subsets: flag[train=N,val=N,test=N] ------------------------------------------------------------------


def test_oversized_subset_is_refused_with_split_and_counts() -> None:
    n_train = INFO["pneumoniamnist"]["n_samples"]["train"]
    with pytest.raises(MedpretrainError) as err:
        load_dataset("pneumoniamnist[train=99999,val=10]")
    msg = str(err.value)
    assert "\n" not in msg
    for fragment in ("'pneumoniamnist[train=99999,val=10]'", "train=99999", f"has only {n_train} images",
                     f"use train={n_train} or fewer"):  # fmt: skip
        assert fragment in msg, msg


def test_oversized_subset_is_caught_from_metadata_without_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty data directory: the check needs only the release metadata, so it can run before any work.
    monkeypatch.setenv("MEDPRETRAIN_DATA", str(tmp_path))
    monkeypatch.setenv("MEDPRETRAIN_OFFLINE", "1")
    n_test = INFO["bloodmnist"]["n_samples"]["test"]
    with pytest.raises(MedpretrainError, match=f"test={n_test + 1} but the test split of bloodmnist has only {n_test}"):
        check_spec(f"bloodmnist[test={n_test + 1}]")
    check_spec(f"bloodmnist[test={n_test}]")  # the whole split is allowed
    with pytest.raises(MedpretrainError, match=r"'nosuch' in 'nosuch\[train=10\]'"):
        check_spec("nosuch[train=10]")
    with pytest.raises(MedpretrainError, match=r"no size 32"):
        check_spec("bloodmnist[train=10]", size=32)


def test_subset_equal_to_split_keeps_it_whole_and_loaded_check_refuses_more() -> None:
    full = load_dataset("pneumoniamnist")
    n_val = len(full.labels["val"])
    whole = load_dataset(f"pneumoniamnist[val={n_val}]")
    assert np.array_equal(whole.labels["val"], full.labels["val"]) and whole.meta["subset"] == {"val": n_val}
    # take_subset checks the loaded data too (image folders have no metadata to check first).
    with pytest.raises(MedpretrainError, match=f"val={n_val + 1} but the val split of pneumoniamnist has only {n_val}"):
        take_subset(full, {"val": n_val + 1})


def test_oversized_subset_of_an_image_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "xray"
    for split, n in {"train": 6, "val": 2, "test": 3}.items():
        _class_folder(root / split, {"normal": n, "sick": n})
    with pytest.raises(MedpretrainError, match="train=50 but the train split of xray has only 12 images"):
        load_dataset(f"{root}[train=50]")
    assert len(load_dataset(f"{root}[train=4]").labels["train"]) == 4


def test_missing_file_offline_names_path_and_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDPRETRAIN_DATA", str(tmp_path))
    monkeypatch.setenv("MEDPRETRAIN_OFFLINE", "1")
    assert data_dir() == tmp_path
    with pytest.raises(MedpretrainError) as err:
        load_dataset("dermamnist", size=64)
    msg = str(err.value)
    assert str(tmp_path / "dermamnist_64.npz") in msg
    assert INFO["dermamnist"]["url_64"] in msg and "MEDPRETRAIN_DATA" in msg


def test_corrupt_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDPRETRAIN_DATA", str(tmp_path))
    bad = tmp_path / "pneumoniamnist.npz"
    bad.write_bytes(b"this is not a zip file" * 100)
    with pytest.raises(MedpretrainError) as err:
        load_dataset("pneumoniamnist")
    assert str(bad) in str(err.value) and "delete" in str(err.value)


def test_md5_mismatch_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDPRETRAIN_DATA", str(tmp_path))
    n = INFO["breastmnist"]["n_samples"]
    arrays = {}
    for split in SPLITS:
        arrays[f"{split}_images"] = np.zeros((n[split], 28, 28), np.uint8)
        arrays[f"{split}_labels"] = np.zeros((n[split], 1), np.uint8)
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(MedpretrainError, match="md5") as err:
        load_dataset("breastmnist")
    assert str(tmp_path / "breastmnist.npz") in str(err.value)


def test_unreadable_npz_with_matching_md5_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDPRETRAIN_DATA", str(tmp_path))
    bad = tmp_path / "breastmnist.npz"
    bad.write_bytes(b"garbage")
    monkeypatch.setattr(mm, "file_md5", lambda flag, size=28: hashlib.md5(b"garbage").hexdigest())
    with pytest.raises(MedpretrainError, match=r"not a readable \.npz"):
        load_dataset("breastmnist")


def test_chestmnist_labels_are_multilabel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No real ChestMNIST file is available offline: a small file in its layout, with metadata to match.
    monkeypatch.setenv("MEDPRETRAIN_DATA", str(tmp_path))
    sizes = {"train": 6, "val": 2, "test": 3}
    info = {**INFO, "chestmnist": {**INFO["chestmnist"], "n_samples": sizes}}
    monkeypatch.setattr(mm, "INFO", info)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in sizes.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 14), dtype=np.uint8)
    np.savez_compressed(tmp_path / "chestmnist.npz", **arrays)
    md5 = hashlib.md5((tmp_path / "chestmnist.npz").read_bytes()).hexdigest()
    monkeypatch.setattr(mm, "file_md5", lambda flag, size=28: md5)
    ds = load_dataset("chestmnist")
    assert ds.task is Task.MULTILABEL and ds.num_classes == 14
    assert ds.labels["train"].shape == (6, 14) and ds.labels["train"].dtype == np.int64
    assert np.array_equal(ds.labels["test"], arrays["test_labels"])
    assert ds.class_counts().shape == (14,)


def test_md5_is_verified_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_dataset("retinamnist")
    mm._VERIFIED.clear()  # forget the in-process memo: the on-disk record must suffice

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(mm, "_md5_of", no_hashing)
    mm.verify_file(data_dir() / "retinamnist.npz", INFO["retinamnist"]["MD5"])


def test_download_checks_md5_and_renames_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = data_dir() / "retinamnist.npz"
    target = tmp_path / "data"
    monkeypatch.setenv("MEDPRETRAIN_DATA", str(target))
    monkeypatch.delenv("MEDPRETRAIN_OFFLINE", raising=False)
    monkeypatch.setattr(mm, "file_url", lambda flag, size=28: src.resolve().as_uri())
    ds = load_dataset("retinamnist")
    assert (target / "retinamnist.npz").is_file() and ds.images["train"].shape[0] == 1080
    assert sorted(p.name for p in target.iterdir()) == ["retinamnist.npz"]  # no temp files left

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"x" * 1000)
    monkeypatch.setattr(mm, "file_url", lambda flag, size=28: garbage.as_uri())
    with pytest.raises(MedpretrainError, match="md5"):
        load_dataset("breastmnist")
    assert sorted(p.name for p in target.iterdir()) == ["retinamnist.npz"]


def test_list_datasets_shows_shared_files() -> None:
    rows = list_datasets()
    assert [r.flag for r in rows] == list(MEDMNIST_FLAGS) and len(rows) == 12
    available = {r.flag for r in rows if r.available}
    assert available == set(SHARED_FLAGS)
    blood = next(r for r in rows if r.flag == "bloodmnist")
    assert (blood.n_train, blood.n_val, blood.n_test) == (11959, 1712, 3421)
    assert blood.n_classes == 8 and blood.task is Task.MULTICLASS and blood.path == data_dir() / "bloodmnist.npz"
    chest = next(r for r in rows if r.flag == "chestmnist")
    assert chest.task is Task.MULTILABEL and not chest.available
    assert all(not r.available for r in list_datasets(size=224))
    assert next(r for r in list_datasets(size=224) if r.flag == "pathmnist").path.name == "pathmnist_224.npz"


# --- user data -----------------------------------------------------------------------------------------


def _png(path: Path, seed: int, *, shape: tuple[int, ...] = (40, 40), value: int | None = None) -> None:
    rng = np.random.default_rng(seed)
    arr = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _class_folder(root: Path, counts: dict[str, int], *, shape: tuple[int, ...] = (40, 40)) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            _png(root / name / f"img{i:02d}.png", 100 * c + i, shape=shape)
    return root


def test_image_folder_with_given_splits(tmp_path: Path) -> None:
    root = tmp_path / "xray"
    for split, n in {"train": 6, "val": 2, "test": 3}.items():
        _class_folder(root / split, {"normal": n, "sick": n}, shape=(30, 50))
    ds = load_dataset(root, image_size=32)
    assert ds.classes == ["normal", "sick"] and ds.task is Task.BINARY
    assert {s: ds.images[s].shape[0] for s in SPLITS} == {"train": 12, "val": 4, "test": 6}
    assert tuple(ds.images["train"].shape[1:]) == (1, 32, 32) and ds.images["train"].dtype == torch.uint8
    assert ds.labels["test"].tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.meta["splits_given"] and ds.key.startswith("xray-") and ds.key.endswith("-px32")
    assert load_dataset(str(root), image_size=32) is ds


def test_image_folder_stratified_split_saved_and_reused(tmp_path: Path) -> None:
    root = _class_folder(tmp_path / "cells", {"a": 10, "b": 20})
    split_dir = tmp_path / "out" / "splits"
    ds = load_dataset(root, image_size=24, split_dir=split_dir)
    assert {s: len(ds.labels[s]) for s in SPLITS} == {"train": 21, "val": 3, "test": 6}
    assert ds.class_counts("train").tolist() == [7, 14] and ds.class_counts("test").tolist() == [2, 4]
    files = list(split_dir.glob("cells-*.json"))
    assert len(files) == 1 and ds.meta["split_file"] == str(files[0])
    saved = json.loads(files[0].read_text())
    assert saved["splits"] == ds.meta["files"] and saved["seed"] == 0

    clear_cache()
    again = load_dataset(root, image_size=24, split_dir=split_dir)
    assert again is not ds and again.meta["files"] == ds.meta["files"] and again.key == ds.key
    assert torch.equal(again.images["test"], ds.images["test"])

    # The saved file wins over recomputation: move one test image to train by hand.
    moved = saved["splits"]["test"].pop(0)
    saved["splits"]["train"].append(moved)
    files[0].write_text(json.dumps(saved))
    clear_cache()
    edited = load_dataset(root, image_size=24, split_dir=split_dir)
    assert moved in edited.meta["files"]["train"] and len(edited.labels["test"]) == 5
    assert edited.key != ds.key

    other_seed = load_dataset(root, image_size=24, split_dir=split_dir, seed=1)
    assert other_seed.meta["files"] != ds.meta["files"] and len(list(split_dir.glob("*.json"))) == 2


def test_image_folder_native_size_and_val_carved_from_train(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    _class_folder(root / "train", {"x": 8, "y": 8}, shape=(20, 36))
    _class_folder(root / "test", {"x": 2, "y": 2}, shape=(20, 36))
    ds = load_dataset(root)
    assert ds.size == 36 and ds.image_size == 36  # median longest side (images are padded to square)
    assert {s: len(ds.labels[s]) for s in SPLITS} == {"train": 14, "val": 2, "test": 4}


def test_csv_manifest(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    rows = ["path,label,split"]
    for i in range(12):
        label, split = ("benign", "malignant")[i % 2], ("train", "train", "val", "test")[i % 4]
        # Mixed gray and colour images → all become 3 channels.
        shape = (24, 24, 3) if i % 3 == 0 else (24, 24)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.jpg")
        rows.append(f"imgs/{i}.jpg,{label},{split}")
    csv_path = tmp_path / "lesions.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    ds = load_dataset(csv_path, image_size=16)
    assert ds.name == "lesions" and ds.classes == ["benign", "malignant"] and ds.channels == 3
    assert {s: len(ds.labels[s]) for s in SPLITS} == {"train": 6, "val": 3, "test": 3}
    assert tuple(ds.images["val"].shape) == (3, 3, 16, 16)

    no_split = tmp_path / "nosplit.csv"
    no_split.write_text("\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    ds2 = load_dataset(no_split, image_size=16)
    assert sum(len(ds2.labels[s]) for s in SPLITS) == 12 and not ds2.meta["splits_given"]


def test_csv_errors(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", 0)
    bad_cols = tmp_path / "cols.csv"
    bad_cols.write_text("file,label\na.png,x\n")
    with pytest.raises(MedpretrainError, match="lacks column") as err:
        load_dataset(bad_cols)
    assert str(bad_cols) in str(err.value)
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\na.png,x\nnot_there.png,y\n")
    with pytest.raises(MedpretrainError, match=r"not_there\.png"):
        load_dataset(missing)
    with pytest.raises(MedpretrainError, match="does not exist"):
        load_dataset(tmp_path / "nope.csv")


def _dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", **extra: object) -> None:
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=16)
    for name, value in extra.items():
        setattr(ds, name, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_rescale_window_and_monochrome1(tmp_path: Path) -> None:
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 10).astype(np.uint16)
    _dicom(tmp_path / "m2.dcm", ramp)
    _dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1")
    m2, m1 = read_image(tmp_path / "m2.dcm"), read_image(tmp_path / "m1.dcm")
    assert m2.dtype == np.uint8 and m2.shape == (16, 16) and m2.min() == 0 and m2.max() == 255
    assert np.array_equal(m1, 255 - m2)
    # CT-like: slope/intercept to HU, then a window of [0, 1000] HU clips the low half of the ramp.
    _dicom(tmp_path / "ct.dcm", ramp, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=500, WindowWidth=1000)
    ct = read_image(tmp_path / "ct.dcm")
    hu = ramp.astype(float) - 1000
    assert (ct[hu <= 0] == 0).all() and (ct[hu >= 1000] == 255).all()

    root = tmp_path / "ct"
    for c, name in enumerate(("lesion", "normal")):
        for i in range(10):
            _dicom(root / name / f"{i}.dcm", (ramp + 7 * i + 50 * c).astype(np.uint16))
    ds = load_dataset(root, image_size=8)
    assert ds.channels == 1 and ds.size == 16 and tuple(ds.images["train"].shape[1:]) == (1, 8, 8)


def test_tiff_16bit(tmp_path: Path) -> None:
    import tifffile

    root = tmp_path / "micro"
    rng = np.random.default_rng(1)
    for c, name in enumerate(("a", "b")):
        for i in range(10):
            (root / name).mkdir(parents=True, exist_ok=True)
            arr = rng.integers(1000, 40000, (20, 20), dtype=np.uint16) + c
            tifffile.imwrite(root / name / f"{i}.tif", arr)
    img = read_image(root / "a" / "0.tif")
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    ds = load_dataset(root, image_size=16)
    assert ds.channels == 1 and ds.num_classes == 2 and ds.images["test"].dtype == torch.uint8


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    root = _class_folder(tmp_path / "d", {"a": 10, "b": 10})
    broken = root / "b" / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(MedpretrainError) as err:
        load_dataset(root)
    assert str(broken) in str(err.value)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(MedpretrainError, match="No readable images") as err:
        load_dataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)


def test_single_class_is_an_error(tmp_path: Path) -> None:
    root = _class_folder(tmp_path / "one", {"only": 10})
    with pytest.raises(MedpretrainError, match="single class"):
        load_dataset(root)


def test_class_without_training_images_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _class_folder(root / "train", {"a": 4})
    _class_folder(root / "val", {"a": 2, "b": 2})
    _class_folder(root / "test", {"a": 2, "b": 2})
    with pytest.raises(MedpretrainError, match="no training images"):
        load_dataset(root)


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MedpretrainError, match="does not exist"):
        load_dataset(str(tmp_path / "nothing"))
